"""The counterfactual-consistency regularizer: a row aligned with its term-swapped twin token by token, its KL
term against the twin's predictions (a fixed target), and a training run that logs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from keeltune.config import config_from_dict
from keeltune.data_pipeline.counterfactual import Swapper
from keeltune.distributed import ParallelEnv
from keeltune.sharding.ddp import DDPBackend
from keeltune.training.regularizers import RegularizerContext, build_regularizers
from keeltune.training.regularizers.consistency import Consistency, make_twin
from keeltune.training.regularizers.kl import token_kl
from keeltune.training.trainer import Trainer
from tests.conftest import base_config, read_metrics, write_jsonl

GENDERED = "Then he said his mother and his father went home."
NO_TERM = "The value is converted with list and then printed."


@pytest.fixture(scope="module")
def tokenizer(assets: dict) -> object:
    return AutoTokenizer.from_pretrained(assets["model"])


def _ids(tokenizer: object, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_twin_aligns_exactly_the_shared_tokens_after_the_first_swap(tokenizer: object) -> None:
    swapper = Swapper.from_config(["gender"])
    ids = _ids(tokenizer, GENDERED)
    twin = make_twin(ids, tokenizer, swapper)
    assert twin is not None
    twin_text = "Then she said her father and her mother went home."
    assert twin.ids == _ids(tokenizer, twin_text) and len(twin.ids) == len(ids) + 2  # "his" 2 tokens, "her" 3
    row, offsets = tokenizer(GENDERED, return_offsets_mapping=True), []
    spans = [(s, e) for s, e, _ in swapper.spans(GENDERED)]
    # the row's tokens after the first "he" that lie outside every term
    for k, (start, end) in enumerate(row["offset_mapping"]):
        if start >= spans[0][1] and all(end <= s or start >= e for s, e in spans):
            offsets.append(k)
    assert [t + 1 for t, _ in twin.positions] == offsets
    row_tokens = tokenizer.convert_ids_to_tokens(ids)
    twin_tokens = tokenizer.convert_ids_to_tokens(twin.ids)
    assert [row_tokens[t + 1] for t, _ in twin.positions] == [twin_tokens[u + 1] for _, u in twin.positions]
    aligned_text = "".join(row_tokens[t + 1] for t, _ in twin.positions).replace("Ġ", " ")
    assert aligned_text == " said and went home."
    assert {u - t for t, u in twin.positions} == {0, 1, 2}  # shifted by the swaps before each token
    assert make_twin(_ids(tokenizer, NO_TERM), tokenizer, swapper) is None
    # " he said" in tokens that its text does not encode back to
    split = tokenizer.convert_tokens_to_ids(["Ġ", "h", "e", "Ġs", "a", "i", "d"])
    assert _ids(tokenizer, tokenizer.decode(split)) != split and make_twin(split, tokenizer, swapper) is None


def test_term_is_the_kl_to_the_twin_with_gradient_only_to_the_rows_logits(
    assets: dict, tmp_path: Path, tokenizer: object
) -> None:
    weight = 0.5
    config = config_from_dict(
        base_config(assets, tmp_path, regularization={"consistency": {"weight": weight}})
    )
    torch.manual_seed(0)
    backend = DDPBackend(config, ParallelEnv())
    context = RegularizerContext(config, backend, ParallelEnv(), tmp_path, {}, tokenizer=tokenizer)
    (consistency,) = build_regularizers(context)
    gendered, plain = _ids(tokenizer, GENDERED), _ids(tokenizer, NO_TERM)
    length = max(len(gendered), len(plain))
    pad = tokenizer.pad_token_id
    inputs = torch.tensor(
        [gendered + [pad] * (length - len(gendered)), plain + [pad] * (length - len(plain))]
    )
    assert inputs.shape[1] == len(gendered)  # so the twin (2 tokens longer) is cut and its last pairs dropped
    backend.train(True)
    term = consistency.loss_term(inputs)
    assert backend.model.training  # the twin's eval-mode forward left the model training
    twin = make_twin(gendered, tokenizer, consistency.swapper)
    pairs = [(t, u) for t, u in twin.positions if u < length]
    assert len(pairs) < len(twin.positions)
    mask = torch.ones(inputs.shape)
    prompt = pairs[0][0]
    mask[0, prompt] = 0.0  # an aligned position whose token is no target: no term
    logits = backend.logits(inputs).requires_grad_(True)
    value = term(logits, mask)
    # the twin alone and whole: its padding and cut change nothing
    twin_logits = backend.logits(torch.tensor([twin.ids]))[0]
    expected = sum(float(token_kl(logits[0, t].detach(), twin_logits[u], mask[0, t])) for t, u in pairs)
    assert float(value.detach()) == pytest.approx(weight * expected, rel=1e-5) and expected > 0
    value.backward()
    touched = {(b, t) for b, t in (logits.grad.abs().sum(-1) > 0).nonzero().tolist()}
    assert touched == {(0, t) for t, _ in pairs if t != prompt}
    assert all(p.grad is None for p in backend.model.parameters())  # no gradient through the twin


class ConstantModel:
    """A backend whose predictions ignore the input; records its calls."""

    def __init__(self, partitioned: bool) -> None:
        self.partitioned = partitioned
        self.calls: list[str] = []

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append("logits")
        return torch.linspace(-1.0, 1.0, 512).expand(*input_ids.shape, 512).clone()

    def train(self, mode: bool = True) -> None:
        self.calls.append(f"train {mode}")


@pytest.mark.parametrize("partitioned", [False, True])
def test_equal_predictions_give_zero_and_every_partitioned_rank_runs_one_forward(
    assets: dict, tmp_path: Path, tokenizer: object, partitioned: bool
) -> None:
    config = config_from_dict(base_config(assets, tmp_path, regularization={"consistency": {"weight": 1.0}}))
    model = ConstantModel(partitioned)
    consistency = Consistency(
        RegularizerContext(config, model, ParallelEnv(), tmp_path, {}, tokenizer=tokenizer)
    )
    gendered, plain = torch.tensor([_ids(tokenizer, GENDERED)]), torch.tensor([_ids(tokenizer, NO_TERM)])
    term = consistency.loss_term(gendered)
    assert model.calls == ["train False", "logits", "train True"]
    assert float(term(model.logits(gendered), torch.ones(gendered.shape))) == pytest.approx(0.0, abs=1e-6)
    model.calls.clear()
    term = consistency.loss_term(plain)  # no twin: a forward anyway when partitioned (collectives inside)
    assert model.calls == (["train False", "logits", "train True"] if partitioned else [])
    assert float(term(model.logits(plain), torch.ones(plain.shape))) == 0.0


def family_records() -> list[dict[str, str]]:
    """Instruction records whose answers hold gendered terms (he, her, mother, ...): each has a twin."""
    people = [
        ("he", "his", "mother"),
        ("she", "her", "father"),
        ("he", "her", "brother"),
        ("she", "his", "aunt"),
    ]
    return [
        {
            "instruction": f"Where did the family go on day {i}?",
            "input": "",
            "output": f"On day {i} {p} said that {poss} {rel} went to the market, and then {p} came home.",
        }
        for i, (p, poss, rel) in enumerate(people * 6)
    ]


def test_training_with_consistency_logs_a_positive_term(assets: dict, tmp_path: Path) -> None:
    raw = base_config(
        assets,
        tmp_path,
        training={"max_steps": 2, "warmup_steps": 1},
        eval={"every_steps": 4, "at_start": False},
        regularization={"consistency": {"weight": 1.0}},
    )
    raw["data"]["train"] = [
        {
            "name": "family",
            "path": str(write_jsonl(tmp_path / "family.jsonl", family_records())),
            "format": "instruction",
        }
    ]
    trainer = Trainer(config_from_dict(raw), ParallelEnv())
    for _ in range(2):
        trainer.train_one_step()
    trainer.close()
    logged = [r for r in read_metrics(trainer.run_dir) if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["train/consistency"] > 0 for r in logged), logged
