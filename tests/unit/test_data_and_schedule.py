"""Packing, prompt masking, the deterministic rank-partitioned stream, and the learning-rate schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from keeltune.data_pipeline.prepare import (
    DataError,
    Document,
    encode_record,
    pack,
    prepare_jsonl,
    prepared_is_current,
)
from keeltune.data_pipeline.reader import PackedDataset, TrainStream, eval_shard
from keeltune.sharding.model import load_tokenizer
from keeltune.training.schedule import lr_at


def test_pack_makes_every_token_a_target_exactly_once() -> None:
    docs = [Document(list(range(1, 8)), [1] * 7), Document(list(range(10, 15)), [0, 0, 1, 1, 1])]
    ids, mask = pack(docs, seq_len=4, pad_id=0)
    assert ids.shape == (3, 5)
    stream = list(range(1, 8)) + list(range(10, 15))
    targets = np.concatenate([row[1:] for row in ids])
    assert targets[: len(stream) - 1].tolist() == stream[1:]  # samples overlap by exactly one token
    assert mask[:, 1:].sum() == 7 - 1 + 3  # the first token is never a target; prompt tokens are masked
    assert ids[-1, -1] == 0 and mask[-1, -1] == 0  # the padded tail does not count


def test_instruction_prompt_is_masked_and_answer_is_learned(assets: dict) -> None:
    tokenizer = load_tokenizer(str(assets["model"]))
    doc = encode_record(
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        "instruction",
        tokenizer,
        "x:1",
        "text",
    )
    answer = tokenizer.encode("5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert sum(doc.loss_mask) == len(answer)
    assert doc.ids[-len(answer) :] == answer and doc.loss_mask[-len(answer) :] == [1] * len(answer)
    assert "### Input:\n2 and 3" in tokenizer.decode(doc.ids)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object, got list"),
        ('{"txt": "ok"}\n', "bad.jsonl:1: missing field 'text' (fields present: ['txt'])"),
        ('{"text": 5}\n', "bad.jsonl:1: field 'text' must be a string, got int"),
        (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: not UTF-8"),
        ("\n\n", "bad.jsonl: no records (the file is empty)"),
    ],
)
def test_bad_records_name_file_and_line(assets: dict, tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    tokenizer = load_tokenizer(str(assets["model"]))
    with pytest.raises(DataError) as err:
        prepare_jsonl(path, tmp_path / "out", tokenizer=tokenizer, seq_len=16)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_prepared_folder_records_tokenizer_and_source(assets: dict, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(assets["model"]))
    out = tmp_path / "prepared"
    index = prepare_jsonl(assets["task"], out, tokenizer=tokenizer, seq_len=32, fmt="instruction")
    assert index["num_documents"] == 120 and index["num_samples"] == len(PackedDataset([out]))
    assert prepared_is_current(out, assets["task"], tokenizer, 32, "instruction")
    assert not prepared_is_current(out, assets["task"], tokenizer, 64, "instruction")
    stale = json.loads((out / "index.json").read_text())
    stale["format_version"] = 99
    (out / "index.json").write_text(json.dumps(stale))
    with pytest.raises(DataError, match="format version 99"):
        PackedDataset([out])


def _dataset(tmp_path: Path, count: int) -> PackedDataset:
    folder = tmp_path / f"ds{count}"
    folder.mkdir()
    ids = np.repeat(np.arange(count, dtype=np.uint16)[:, None], 5, axis=1)
    np.save(folder / "tokens.npy", ids)
    np.save(folder / "loss_mask.npy", np.ones_like(ids, dtype=np.uint8))
    (folder / "index.json").write_text(json.dumps({"format_version": 1, "num_samples": count}))
    return PackedDataset([folder])


def _epoch_of(dataset: PackedDataset, world: int, steps: int, seed: int = 3, start: int = 0) -> list[int]:
    streams = [
        TrainStream(dataset, global_batch=12, rank=r, world_size=world, seed=seed) for r in range(world)
    ]
    seen = []
    for stream in streams:
        stream.load_state_dict({"consumed_samples": start, "seed": seed})
    for _ in range(steps):
        for stream in streams:
            ids, tokens, _ = stream.next_batch()
            assert (tokens[:, 0] == ids).all()
            seen.extend(ids.tolist())
    return seen


def test_stream_partitions_ranks_and_resumes_on_another_world_size(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 48)
    one_rank = _epoch_of(dataset, 1, 4)
    assert sorted(one_rank) == list(range(48))  # one epoch: every sample exactly once
    assert one_rank != list(range(48))  # shuffled
    assert _epoch_of(dataset, 1, 4) == one_rank  # deterministic
    two_ranks = _epoch_of(dataset, 2, 4)
    assert sorted(two_ranks) == list(range(48)) and two_ranks == one_rank  # same global order
    # resume after 2 steps (24 samples) on 3 ranks: the rest of the epoch, nothing repeated or skipped
    first_half = _epoch_of(dataset, 2, 2)
    rest = _epoch_of(dataset, 3, 2, start=24)
    assert sorted(first_half + rest) == list(range(48))
    assert _epoch_of(dataset, 1, 4, seed=4) != one_rank


def test_eval_shards_cover_every_sample_once(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 10)
    for world in (1, 2, 3, 4):
        parts = [eval_shard(dataset, r, world, None).tolist() for r in range(world)]
        assert sorted(sum(parts, [])) == list(range(10))
    assert sorted(sum((eval_shard(dataset, r, 3, 7).tolist() for r in range(3)), [])) == list(range(7))


def test_warmup_then_cosine() -> None:
    kwargs = {"lr": 1.0, "warmup_steps": 4, "max_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_at(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == 1.0
    assert lr_at(9, **kwargs) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(14, **kwargs) == pytest.approx(0.1)
    values = [lr_at(s, **kwargs) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
