"""Checkpoint manifests: what counts as damaged, how checkpoints are shared out for hashing, moving aside, and
what export/eval read (on checkpoint folders of plain files: the backends' own are damaged in e2e tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeltune.run_folder import complete_checkpoints
from keeltune.training.manifest import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_files,
    checkpoint_to_read,
    damaged_checkpoints,
    deal,
    describe,
    move_aside,
    newest_intact,
    verify,
    write_manifest,
)


def _checkpoint(run_dir: Path, step: int, *, manifest: bool = True) -> Path:
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    (folder / "zero").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "zero" / "rank1_optim.pt").write_bytes(b"o" * 700)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if manifest:
        write_manifest(folder, step, describe(folder, list(checkpoint_files(folder)), checksums=True))
    return folder


DAMAGE = {
    "cut in half": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1024]
    ),
    "deleted": lambda f: (f / "zero" / "rank1_optim.pt").unlink(),
    "garbage, same size": lambda f: (f / "trainer_state.json").write_text(
        "x" * len((f / "trainer_state.json").read_text())
    ),
    "manifest garbage": lambda f: (f / MANIFEST_FILE).write_text("{not json"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_damage_is_found_and_named(tmp_path: Path, kind: str) -> None:
    folder = _checkpoint(tmp_path, 5)
    assert verify(folder, checksums=True) == []
    DAMAGE[kind](folder)
    problems = verify(folder, checksums=True)
    assert problems, kind
    expected = {
        "cut in half": "model.safetensors: 1024 bytes, the manifest says 2048",
        "deleted": "zero/rank1_optim.pt: missing",
        "garbage, same size": "trainer_state.json: checksum differs",
        "manifest garbage": "manifest.json: unreadable",
    }[kind]
    assert any(expected in p for p in problems), problems
    # a size-only check still finds everything but a same-size overwrite
    assert bool(verify(folder, checksums=False)) == (kind != "garbage, same size")


def test_a_checkpoint_without_manifest_is_unverifiable_not_damaged(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path, 3, manifest=False)
    assert verify(folder, checksums=True) is None
    checkpoint, notes = checkpoint_to_read(tmp_path, None, checksums=True)
    assert checkpoint == folder and "no manifest.json" in notes[0] and "not verified" in notes[0]


def test_files_are_shared_out_by_size_so_each_rank_hashes_a_similar_amount() -> None:
    sizes = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10, "f": 10}
    shares = deal(sizes, 2)
    assert sorted(sum(shares, [])) == sorted(sizes)  # every file once
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert loads == [150, 150]
    assert deal(sizes, 1) == [sorted(sizes, key=lambda n: (-sizes[n], n))]
    assert [len(s) for s in deal({"x": 1}, 3)] == [1, 0, 0]


def test_moved_aside_checkpoints_no_longer_count_and_say_why(tmp_path: Path) -> None:
    older, newer = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    DAMAGE["cut in half"](newer)
    found, failed = newest_intact(tmp_path, checksums=True)
    assert found == older and [f for f, _ in failed] == [newer]
    aside = move_aside(newer, verify(newer, checksums=True))
    assert aside.name == "step_0000004.damaged" and not newer.exists()
    assert complete_checkpoints(tmp_path) == [older]  # never counted towards keep_last, never resumed
    notes = damaged_checkpoints(tmp_path)
    assert [n["checkpoint"] for n in notes] == ["step_0000004"]
    assert "model.safetensors: 1024 bytes" in notes[0]["problems"][0]
    again = _checkpoint(tmp_path, 4)
    DAMAGE["deleted"](again)
    assert move_aside(again, ["x"]).name == "step_0000004.damaged-2"  # the first note is kept


def test_export_and_eval_read_only_intact_checkpoints(tmp_path: Path) -> None:
    older, newer = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    DAMAGE["deleted"](newer)
    checkpoint, notes = checkpoint_to_read(tmp_path, None, checksums=True)
    assert checkpoint == older and "skipped damaged step_0000004: zero/rank1_optim.pt: missing" in notes[0]
    with pytest.raises(
        CheckpointError, match=r"step_0000004 is damaged: zero/rank1_optim.pt: missing.*\[2, 4\]"
    ):
        checkpoint_to_read(tmp_path, 4, checksums=True)
    with pytest.raises(CheckpointError, match=r"--checkpoint 3: not in .*complete checkpoints: \[2, 4\]"):
        checkpoint_to_read(tmp_path, 3, checksums=True)
    DAMAGE["cut in half"](older)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint_to_read(tmp_path, None, checksums=False)
    assert newer.exists() and older.exists()  # reading moves nothing (a job may be running)
