"""keeltune.atomic: a file (or folder) appears whole or not at all, and is fsynced with its folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keeltune import atomic
from keeltune.atomic import atomic_path, write_atomically, write_json_atomically


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync was called on: 'file:NAME' or 'folder:NAME'."""
    calls: list[str] = []
    real = os.fsync

    def record(descriptor: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        calls.append(f"{'folder' if path.is_dir() else 'file'}:{path.name}")
        real(descriptor)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_write_replaces_whole_and_syncs_file_then_folder(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    write_atomically(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert len(fsynced) == 4
    assert fsynced[0].startswith("file:.state.json.") and fsynced[0].endswith(".tmp")  # before the rename
    assert fsynced[1] == f"folder:{tmp_path.name}"  # after it
    assert os.listdir(tmp_path) == ["state.json"]


def test_json_and_the_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "records.json"
    old = os.umask(0o027)
    try:
        write_json_atomically(target, [{"a": 1}], indent=1)
    finally:
        os.umask(old)
    assert json.loads(target.read_text()) == [{"a": 1}]
    assert target.read_text() == json.dumps([{"a": 1}], indent=1)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # like a plain new file, not mkstemp's 0600


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "shard.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["shard.bin"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path / "config.yaml", "a: 1\n")
    assert os.listdir(tmp_path) == []


def test_no_fsync_is_still_atomic(tmp_path: Path, fsynced: list[str]) -> None:
    write_json_atomically(tmp_path / "rank0.json", {"beat": 1}, fsync=False)
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"beat": 1}
    assert fsynced == []


def test_a_folder_appears_whole_with_every_file_synced(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub" / "config.json").write_text("{}")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "sub",
        "sub/config.json",
        "weights.bin",
    ]
    assert {"file:weights.bin", "file:config.json", "folder:sub", f"folder:{tmp_path.name}"} <= set(fsynced)
    with pytest.raises(ValueError), atomic_path(tmp_path / "other") as tmp:
        tmp.mkdir()
        (tmp / "part").write_text("half")
        raise ValueError("copy failed")
    assert os.listdir(tmp_path) == ["model"]


def test_a_folder_that_cannot_be_synced_is_let_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def folders_unsupported(descriptor: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{descriptor}")).is_dir():
            raise OSError(22, "Invalid argument")
        real(descriptor)

    monkeypatch.setattr(os, "fsync", folders_unsupported)
    write_atomically(tmp_path / "jobs.json", "[]")
    assert (tmp_path / "jobs.json").read_text() == "[]"
