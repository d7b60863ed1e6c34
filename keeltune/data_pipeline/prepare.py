"""Prepare once: read JSONL records, format, tokenize, pack into fixed-length samples, write an indexed folder.

Packing concatenates documents (each ending in EOS) and cuts the stream into samples of ``seq_len + 1``
tokens that overlap by one token, so every token is a target exactly once. Attention may cross document
boundaries inside a sample (as in most pretraining setups); the EOS token separates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """Bad input data, with the file and line."""


@dataclass(frozen=True)
class Document:
    """Token ids of one record and which of them count in the loss."""

    ids: list[int]
    loss_mask: list[int]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256((payload + specials).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); malformed lines raise with file:line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _field(record: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def encode_record(
    record: dict[str, Any], fmt: Literal["text", "instruction"], tokenizer: Any, where: str, text_field: str
) -> Document:
    """Tokenize one record; instruction prompts are masked out of the loss."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        ids = bos + tokenizer.encode(_field(record, text_field, where), add_special_tokens=False) + eos
        return Document(ids, [1] * len(ids))
    instruction = _field(record, "instruction", where)
    extra = _field(record, "input", where, required=False)
    output = _field(record, "output", where)
    template = PROMPT_TEMPLATE_WITH_INPUT if extra else PROMPT_TEMPLATE
    prompt = bos + tokenizer.encode(
        template.format(instruction=instruction, input=extra), add_special_tokens=False
    )
    answer = tokenizer.encode(output, add_special_tokens=False) + eos
    return Document(prompt + answer, [0] * len(prompt) + [1] * len(answer))


def pack(documents: list[Document], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents and cut into samples of seq_len + 1 tokens overlapping by one."""
    ids = np.fromiter((t for d in documents for t in d.ids), dtype=np.int64)
    mask = np.fromiter((m for d in documents for m in d.loss_mask), dtype=np.uint8)
    count = max(1, -(-(len(ids) - 1) // seq_len))
    width = seq_len + 1
    total = count * seq_len + 1
    ids = np.concatenate([ids, np.full(total - len(ids), pad_id, dtype=np.int64)])
    mask = np.concatenate([mask, np.zeros(total - len(mask), dtype=np.uint8)])
    starts = np.arange(count) * seq_len
    index = starts[:, None] + np.arange(width)[None, :]
    return ids[index], mask[index]


def prepare_jsonl(
    source: Path,
    out_dir: Path,
    *,
    tokenizer: Any,
    seq_len: int,
    fmt: Literal["text", "instruction"] = "text",
    text_field: str = "text",
) -> dict[str, Any]:
    """Tokenize and pack ``source`` into ``out_dir`` (written atomically); return the index."""
    documents = [
        encode_record(record, fmt, tokenizer, f"{source}:{number}", text_field)
        for number, record in read_jsonl(source)
    ]
    if not documents:
        raise DataError(
            f"{source}: no records (the file is empty); give a JSONL file with one object per line"
        )
    targets = sum(sum(d.loss_mask) for d in documents)
    if targets == 0:
        raise DataError(f"{source}: no tokens to learn from (every token is masked)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pack(documents, seq_len, pad_id)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    index = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "source_sha256": file_sha256(source),
        "format": fmt,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "num_documents": len(documents),
        "num_samples": int(ids.shape[0]),
        "num_target_tokens": int(mask[:, 1:].sum()),
        "dtype": np.dtype(dtype).name,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        np.save(tmp / "tokens.npy", ids.astype(dtype))
        np.save(tmp / "loss_mask.npy", mask)
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def prepared_is_current(out_dir: Path, source: Path, tokenizer: Any, seq_len: int, fmt: str) -> bool:
    """True when ``out_dir`` holds this source prepared with this tokenizer and length."""
    try:
        index = json.loads((out_dir / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (
        index.get("format_version") == FORMAT_VERSION
        and index.get("seq_len") == seq_len
        and index.get("format") == fmt
        and index.get("tokenizer_fingerprint") == tokenizer_fingerprint(tokenizer)
        and index.get("source_sha256") == file_sha256(source)
    )
