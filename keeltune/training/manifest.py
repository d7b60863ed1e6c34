"""Checkpoint manifests (torch-free): each file's size and sha256, written last into the checkpoint.

A resume, ``keeltune export`` and ``keeltune eval`` check a checkpoint against its manifest before trusting it:
a file cut short, deleted or overwritten makes the checkpoint *damaged*. A damaged checkpoint of a run is moved
aside (``step_NNNNNNN.damaged``, with ``DAMAGED.json`` saying why) so that it is never resumed from again and
never counts towards ``keep_last``; the run falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from keeltune.run_folder import MANIFEST_FILE, checkpoint_root, complete_checkpoints

MANIFEST_VERSION = 1
DAMAGED_SUFFIX = ".damaged"
DAMAGE_NOTE = "DAMAGED.json"
_BLOCK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (damaged, none intact, or not written), with what to do."""


def checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in a checkpoint folder, the manifest itself excepted."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def deal(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """Files shared among ``ranks`` by size (largest first, each to the least loaded rank): who hashes what."""
    shares: list[list[str]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def describe(folder: Path, names: list[str], *, checksums: bool) -> dict[str, dict[str, Any]]:
    """Size (and sha256 with ``checksums``) of the named files of ``folder``."""
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        path = folder / name
        entries[name] = {"size": path.stat().st_size}
        if checksums:
            entries[name]["sha256"] = sha256_of(path)
    return entries


def write_manifest(folder: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """The manifest, written last into a checkpoint's temporary folder (which the caller fsyncs and renames)."""
    manifest = {"version": MANIFEST_VERSION, "step": step, "files": dict(sorted(files.items()))}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest's file table; None for a checkpoint written before manifests existed. Raises
    CheckpointError when the manifest itself is unreadable (that checkpoint is damaged)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all("size" in entry for entry in files.values()):
            raise ValueError("no file table")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{MANIFEST_FILE}: unreadable ({err})") from None
    return files


def check_files(
    folder: Path, expected: dict[str, dict[str, Any]], names: list[str], *, checksums: bool
) -> list[str]:
    """What is wrong with the named files of ``folder`` against the manifest entries (empty: intact)."""
    problems = []
    for name in names:
        path, entry = folder / name, expected[name]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != entry["size"]:
            problems.append(
                f"{name}: {size} bytes, the manifest says {entry['size']} (cut short or overwritten)"
            )
        elif checksums and "sha256" in entry and sha256_of(path) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest (the content changed)")
    return problems


def verify(folder: Path, *, checksums: bool) -> list[str] | None:
    """Check every file of a checkpoint in this process: the problems (empty: intact), or None for a checkpoint
    without a manifest (written before manifests existed: it cannot be verified)."""
    try:
        expected = read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]
    if expected is None:
        return None
    return check_files(folder, expected, sorted(expected), checksums=checksums)


def move_aside(folder: Path, problems: list[str]) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged`` (``.damaged-2``, ... when taken) with a note saying
    why; it no longer counts as a checkpoint. Returns the new path."""
    target = folder.with_name(folder.name + DAMAGED_SUFFIX)
    number = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{number}")
        number += 1
    os.replace(folder, target)
    note = {"checkpoint": folder.name, "problems": problems, "moved": round(time.time(), 3)}
    (target / DAMAGE_NOTE).write_text(json.dumps(note, indent=1))
    return target


def damaged_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """The notes of the checkpoints moved aside, oldest move first (each with its folder as ``path``)."""
    root = checkpoint_root(run_dir)
    notes = []
    for note in root.glob(f"step_*{DAMAGED_SUFFIX}*/{DAMAGE_NOTE}") if root.is_dir() else []:
        try:
            notes.append({**json.loads(note.read_text()), "path": str(note.parent)})
        except (OSError, ValueError):
            notes.append({"checkpoint": note.parent.name, "problems": ["(note unreadable)"], "moved": 0,
                          "path": str(note.parent)})  # fmt: skip
    return sorted(notes, key=lambda n: n.get("moved", 0))


def no_intact_checkpoint(run_dir: Path, damaged: list[str]) -> CheckpointError:
    """The refusal when a run has checkpoints but none is intact: never start over silently."""
    return CheckpointError(
        f"{run_dir}: no intact checkpoint to resume from; damaged and moved aside: {', '.join(damaged)} "
        f"(see {DAMAGE_NOTE} in each). Restore the checkpoints from a copy, or, to train this run again from "
        f"the base model, remove {checkpoint_root(run_dir)} (or start a new run with --set run.name=NEW_NAME)"
    )


def newest_intact(run_dir: Path, *, checksums: bool) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """In this process, without moving anything: the newest checkpoint that passes the check (or has no
    manifest), and the newer ones that failed it with their problems."""
    failed = []
    for folder in reversed(complete_checkpoints(run_dir)):
        problems = verify(folder, checksums=checksums)
        if not problems:
            return folder, failed
        failed.append((folder, problems))
    return None, failed


def checkpoint_to_read(run_dir: Path, step: int | None, *, checksums: bool) -> tuple[Path, list[str]]:
    """For ``keeltune export`` and ``eval``: the checkpoint of ``step`` (default: the newest intact one),
    checked against its manifest; nothing is moved. Returns it with warnings to show (damaged newer ones
    skipped, no manifest); raises CheckpointError when it is missing or damaged."""
    found = {int(p.name.removeprefix("step_")): p for p in complete_checkpoints(run_dir)}
    if not found:
        raise CheckpointError(f"{run_dir}: no complete checkpoint")
    if step is not None:
        if step not in found:
            raise CheckpointError(
                f"--checkpoint {step}: not in {run_dir}; complete checkpoints: {sorted(found)}"
            )
        problems = verify(found[step], checksums=checksums)
        if problems:
            raise CheckpointError(
                f"{found[step]} is damaged: {'; '.join(problems)}. Choose another with --checkpoint "
                f"(checkpoints: {sorted(found)})"
            )
        return found[step], [] if problems is not None else [_unverified(found[step])]
    checkpoint, failed = newest_intact(run_dir, checksums=checksums)
    notes = [f"skipped damaged {folder.name}: {'; '.join(problems)}" for folder, problems in failed]
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no intact checkpoint ({'; '.join(notes)})")
    if verify(checkpoint, checksums=False) is None:
        notes.append(_unverified(checkpoint))
    return checkpoint, notes


def _unverified(folder: Path) -> str:
    return f"{folder.name} has no {MANIFEST_FILE} (written by an older keeltune): not verified"
