"""Files that appear whole or not at all (torch-free, imports nothing from keeltune).

Each write goes to a temporary name in the target's own folder, is fsynced, renamed over the target with
``os.replace`` and the folder fsynced: a reader sees the old content or the new, never a part, and once the call
returns the new content survives a crash of the machine. A write that fails leaves the old content and no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "fsync_folder", "write_atomically", "write_json_atomically"]


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make the entries of ``folder`` (a rename into it) durable. A filesystem that cannot sync folders (some
    network or FUSE filesystems answer EINVAL) is let be: the rename itself has happened."""
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """Every file and folder under ``path`` (a file: just it)."""
    if not path.is_dir() or path.is_symlink():
        _fsync_file(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_file(Path(root, name))
        fsync_folder(root)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``, not yet existing, for a writer to create a file (or a folder) at;
    when the block ends, fsync what it wrote, rename it to ``path`` and fsync the folder. When the block raises,
    the temporary file or folder is removed and ``path`` is left as it was. A folder can replace only a missing
    or empty one. ``fsync=False``: atomic but not durable (for a record rewritten often, e.g. a heartbeat)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_folder(final.parent)


def write_atomically(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = True) -> None:
    """Replace the file ``path`` with ``data`` (a str is written as UTF-8), whole or not at all. The file gets
    the permissions the umask gives a new file."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with open(descriptor, "wb") as handle:
            handle.write(payload)


def write_json_atomically(
    path: str | os.PathLike[str], value: Any, *, fsync: bool = True, **dumps_options: Any
) -> None:
    """``write_atomically`` of ``json.dumps(value, **dumps_options)``."""
    write_atomically(path, json.dumps(value, **dumps_options), fsync=fsync)
