"""Domain vocabulary: which words become tokens, a tokenizer that round-trips with them, embedding rows started at
their pieces' mean, and the configs refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from keeltune.config import ConfigError, VocabularyConfig, config_from_dict
from keeltune.data_pipeline.vocabulary import add_tokens, check_extendable, learn_tokens, tokens_per_document
from keeltune.sharding.model import extend_embeddings, load_tokenizer


def _texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def test_the_words_that_save_most_tokens_become_tokens_and_text_round_trips(assets: dict) -> None:
    tokenizer = load_tokenizer(str(assets["model"]))
    texts = _texts()
    settings = VocabularyConfig(new_tokens=40, min_count=10, min_pieces=3)
    tokens = learn_tokens(tokenizer, texts[:50], settings)
    assert len(tokens) == 40
    assert learn_tokens(tokenizer, texts[:50], settings) == tokens  # deterministic
    savings = [t.count * (len(t.pieces) - 1) for t in tokens]
    assert savings == sorted(savings, reverse=True)
    for token in tokens:
        assert token.count >= 10 and len(token.pieces) >= 3
        assert tokenizer.encode(token.text, add_special_tokens=False) == token.pieces
    held_out = texts[50:]
    before = tokens_per_document(tokenizer, held_out)
    first = len(tokenizer)
    ids = add_tokens(tokenizer, tokens)
    assert ids == list(range(first, first + 40))
    assert tokens_per_document(tokenizer, held_out) < 0.97 * before  # fewer tokens on text it never saw
    for text in held_out:  # decoding stays exact
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    word = tokens[0].text
    assert tokenizer.encode(f"x{word} y", add_special_tokens=False).count(ids[0]) == 1


def test_too_rare_words_make_no_token(assets: dict) -> None:
    tokenizer = load_tokenizer(str(assets["model"]))
    assert learn_tokens(tokenizer, _texts()[:3], VocabularyConfig(new_tokens=10, min_count=10**6)) == []


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_at_the_mean_of_their_pieces_and_old_rows_stay(tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=50, tie_word_embeddings=tied,
        )
    )  # fmt: skip
    inputs = torch.tensor([[1, 5, 7, 9]])
    before = model(inputs).logits.detach()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    extend_embeddings(model, 50, [[5, 7], [1, 2, 3]])
    embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.shape[0] == output.shape[0] == model.config.vocab_size == 52
    assert torch.equal(embeddings[:50], old_in) and torch.equal(output[:50], old_out)
    assert torch.allclose(embeddings[50], old_in[[5, 7]].mean(0)) and torch.allclose(
        output[51], old_out[[1, 2, 3]].mean(0)
    )
    assert (output.data_ptr() == embeddings.data_ptr()) == tied
    assert torch.equal(
        model(inputs).logits[..., :50].detach(), before
    )  # the old vocabulary's logits unchanged


def test_a_model_with_spare_rows_uses_them_before_growing() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
    )
    extend_embeddings(model, 50, [[5, 7], [1, 2]])  # a tokenizer of 50 tokens, a padded vocabulary of 64 rows
    assert model.get_input_embeddings().weight.shape[0] == 64
    assert torch.allclose(
        model.get_input_embeddings().weight[51], model.get_input_embeddings().weight[[1, 2]].mean(0)
    )


def test_a_tokenizer_without_words_is_refused(assets: dict) -> None:
    tokenizer = load_tokenizer(str(assets["model"]))
    tokenizer.backend_tokenizer.pre_tokenizer = None
    with pytest.raises(ConfigError, match="has no pre-tokenizer, so it has no words to add"):
        check_extendable(tokenizer, "tok/")


def _config(**model: object) -> dict:
    return {
        "model": {"path": "/m", "extend_vocabulary": {"new_tokens": 100, **model}},
        "data": {"train": [{"name": "domain", "path": "/d.jsonl"}]},
        "training": {"max_steps": 8, "warmup_steps": 2},
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": {"min_pieces": 1}}, "model.extend_vocabulary.min_pieces: must be >= 2, got 1"),
        ({"model": {"new_tokens": -1}}, "model.extend_vocabulary.new_tokens: must be >= 0"),
        (
            {"model": {"sources": ["manuals"]}},
            "model.extend_vocabulary.sources.0: 'manuals' is no train source",
        ),
        (
            {"regularization": {"l2sp": {"weight": 0.1}}},
            "regularization.l2sp: not with model.extend_vocabulary",
        ),
        (
            {"regularization": {"ewc": {"weight": 0.1}}},
            "regularization.ewc: not with model.extend_vocabulary",
        ),
    ],
)
def test_impossible_vocabulary_settings_are_refused(change: dict, expected: str) -> None:
    raw = _config(**change.get("model", {}))
    if "regularization" in change:
        raw["regularization"] = change["regularization"]
        raw["data"]["retention"] = [{"name": "general", "path": "/g.jsonl"}]
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(raw)


def test_the_extended_base_is_what_the_job_trains(tmp_path: Path) -> None:
    raw = _config()
    raw["run"] = {"name": "r", "root": str(tmp_path)}
    config = config_from_dict(raw)
    extended = config.with_extended_base()
    assert extended.model.path == extended.model.tokenizer_path == str(tmp_path / "r" / "base_model")
    assert not extended.model.extend_vocabulary.enabled and extended.with_extended_base() is extended
    assert config_from_dict({**raw, "model": {"path": "/m"}}).with_extended_base().model.path == "/m"


@pytest.mark.parametrize("tied", [True, False])
def test_qlora_trains_the_new_rows_and_its_merged_export_carries_them(tmp_path: Path, tied: bool) -> None:
    import json

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from keeltune.sharding.qlora import build_lora_model, write_merged

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=52, tie_word_embeddings=tied,
        )
    ).save_pretrained(tmp_path)  # fmt: skip
    (tmp_path / "keeltune_vocabulary.json").write_text(json.dumps({"tokens": [{"id": 50}, {"id": 51}]}))
    config = config_from_dict(
        {
            "model": {"path": str(tmp_path)},
            "data": {"train": [{"name": "x", "path": "/x.jsonl"}]},
            "training": {"max_steps": 4, "warmup_steps": 1},
            "sharding": {"backend": "qlora"},
        }
    )
    model = build_lora_model(config, torch.device("cpu"))
    rows = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(rows) == (1 if tied else 2) and all("trainable_tokens_delta" in n for n in rows)
    with torch.no_grad():  # as if trained
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(1.0)
    write_merged(model, tmp_path / "merged", str(tmp_path), torch.float32)
    merged, base = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    for name in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        changed = (merged[name] - base[name]).abs().sum(1).nonzero().flatten().tolist()
        assert changed == [50, 51], name  # the new rows trained, the base's rows as they were
    assert ("lm_head.weight" in merged) == (not tied)  # a tied matrix is stored once
