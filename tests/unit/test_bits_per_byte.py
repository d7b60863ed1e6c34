"""Bits per byte: each token's bytes of text, the target bytes stored with every prepared sample, and held-out
evaluation's ``bpb`` against a direct computation (its rank independence: distributed/test_eval_exact.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from keeltune.config import SourceConfig, available_metrics, config_from_dict
from keeltune.config.sweep import logged_metrics
from keeltune.data_pipeline.prepare import prepare_source
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.data_pipeline.token_bytes import token_byte_lengths
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import evaluate, evaluate_sets, forgetting
from keeltune.sharding.model import load_tokenizer

NON_ASCII = [
    "Größe und Maß: naïve café, déjà vu — «quotes» and “curly” ones…",
    "日本語のテキスト、中文文本，한국어 텍스트 and emoji 🙂🚀 (four bytes each)",
    "Ελληνικά, русский текст, עברית, العربية\tand a tab\n\n  then two spaces   ",
    "\u00a0non-breaking\u200bzero-width \U0001f9ea and a lone combining e\u0301",
]


GENERAL = [topics[name] for name in sorted(topics)]  # the text the demo tokenizer was trained on


@pytest.fixture(scope="module")
def tokenizer(assets: dict):
    return load_tokenizer(str(assets["model"]))  # the demo's byte-level BPE, trained on the general texts


def test_token_bytes_add_up_to_the_texts_bytes_on_the_demo_tokenizer(tokenizer) -> None:
    lengths = token_byte_lengths(tokenizer)
    assert len(lengths) == len(tokenizer)
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert lengths[specials].tolist() == [0, 0, 0]
    texts = GENERAL + NON_ASCII
    assert sum(len(t.encode()) for t in texts) > 300_000
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert int(lengths[ids].sum()) == len(text.encode()), text[:60]
    # an added word counts its text, an added special token nothing, on a copy of the tokenizer
    # (a domain word with its leading space, added unnormalized, as model.extend_vocabulary adds them)
    extended = load_tokenizer(tokenizer.name_or_path)
    extended.add_tokens(["ZeRO-3", AddedToken(" sharded", normalized=False)])
    extended.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    lengths = token_byte_lengths(extended)
    text = "layers sharded by ZeRO-3 <|tool|> naïvely"
    ids = extended.encode(text, add_special_tokens=False)
    assert {extended.convert_tokens_to_ids(t) for t in ("ZeRO-3", " sharded", "<|tool|>")} <= set(ids)
    assert int(lengths[ids].sum()) == len(text.encode()) - len("<|tool|>")


def test_sentencepiece_pieces_count_their_space_marker_and_byte_fallback_as_one_byte() -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁w", "▁hello"]:
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "w"), ("▁", "hello")]
    backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    lengths = token_byte_lengths(tokenizer)
    text = "hello wörld"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁hello", "▁w", "<0xC3>", "<0xB6>", "r", "l", "d"]
    # the space marker SentencePiece puts before the first word counts too: one byte more than the text
    assert int(lengths[ids].sum()) == len(text.encode()) + 1
    assert lengths[[0, 1, 2]].tolist() == [0, 0, 0]


def _prepared(tokenizer, tmp_path: Path, texts: list[str]) -> tuple[PackedDataset, dict]:
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    index = prepare_source(
        SourceConfig(name="texts", path=str(source)),
        tmp_path / "out",
        tokenizer=tokenizer,
        seq_len=32,
        shard_samples=4,
        workers=1,
    )
    return PackedDataset(tmp_path / "out"), index


def test_prepared_samples_carry_their_target_bytes_and_bpb_is_nats_over_bytes(
    tokenizer, tmp_path: Path
) -> None:
    texts = [*NON_ASCII, *(t[:300] for t in GENERAL[:6])]
    dataset, index = _prepared(tokenizer, tmp_path, texts)
    assert index["format_version"] == 3 and len(index["shards"]) > 2
    ids, mask = dataset.get(np.arange(len(dataset)))
    lengths = token_byte_lengths(tokenizer)
    stored = dataset.target_bytes(np.arange(len(dataset))[::-1])[::-1]  # any order, across shards
    assert stored.tolist() == (lengths[ids[:, 1:]] * mask[:, 1:]).sum(axis=1).tolist()
    # every text byte is a target exactly once (BOS and EOS count none): the set's total is the texts' bytes
    assert int(stored.sum()) == index["num_target_bytes"] == dataset.num_target_bytes
    assert index["num_target_bytes"] == sum(len(t.encode()) for t in texts)

    generator = torch.Generator().manual_seed(0)
    # a "model" whose logits depend on the last token only
    table = torch.randn(len(tokenizer), len(tokenizer), generator=generator)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return table[batch]

    result = evaluate(logits, dataset, ParallelEnv(), micro_batch_size=3)
    nats = F.cross_entropy(
        table[torch.from_numpy(ids[:, :-1])].reshape(-1, len(tokenizer)),
        torch.from_numpy(ids[:, 1:]).reshape(-1),
        reduction="none",
    ).double()
    nats = float((nats * torch.from_numpy(mask[:, 1:]).reshape(-1).double()).sum())
    assert result.target_bytes == index["num_target_bytes"] and result.tokens == index["num_target_tokens"]
    # evaluation sums each micro-batch in float32, the direct sum here is over float64 tokens
    assert result.bpb == pytest.approx(nats / math.log(2) / index["num_target_bytes"], rel=1e-6)
    assert result.bpb == pytest.approx(
        result.loss * result.tokens / math.log(2) / result.target_bytes, rel=1e-12
    )
    partial = evaluate(logits, dataset, ParallelEnv(), micro_batch_size=3, max_samples=5)
    assert partial.target_bytes == int(stored[:5].sum())  # a capped eval divides by its own samples' bytes

    results = evaluate_sets(
        logits, {"val": dataset, "retention/docs": dataset}, ParallelEnv(), micro_batch_size=3
    )
    assert results["val/bpb"] == results["retention/docs/bpb"] == result.bpb
    assert set(results) == {f"{s}/{m}" for s in ("val", "retention/docs") for m in ("loss", "ppl", "bpb")}
    baseline = {**results, "retention/docs/bpb": results["retention/docs/bpb"] / 1.25}
    rises = forgetting(results, baseline)
    assert rises["retention/docs/forgetting_pct"] == 0.0
    assert rises["retention/docs/forgetting_bpb_pct"] == pytest.approx(25.0)


def test_bpb_metrics_may_be_watched_by_early_stopping_and_swept() -> None:
    config = config_from_dict(
        {
            "model": {"path": "."},
            "data": {
                "train": [{"name": "t", "path": "x.jsonl"}],
                "validation": {"name": "v", "path": "v.jsonl"},
                "retention": [{"name": "g", "path": "g.jsonl"}],
            },
            "regularization": {"early_stopping": {"patience": 2, "metric": "val/bpb"}},
        }
    )
    assert {"val/bpb", "retention/g/bpb"} <= set(available_metrics(config))
    assert {"retention/g/forgetting_pct", "retention/g/forgetting_bpb_pct"} <= set(logged_metrics(config))
