"""keeltune's own multiple-choice scorer (``prepare_task`` + ``run_task``, no lm-eval) equals
lm-evaluation-harness on the same items and model: per-choice log-likelihoods, acc and acc_norm, per item and
in aggregate; lm-eval runs through ``keeltune.eval.harness.run_lm_eval`` (in this process, offline).

The items: 60 multiple-choice questions built from Python's ``pydoc_data.topics`` text: a topic's first words
as the prompt (some ending in a newline or a space, which lm-eval moves to the continuation), its next words as
the right choice and other topics' words as wrong ones. The choices are whole words within budgets of 1, 2, 4
and 7 tokens (rotated, so the right one varies in length). The tiny random-weight Llama of the ``assets``
fixture gives every token about -6.2 nats, so acc (argmax log-likelihood) picks about the choice of fewest
tokens and acc_norm (argmax log-likelihood per character) the one of most characters per token, so they
disagree on many items by construction (22 of 60 here). No item is a near tie that float noise could flip: an
item's two best choices are at least 0.005 nats apart (0.02 per character), hundreds of times the tolerance.

Why short choices: lm-eval sums a continuation's token log-probabilities in float32, so its value carries
float32 rounding of about |log-likelihood| * 1e-7 (measured here: up to 2.5e-5 at -335 nats, 5e-6 below 64).
The budgets keep every log-likelihood above about -50 nats, where the 1e-5 absolute tolerance holds with room.

BOS: keeltune's text-format prompt starts with the tokenizer's BOS token, as its training documents do.
lm-eval's HFLM adds a BOS only through the tokenizer's ``add_special_tokens`` (``add_bos_token=True`` only
turns that on), and this tokenizer adds nothing, so lm-eval would score the items without one. The task YAML
therefore sets ``description: "<|bos|>"`` (the BOS token's text): lm-eval prepends the description to every
context, and the BPE tokenizer encodes that text as the BOS token's id (a special token is matched in the
text). ``HFLM.tok_encode`` then sees that the context starts with the BOS text and encodes it with
``add_special_tokens=False``, so no second BOS can come from a tokenizer that does add one. This is lm-eval's
own documented prompt mechanism, the model and tokenizer are untouched, and the test checks the result token
by token: lm-eval's ``_encode_pair`` of each logged (context, continuation) gives exactly keeltune's ids.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, write_jsonl

TASK = "kt_equality_mc"
BUDGETS = (1, 2, 4, 7)  # each item's choices' most tokens, rotated so the right one varies in length
TOLERANCE = 1e-5


def _choice(tokenizer: Any, words: list[str], start: int, budget: int, taken: list[str]) -> str:
    """The longest run of ``words`` from ``start`` (or the first later position where one word fits) whose
    encoding after the delimiter has at most ``budget`` tokens, and that is not in ``taken``."""
    for first in range(start, len(words)):
        end = first
        while end < len(words) and len(tokenizer.encode(" " + " ".join(words[first : end + 1]))) <= budget:
            end += 1
        if end > first and " ".join(words[first:end]) not in taken:
            return " ".join(words[first:end])
    raise AssertionError(f"no choice of at most {budget} tokens in {words[start:]}")


def _items(tokenizer: Any, count: int = 60) -> list[dict[str, Any]]:
    from pydoc_data.topics import topics

    texts = [topics[name].split() for name in sorted(topics)]
    texts = [words for words in texts if len(words) > 60]
    items = []
    for i in range(count):
        words, prompt_words = texts[i], 8 + i % 7
        text = " ".join(words[:prompt_words]) + {0: "\n", 1: " "}.get(i % 5, "")
        gold = i % len(BUDGETS)
        choices: list[str] = []
        for k in range(len(BUDGETS)):
            source, start = (words, prompt_words) if k == gold else (texts[(i + 7 * k + 3) % len(texts)], 20)
            choices.append(_choice(tokenizer, source, start, BUDGETS[(i + k) % len(BUDGETS)], choices))
        items.append({"text": text, "choices": choices, "gold": gold})
    return items


def _task_yaml(data: Path, bos_text: str) -> str:
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
description: {json.dumps(bos_text)}
doc_to_text: text
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def compared(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both scorers on the same 60 items and model: keeltune's records and metrics, lm-eval's results
    (with samples) and its token ids of each logged request."""
    from lm_eval.models.huggingface import HFLM

    from keeltune.config import TaskConfig
    from keeltune.distributed import ParallelEnv
    from keeltune.eval.harness import run_lm_eval
    from keeltune.eval.tasks import HFTaskModel, prepare_task, run_task
    from keeltune.sharding.model import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval_equality")
    tokenizer = load_tokenizer(str(assets["model"]))
    data = write_jsonl(root / f"{TASK}.jsonl", _items(tokenizer))
    include = root / "tasks"
    include.mkdir()
    (include / f"{TASK}.yaml").write_text(_task_yaml(data, tokenizer.bos_token))

    model = load_causal_lm(str(assets["model"])).eval()
    task = TaskConfig(name=TASK, path=str(data), kind="multiple_choice", format="text")
    prepared = prepare_task(task, tokenizer, max_length=model.config.max_position_embeddings)
    ours = run_task(
        HFTaskModel(model, None), prepared, tokenizer, ParallelEnv(), batch_size=8, bootstrap_iters=100
    )

    with pytest.MonkeyPatch.context() as env:  # effective where datasets/huggingface_hub are not imported yet
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        theirs = run_lm_eval(
            assets["model"], str(assets["model"]), [TASK], include_path=include, log_samples=True
        )
    encoder = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    samples = sorted(theirs["samples"][TASK], key=lambda s: s["doc_id"])
    their_ids = [[encoder._encode_pair(*arguments) for arguments in s["arguments"]] for s in samples]
    return {
        "prepared": prepared,
        "ours": ours,
        "theirs": theirs,
        "samples": samples,
        "their_ids": their_ids,
        "bos_id": tokenizer.bos_token_id,
    }


def test_same_tokens(compared: dict[str, Any]) -> None:
    """Every (context, continuation) lm-eval scored is, as token ids, the request keeltune scored: the BOS
    (from the description) included."""
    samples, prepared = compared["samples"], compared["prepared"]
    ours: dict[int, list[tuple[list[int], list[int]]]] = {}
    for index, context, continuation in prepared.requests:
        ours.setdefault(index, []).append((context, continuation))
    assert len(samples) == len(ours) == 60
    bos = compared["bos_id"]
    for sample, ids in zip(samples, compared["their_ids"], strict=True):
        assert all(context.startswith("<|bos|>") for context, _ in sample["arguments"])
        theirs = [(list(context), list(continuation)) for context, continuation in ids]
        assert theirs == ours[sample["doc_id"]], f"item {sample['doc_id']}"
        assert all(context[0] == bos and bos not in context[1:] for context, _ in theirs)


def test_loglikelihoods_and_accuracy_equal(compared: dict[str, Any]) -> None:
    samples, records = compared["samples"], compared["ours"].items
    by_index = {record["index"]: record for record in records}
    differences, disagreeing = [], 0
    for sample in samples:
        record = by_index[sample["doc_id"]]
        theirs = np.array([response[0] for response in sample["filtered_resps"]], dtype=np.float64)
        assert [r[0][0] for r in sample["resps"]] == theirs.tolist()
        differences.append(np.abs(theirs - np.array(record["loglikelihoods"])).max())
        assert sample["target"] == record["gold"]
        assert (sample["acc"], sample["acc_norm"]) == (record["acc"], record["acc_norm"]), (
            f"item {sample['doc_id']}: lm-eval {sample['acc'], sample['acc_norm']}, keeltune "
            f"{record['acc'], record['acc_norm']}"
        )
        disagreeing += record["acc"] != record["acc_norm"]
    assert max(differences) < TOLERANCE, max(differences)
    assert disagreeing >= 1, "no item where acc and acc_norm disagree: the test would not tell them apart"

    results, metrics = compared["theirs"]["results"][TASK], compared["ours"].metrics
    for name in ("acc", "acc_norm"):
        assert results[f"{name},none"] == metrics[f"task/{TASK}/{name}"]
        assert results[f"{name}_stderr,none"] == pytest.approx(
            metrics[f"task/{TASK}/{name}_stderr"], rel=1e-9
        )


def test_flat_metrics_names(compared: dict[str, Any]) -> None:
    from keeltune.eval.harness import flat_metrics

    flat = flat_metrics(compared["theirs"])
    results = compared["theirs"]["results"][TASK]
    assert flat == {
        f"lm_eval/{TASK}/acc": results["acc,none"],
        f"lm_eval/{TASK}/acc_stderr": results["acc_stderr,none"],
        f"lm_eval/{TASK}/acc_norm": results["acc_norm,none"],
        f"lm_eval/{TASK}/acc_norm_stderr": results["acc_norm_stderr,none"],
    }
    assert flat_metrics({"results": {"t": {"alias": "t", "acc,none": 1, "acc_stderr,none": "N/A"}}}) == {
        "lm_eval/t/acc": 1.0
    }


def test_unknown_task_and_missing_include_path(tmp_path: Path) -> None:
    from keeltune.config import ConfigError
    from keeltune.eval.harness import run_lm_eval

    include = tmp_path / "tasks"
    include.mkdir()
    (include / "mine.yaml").write_text(_task_yaml(tmp_path / "none.jsonl", "").replace(TASK, "mine"))
    with pytest.raises(ConfigError, match=r"unknown task\(s\) nope: .*offers: mine"):
        run_lm_eval(tmp_path, "unused", ["nope"], include_path=include)
    with pytest.raises(ConfigError, match="is not a folder"):
        run_lm_eval(tmp_path, "unused", [TASK], include_path=tmp_path / "missing")


def test_harness_imports_lm_eval_lazily() -> None:
    """``keeltune.eval.harness`` imports lm-eval, torch and transformers only inside its functions."""
    tree = ast.parse((REPO / "keeltune" / "eval" / "harness.py").read_text())
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in top} & {"lm_eval", "torch", "transformers", "datasets"}
