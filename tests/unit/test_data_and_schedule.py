"""Packing, prompt masking, bad input, prepared shards and their checks, and the learning-rate schedule."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import SourceConfig, config_from_dict
from keeltune.data_pipeline import prepare as prepare_module
from keeltune.data_pipeline.formats import encode_record
from keeltune.data_pipeline.prepare import DataError, prepare_sets, prepare_source, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.sharding.model import load_tokenizer
from keeltune.training.schedule import lr_at
from tests.conftest import REPO, base_config


@pytest.fixture(scope="module")
def tokenizer(assets: dict):
    return load_tokenizer(str(assets["model"]))


def _prepare(tokenizer, path: Path, out: Path, seq_len: int = 16, **source) -> dict:
    options = {
        k: source.pop(k)
        for k in ("long_documents", "long_prompts", "shard_samples", "workers")
        if k in source
    }
    return prepare_source(
        SourceConfig(name="src", path=str(path), **source),
        out,
        tokenizer=tokenizer,
        seq_len=seq_len,
        **{"workers": 1, **options},
    )


def _all_samples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = PackedDataset(folder)
    return dataset.get(np.arange(len(dataset)))


def test_packing_makes_every_token_a_target_exactly_once_across_shards(tokenizer, tmp_path: Path) -> None:
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(40)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    index = _prepare(tokenizer, source, tmp_path / "out", seq_len=16, shard_samples=5)
    assert len(index["shards"]) > 2 and all(s["samples"] == 5 for s in index["shards"][:-1])
    ids, mask = _all_samples(tmp_path / "out")
    stream = [t for text in texts for t in [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]]  # fmt: skip
    targets = np.concatenate([row[1:] for row in ids])
    assert (
        targets[: len(stream) - 1].tolist() == stream[1:]
    )  # samples overlap by one token, across shards too
    assert int(mask[:, 1:].sum()) == len(stream) - 1 == index["num_target_tokens"]
    assert (mask[-1, 1:][len(stream) - 1 - 16 * (len(ids) - 1) :] == 0).all()  # the padded tail never counts


def test_instruction_prompt_is_masked_and_answer_is_learned(tokenizer) -> None:
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    doc = encode_record(record, "instruction", SourceConfig(name="x", path="x").fields, tokenizer, "x:1")
    answer = tokenizer.encode("5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert sum(doc.loss_mask) == len(answer)
    assert doc.ids[-len(answer) :] == answer and doc.loss_mask[-len(answer) :] == [1] * len(answer)
    assert "### Input:\n2 and 3" in tokenizer.decode(doc.ids)


BAD_INPUTS = [
    ('{"text": "ok"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object, got list"),
    ('{"txt": "ok"}\n', "bad.jsonl:1: missing field 'text' (fields present: ['txt'])"),
    ('{"text": 5}\n', "bad.jsonl:1: field 'text' must be a string, got int"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8"),
    ("\n\n", "bad.jsonl: empty file (no records)"),
]


@pytest.mark.parametrize(("content", "message"), BAD_INPUTS)
def test_bad_records_fail_naming_file_and_line(tokenizer, tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        _prepare(tokenizer, path, tmp_path / "out")
    assert message in str(err.value) and "on_error: skip" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [path]  # no temporary left either


def test_skip_mode_counts_and_writes_rejected_lines(tokenizer, tmp_path: Path, caplog) -> None:
    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"text": "fine"}\n{"text": oops}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "b.jsonl").write_text("")  # an empty file in the same glob
    index = _prepare(tokenizer, tmp_path / "*.jsonl", tmp_path / "out", on_error="skip")
    assert index["num_records"] == 5 and index["num_documents"] == 2 and index["num_rejected"] == 3
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{good}:2", f"{good}:4", str(tmp_path / "b.jsonl")]
    assert rejects[0]["raw"] == '{"text": oops}' and "malformed JSON" in rejects[0]["error"]
    assert "skipped 3 bad record(s) of 5" in caplog.text


def test_zero_usable_samples_is_an_error_before_training_and_keeps_the_rejects(
    tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"txt": 1}\n{"txt": 2}\n')
    kept = tmp_path / "out.rejects.jsonl"
    with pytest.raises(DataError, match=r"'src' .*no usable samples \(2 records, 2 rejected") as err:
        _prepare(tokenizer, path, tmp_path / "out", on_error="skip")
    assert f"listed in {kept}" in str(err.value)
    assert not (tmp_path / "out").exists()
    rejects = [json.loads(line) for line in kept.read_text().splitlines()]  # when every record is bad
    assert [r["where"] for r in rejects] == [f"{path}:1", f"{path}:2"] and "missing field" in rejects[0][
        "error"
    ]


def test_a_byte_order_mark_is_accepted_and_prepared_folders_follow_the_umask(
    tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first line after a BOM"}\n{"text": "second"}\n')
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeffplain text after a BOM".encode())
    previous = os.umask(0o022)
    try:
        index = _prepare(tokenizer, path, tmp_path / "out")
        _prepare(tokenizer, text, tmp_path / "text")
    finally:
        os.umask(previous)
    assert index["num_documents"] == 2
    ids, _ = _all_samples(tmp_path / "text")
    assert "\ufeff" not in tokenizer.decode(ids[0])
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # colleagues can read a shared prepared_dir


def _long_prompt_records(tokenizer, path: Path, prompt_tokens: int) -> tuple[list[int], list[int]]:
    """A short record and one whose instruction alone is longer than the sequence; their answers' tokens."""
    words = " ".join(f"w{i}" for i in range(prompt_tokens))
    records = [
        {"instruction": "Short question?", "output": "short answer"},
        {"instruction": words, "output": "the long answer"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [
        tokenizer.encode(r["output"], add_special_tokens=False) + [tokenizer.eos_token_id] for r in records
    ]


def test_a_prompt_longer_than_the_sequence_is_cut_from_the_left_or_dropped(
    tokenizer, tmp_path: Path, caplog
) -> None:
    path = tmp_path / "long_prompts.jsonl"
    answers = _long_prompt_records(tokenizer, path, prompt_tokens=400)
    cut = _prepare(
        tokenizer, path, tmp_path / "cut", seq_len=64, long_prompts="truncate", format="instruction"
    )
    assert cut["num_long_prompts_cut"] == 1 and cut["num_documents"] == 2
    assert cut["num_targetless_samples"] == 0  # split, it would have made ~12 samples without a target
    ids, mask = _all_samples(tmp_path / "cut")
    learned = [
        int(t)
        for row_ids, row_mask in zip(ids, mask, strict=True)
        for t, m in zip(row_ids[1:], row_mask[1:], strict=True)
        if m
    ]
    assert learned == answers[0] + answers[1]  # both answers are learned, whole
    assert "1 record(s) of 2 have a prompt of 64 tokens or more" in caplog.text
    dropped = _prepare(
        tokenizer, path, tmp_path / "drop", seq_len=64, long_prompts="drop", format="instruction"
    )
    assert dropped["num_long_prompts_dropped"] == 1 and dropped["num_documents"] == 1
    assert dropped["num_target_tokens"] == len(answers[0])


def test_a_source_that_is_mostly_prompt_is_warned_about(tokenizer, tmp_path: Path, caplog) -> None:
    """A conversation that ends in a long unanswered turn: masked samples the prompt policy cannot fix."""
    long_turn = " ".join(f"w{i}" for i in range(600))
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": long_turn}]}  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    index = _prepare(tokenizer, path, tmp_path / "out", seq_len=32, format="chat")
    assert index["num_targetless_samples"] > 0.9 * index["num_samples"]
    assert f"{index['num_targetless_samples']} of {index['num_samples']} samples" in caplog.text
    assert "have no target token" in caplog.text


def test_long_documents_are_split_or_truncated(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    long_text = " ".join(f"word{i}" for i in range(200))
    path.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    doc_len = len(tokenizer.encode(long_text, add_special_tokens=False)) + 2
    split = _prepare(tokenizer, path, tmp_path / "split", long_documents="split")
    truncated = _prepare(tokenizer, path, tmp_path / "truncated", long_documents="truncate")
    short = len(tokenizer.encode("short one", add_special_tokens=False)) + 2
    assert split["num_tokens"] == doc_len + short and split["num_truncated"] == 0
    assert truncated["num_tokens"] == 17 + short and truncated["num_truncated"] == 1
    ids, _ = _all_samples(tmp_path / "truncated")
    assert ids[1, 1] == tokenizer.bos_token_id  # the short document follows the first 17 tokens of the long


def test_disk_full_while_writing_leaves_nothing_that_looks_complete(
    tokenizer, tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i} " * 20}) + "\n" for i in range(30)))
    written = {"bytes": 0}

    class FillingFile:
        """A file on a disk with 600 bytes free."""

        def __init__(self, handle) -> None:
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def write(self, data) -> int:
            written["bytes"] += len(data)
            if written["bytes"] > 600:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(prepare_module, "open", lambda *a, **k: FillingFile(open(*a, **k)), raising=False)  # noqa: SIM115
    with pytest.raises(DataError, match=rf"{tmp_path / 'out'}: disk full while writing shard-0000\d.bin"):
        _prepare(tokenizer, path, tmp_path / "out", shard_samples=2)
    assert written["bytes"] > 600  # some shards were complete before the disk filled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no folder, shard or index remains


def _prepared(tokenizer, assets: dict, tmp_path: Path) -> Path:
    config = config_from_dict(base_config(assets, tmp_path / "runs"))
    prepare_sets(config.data, config.run_dir, tokenizer, refresh=False)
    return config.run_dir / "data" / "train-task"


def test_reader_refuses_truncated_corrupted_foreign_and_unknown_shards(
    tokenizer, assets: dict, tmp_path
) -> None:
    folder = _prepared(tokenizer, assets, tmp_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert len(PackedDataset(folder, fingerprint=fingerprint, verify_checksums="once")) > 0
    shard = folder / "shard-00000.bin"
    original, stat = shard.read_bytes(), shard.stat()
    shard.write_bytes(original[:-10])
    with pytest.raises(
        DataError, match=r"shard-00000.bin: shard .* bytes instead of .*truncated.*prepare again"
    ):
        PackedDataset(folder)
    shard.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    os.utime(
        shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)
    )  # a later write, whatever the clock's grain
    assert len(PackedDataset(folder)) > 0  # the size is right; only the checksum finds it
    for mode in ("once", "always"):  # written since it was verified: "once" hashes it again
        with pytest.raises(DataError, match="checksum mismatch .*corrupted.*run keeltune prepare again"):
            PackedDataset(folder, verify_checksums=mode)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # silent bit rot: size and mtime unchanged
    assert (
        len(PackedDataset(folder, verify_checksums="once")) > 0
    )  # trusted: verified before, unchanged since
    with pytest.raises(DataError, match="checksum mismatch"):
        PackedDataset(folder, verify_checksums="always")
    shard.write_bytes(original)
    with pytest.raises(DataError, match="prepared with another tokenizer .*run keeltune prepare again"):
        PackedDataset(folder, fingerprint="0123456789abcdef")
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(
        DataError, match="format version 99, this keeltune reads version 3; run keeltune prepare CONFIG again"
    ):
        PackedDataset(folder)
    # a folder of the previous format (no target bytes): named, with why and the fix
    (folder / "index.json").write_text(json.dumps({**index, "format_version": 2}))
    with pytest.raises(DataError) as refused:
        PackedDataset(folder)
    assert str(refused.value) == (
        f"{folder}: prepared with format version 2, this keeltune reads version 3 (version 3 stores the target "
        "bytes that evaluation in bits per byte needs); run keeltune prepare CONFIG again (it replaces the folder)"
    )


def test_train_refuses_stale_shards_and_prepare_replaces_them(
    tokenizer, assets: dict, tmp_path: Path
) -> None:
    task = tmp_path / "task.jsonl"
    task.write_bytes(assets["task"].read_bytes())
    raw = base_config(assets, tmp_path / "runs")
    raw["data"]["train"][0]["path"] = str(task)
    config = config_from_dict(raw)

    def outcomes(data=config.data, tokenizer=tokenizer, refresh=False) -> list[str]:
        return [outcome for _, _, outcome in prepare_sets(data, config.run_dir, tokenizer, refresh=refresh)]

    assert outcomes() == ["prepared"] * 3 and outcomes() == ["current"] * 3
    task.write_bytes(task.read_bytes())  # rewritten with the same bytes: a new mtime, the same data
    assert outcomes() == ["current"] * 3
    original = task.read_bytes()
    task.write_bytes(original.replace(b"What", b"Whot", 1))  # same size, other content
    with pytest.raises(DataError, match=r"stale \(changed since it was prepared: the source files\)"):
        outcomes()
    task.write_bytes(original)
    moved = tmp_path / "moved" / "task.jsonl"  # the same data in another place (a moved or copied folder)
    moved.parent.mkdir()
    moved.write_bytes(original)
    elsewhere = copy.deepcopy(config.data)
    elsewhere.train[0].path = str(moved)
    assert outcomes(elsewhere) == ["current"] * 3
    index = json.loads((config.run_dir / "data" / "train-task" / "index.json").read_text())
    assert index["recipe"]["files"][0]["path"] == str(moved)  # recorded: not hashed again next time
    longer = config_from_dict({**raw, "data": {**raw["data"], "seq_len": 32}})
    with pytest.raises(DataError, match=r"data.train.0 \(task\): the shards in .*train-task are stale \(changed "
                       r"since it was prepared: seq_len\); run keeltune prepare CONFIG"):  # fmt: skip
        outcomes(longer.data)
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"  # another template is another tokenizer
    with pytest.raises(
        DataError, match=r"train-task: prepared with another tokenizer .*run keeltune prepare again"
    ):
        outcomes(tokenizer=other)
    assert outcomes(longer.data, refresh=True) == ["prepared"] * 3
    assert PackedDataset(config.run_dir / "data" / "train-task").width == 33


def test_warmup_then_cosine() -> None:
    kwargs = {"lr": 1.0, "warmup_steps": 4, "max_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_at(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kwargs) == 1.0
    assert lr_at(9, **kwargs) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(14, **kwargs) == pytest.approx(0.1)
    values = [lr_at(s, **kwargs) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


REAL_DISK_FULL = """
import json, os, sys
from pathlib import Path
from keeltune.config import SourceConfig
from keeltune.data_pipeline.prepare import DataError, prepare_source
from keeltune.sharding.model import load_tokenizer
disk, source, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    prepare_source(SourceConfig(name="src", path=source), disk / "out", tokenizer=load_tokenizer(model),
                   seq_len=64, shard_samples=4, workers=1)
    message = ""
except DataError as err:
    message = str(err)
print(json.dumps({"error": message, "left": sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))}))
"""


def test_a_really_full_disk_leaves_nothing_that_looks_complete(assets: dict, tmp_path: Path) -> None:
    """A 64 KiB tmpfs, mounted in a private user+mount namespace (no root needed), fills up during prepare."""
    disk = tmp_path / "disk"
    disk.mkdir()
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 60}) + "\n" for i in range(400)))
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1" "$4" "$5"'
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(disk),
            sys.executable,
            REAL_DISK_FULL,
            str(source),
            str(assets["model"]),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "disk full while writing" in result["error"] and str(disk / "out") in result["error"]
    assert result["left"] == []  # no shard, index or folder that could pass for prepared data
    assert not (disk / "out").exists()  # and nothing was written outside the namespace's tmpfs
