"""Read raw records from JSONL, Parquet, plain text and ``datasets`` folders (``save_to_disk``).

Every reader yields ``(location, payload)``: the location names the file and line (``file:12``) or row
(``file#12``) for error messages; the payload is a record (dict) or, for JSONL, the raw line bytes, parsed in the
tokenizer workers so that JSON decoding runs on every core too.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}
HF_DISK_MARKERS = ("state.json", "dataset_dict.json")
EMPTY_FILE = "\0empty"  # stands for an empty file among the records, so it fails or is skipped like one


class DataError(ValueError):
    """Bad input data or prepared shards, with the file and line and what to do."""


def is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DISK_MARKERS)


def resolve_files(pattern: str, source_type: str) -> list[tuple[Path, str]]:
    """The files (or ``datasets`` folders) a source path names, sorted, each with its reader type.

    Folders are searched recursively, skipping hidden names; a ``datasets`` folder inside is read whole."""
    matches = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    found: list[tuple[Path, str]] = []
    for path in matches:
        found += _walk(path, source_type)
    if not found:
        wanted = "files" if source_type == "auto" else f"{source_type} files"
        raise DataError(
            f"{pattern}: no {wanted} found (known extensions: {', '.join(EXTENSIONS)}; a datasets folder "
            f"holds {' or '.join(HF_DISK_MARKERS)}); set the source's type when the extension says nothing"
        )
    return found


def _walk(path: Path, source_type: str) -> list[tuple[Path, str]]:
    if path.is_dir():
        if is_hf_disk(path) and source_type in ("auto", "hf_disk"):
            return [(path, "hf_disk")]
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        return [item for child in children for item in _walk(child, source_type)]
    kind = _file_type(path, source_type) if path.is_file() else None
    return [(path, kind)] if kind else []


def _file_type(path: Path, source_type: str) -> str | None:
    if source_type == "hf_disk":
        return None
    if source_type != "auto":
        return source_type
    return EXTENSIONS.get(path.suffix.lower())


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Raw non-blank lines; decoding happens later, where the error can name the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path}:{number}", raw


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path}#{row}", record
            row += 1


def read_text(path: Path) -> Iterator[tuple[str, Any]]:
    """A plain text file is one document."""
    raw = path.read_bytes()
    if raw.strip():
        yield str(path), {"\0text": raw}


def read_hf_disk(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    splits = sorted(loaded.items()) if isinstance(loaded, DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        where = f"{path}/{split}" if split else str(path)
        for row, record in enumerate(dataset):
            yield f"{where}#{row}", record


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text, "hf_disk": read_hf_disk}


def read_records(files: list[tuple[Path, str]]) -> Iterator[tuple[str, Any]]:
    """Every record of the files in order; an empty file is reported as a record that fails."""
    for path, kind in files:
        empty = True
        for item in READERS[kind](path):
            empty = False
            yield item
        if empty:
            yield str(path), EMPTY_FILE


def decode_payload(location: str, payload: Any, text_field: str) -> dict[str, Any]:
    """The record a payload stands for; raises DataError naming the location."""
    if payload == EMPTY_FILE:
        raise DataError(f"{location}: empty file (no records); remove it from the source")
    if isinstance(payload, bytes):
        try:  # utf-8-sig: a byte-order mark (editors on other systems write one) is not part of the record
            record = json.loads(payload.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise DataError(f"{location}: not UTF-8 ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{location}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        return record
    if "\0text" in payload:
        try:
            return {text_field: payload["\0text"].decode("utf-8-sig")}
        except UnicodeDecodeError as err:
            raise DataError(f"{location}: not UTF-8 ({err.reason} at byte {err.start})") from None
    return payload
