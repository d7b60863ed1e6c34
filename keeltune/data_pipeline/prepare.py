"""Prepare once: read sources, format, tokenize on every core, pack into fixed-length samples, write shards.

Packing concatenates documents (each ending in EOS) and cuts the stream into samples of ``seq_len + 1``
tokens that overlap by one token, so every token is a target exactly once. Attention may cross document
boundaries inside a sample (as in most pretraining setups, and what every attention kernel supports): EOS
separates the documents and the model learns to ignore what precedes it.

A prepared folder holds ``shard-NNNNN.bin`` files (token ids ``[n, seq_len + 1]``, then the loss mask of the
same shape, uint8, then each sample's target bytes ``[n]``, uint32: the UTF-8 bytes of text its target tokens
(tokens ``1..seq_len`` whose mask is 1) stand for, which evaluation divides by for bits per byte) and
``index.json`` (format version, tokenizer fingerprint, counts (``num_target_bytes`` among them), and per shard its
sample count, byte size and sha256). Version 3 added the target bytes; older folders are refused. The folder is built under a temporary name, each shard written to a
temporary file, fsynced and renamed, the index last, then the folder is renamed into place: a crash or a full
disk leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from keeltune.atomic import atomic_path, fsync_folder, write_json_atomically
from keeltune.config import DataConfig, FieldNames, SourceConfig
from keeltune.data_pipeline.counterfactual import Augmenter, summary
from keeltune.data_pipeline.dedup import DedupPlan, dedup_plan, removed_digest
from keeltune.data_pipeline.formats import Document, encode_record, own_chat_template
from keeltune.data_pipeline.sources import DataError, decode_payload, read_records, resolve_files
from keeltune.data_pipeline.token_bytes import token_byte_lengths

FORMAT_VERSION = 3
FORMAT_CHANGE = "version 3 stores the target bytes that evaluation in bits per byte needs"
INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
CHUNK_RECORDS = 256
TARGETLESS_WARNING = 0.1  # prepare warns when more than this share of a set's samples have no target token

log = logging.getLogger("keeltune")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary, merges, special tokens and chat template (keeltune's own templates,
    which a trained model's tokenizer carries, render as the built-in formats: they count as none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    template = tokenizer.chat_template if own_chat_template(tokenizer) else None
    specials = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, template])
    return hashlib.sha256((payload + specials).encode()).hexdigest()[:16]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def tokenizer_files_digest(folder: str | Path) -> str:
    """A hash of a tokenizer folder's files: a check a login node makes without loading the tokenizer."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def check_prepared_for_launch(folder: Path, tokenizer_folder: str) -> str:
    """Before a job is queued: a prepared set must have a known format and this tokenizer's files (the job
    checks the full fingerprint and, lazily, the shard checksums). Returns "ready" or "to prepare in the job"."""
    index = read_index(folder)
    if index is None:
        return "to prepare in the job"
    check_index(folder, index, None)
    recorded = index.get("tokenizer_files")
    if recorded and recorded != tokenizer_files_digest(tokenizer_folder):
        raise DataError(
            f"{folder}: prepared with other tokenizer files than {tokenizer_folder}; run keeltune prepare CONFIG "
            "again (or point model.tokenizer at the tokenizer it was prepared with)"
        )
    return "ready"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def recipe(
    source: SourceConfig,
    seq_len: int,
    long_documents: str,
    long_prompts: str = "truncate",
    digests: bool = False,
    removed: np.ndarray | None = None,
) -> dict[str, Any]:
    """Everything the prepared samples depend on besides the tokenizer: settings (with the sha256 of a
    counterfactual swaps file), the input files (size, modification time, and with ``digests`` their sha256)
    and, when deduplication removes any, which records are left out (``dedup_removed``: their count and a hash
    of their numbers; absent when none are, as in sets prepared before deduplication existed)."""
    files = []
    for path, kind in resolve_files(source.path, source.type):
        stats = {"path": str(path), "type": kind, **_file_stat(path)}
        files.append({**stats, "sha256": file_digest(path)} if digests else stats)
    settings = {k: v for k, v in dataclasses.asdict(source).items() if k not in ("name", "weight")}
    swaps = source.counterfactual.swaps if source.counterfactual else ""
    if swaps:
        if not Path(swaps).is_file():
            raise DataError(
                f"{swaps}: the counterfactual swaps file of source {source.name!r} does not exist"
            )
        settings["counterfactual"]["swaps_sha256"] = file_digest(Path(swaps))
    if removed is not None and len(removed):
        settings["dedup_removed"] = removed_digest(removed)
    return {
        **settings, "seq_len": seq_len, "long_documents": long_documents, "long_prompts": long_prompts,
        "files": files,
    }  # fmt: skip


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _file_stat(path: Path) -> dict[str, int]:
    stats = [p.stat() for p in _files_of(path)]  # a datasets folder: all its files
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files in order."""
    digest = hashlib.sha256()
    for file in _files_of(path):
        with open(file, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _files_changed(now: list[dict[str, Any]], then: list[dict[str, Any]]) -> bool:
    """Other files, sizes, or contents. A file rewritten with the same bytes (a new mtime), or the same bytes
    at another path (a moved data folder, a copied run folder), is unchanged."""
    if [(f["type"], f["size"]) for f in now] != [(f["type"], f["size"]) for f in then]:
        return True
    return any(
        (a["path"], a["mtime_ns"]) != (b["path"], b["mtime_ns"])
        and file_digest(Path(a["path"])) != b.get("sha256")
        for a, b in zip(now, then, strict=True)
    )


def _record_new_places(folder: Path, index: dict[str, Any], now: dict[str, Any]) -> None:
    """The index of a set whose unchanged source files moved: record where they are now, so that the next
    check does not hash them again (a read-only shared folder keeps the old record)."""
    files = [
        {**a, "sha256": b["sha256"]} for a, b in zip(now["files"], index["recipe"]["files"], strict=True)
    ]
    updated = {**index, "recipe": {**now, "files": files}}
    with contextlib.suppress(OSError):
        write_json_atomically(folder / INDEX_FILE, updated, indent=1)


# --------------------------------------------------------------------------- tokenizing (in worker processes)

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, fmt: str, fields: FieldNames, augment: Augmenter | None) -> None:
    _WORKER.update(tokenizer=tokenizer, fmt=fmt, fields=fields, augment=augment)


def _encode_chunk(chunk: list[tuple[str, Any]]) -> list[tuple[list[Document], str, str]]:
    """(documents, error message, counterfactual outcome) per (location, payload): one document per record,
    two for a record that gains a counterfactual twin, none for a bad record."""
    out: list[tuple[list[Document], str, str]] = []
    for location, payload in chunk:
        try:
            record = decode_payload(location, payload, _WORKER["fields"].text)
            records, outcome = _WORKER["augment"](record) if _WORKER["augment"] else ([record], "")
            documents = []
            for item in records:
                where = location if item is record else f"{location} (counterfactual twin)"
                document = encode_record(item, _WORKER["fmt"], _WORKER["fields"], _WORKER["tokenizer"], where)
                # arrays travel between processes far faster than lists
                ids, mask = np.asarray(document.ids, np.int32), np.asarray(document.loss_mask, np.uint8)
                documents.append(Document(ids, mask))
            out.append((documents, "", outcome))
        except DataError as err:
            out.append(([], str(err), ""))
    return out


def _chunks(records: Iterable[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    chunk: list[tuple[str, Any]] = []
    for item in records:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded(
    records: Iterable[tuple[str, Any]], tokenizer: Any, source: SourceConfig, workers: int
) -> Iterator[tuple[list[tuple[str, Any]], list[tuple[list[Document], str, str]]]]:
    """(chunk, results) in input order, tokenized (and augmented) by ``workers`` processes (inline for one)."""
    initargs = (tokenizer, source.format, source.fields, Augmenter.from_source(source))
    if workers == 1:
        _init_worker(*initargs)
        for chunk in _chunks(records, CHUNK_RECORDS):
            yield chunk, _encode_chunk(chunk)
        return
    # fork: workers inherit the tokenizer and need no importable __main__ (the tokenizer is used one text at a
    # time, so its own thread pool is not running when we fork); a bounded window of chunks in flight keeps
    # memory flat however large the source is
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        window: deque[tuple[list[tuple[str, Any]], Any]] = deque()
        for chunk in _chunks(records, CHUNK_RECORDS):
            window.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
            if len(window) >= 4 * workers:
                done, result = window.popleft()
                yield done, result.get()
        while window:
            done, result = window.popleft()
            yield done, result.get()


# --------------------------------------------------------------------------- packing and shard writing


class ShardWriter:
    """Packs documents into samples of ``seq_len + 1`` tokens and writes a shard every ``shard_samples``;
    ``token_bytes[id]`` is the UTF-8 bytes token ``id`` stands for (``token_byte_lengths``)."""

    def __init__(
        self,
        folder: Path,
        *,
        seq_len: int,
        shard_samples: int,
        dtype: np.dtype,
        pad_id: int,
        token_bytes: np.ndarray,
    ) -> None:
        self.folder, self.seq_len, self.shard_samples = folder, seq_len, shard_samples
        self.dtype, self.pad_id, self.token_bytes = dtype, pad_id, np.asarray(token_bytes, dtype=np.uint32)
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict[str, Any]] = []
        self.target_tokens = 0
        self.target_bytes = 0
        self.targetless_samples = 0  # samples without a single target token (prompt only)
        self.writing = REJECTS_FILE  # what is being written, for the message when the disk fills up

    def add(self, document: Document) -> None:
        self.ids.append(np.asarray(document.ids, dtype=self.dtype))
        self.masks.append(np.asarray(document.loss_mask, dtype=np.uint8))
        self.pending += len(document.ids)
        while self.pending >= self.shard_samples * self.seq_len + 1:
            self._cut(self.shard_samples)

    def finish(self) -> None:
        if self.pending > 1:  # one token left is only the overlap of the last sample
            self._cut(-(-(self.pending - 1) // self.seq_len))

    def _cut(self, count: int) -> None:
        ids, mask = np.concatenate(self.ids), np.concatenate(self.masks)
        length = count * self.seq_len + 1
        if len(ids) < length:  # the last shard: pad the tail, which is never a target
            ids = np.concatenate([ids, np.full(length - len(ids), self.pad_id, dtype=self.dtype)])
            mask = np.concatenate([mask, np.zeros(length - len(mask), dtype=np.uint8)])
        width = self.seq_len + 1
        tokens = np.lib.stride_tricks.sliding_window_view(ids[:length], width)[:: self.seq_len]
        losses = np.lib.stride_tricks.sliding_window_view(mask[:length], width)[:: self.seq_len]
        self._write(np.ascontiguousarray(tokens), np.ascontiguousarray(losses))
        self.writing = REJECTS_FILE
        self.ids, self.masks = [ids[length - 1 :]], [mask[length - 1 :]]
        self.pending = len(self.ids[0])

    def _write(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        name = self.writing = shard_name(len(self.shards))
        target_bytes = sample_target_bytes(tokens, mask, self.token_bytes)
        digest = hashlib.sha256()
        with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as handle:
            for array in (tokens, mask, target_bytes):
                data = memoryview(array).cast("B")
                digest.update(data)
                handle.write(data)
        self.target_tokens += int(mask[:, 1:].sum())
        self.target_bytes += int(target_bytes.sum())
        self.targetless_samples += int((mask[:, 1:].sum(axis=1) == 0).sum())
        self.shards.append(
            {"file": name, "samples": int(tokens.shape[0]),
             "bytes": tokens.nbytes + mask.nbytes + target_bytes.nbytes, "sha256": digest.hexdigest()}
        )  # fmt: skip


def sample_target_bytes(tokens: np.ndarray, mask: np.ndarray, token_bytes: np.ndarray) -> np.ndarray:
    """Per sample, the UTF-8 bytes of its target tokens (``1..seq_len`` whose mask is 1), uint32; in blocks of
    rows, so a large shard needs no gathered copy of itself."""
    out = np.empty(len(tokens), dtype=np.uint32)
    for start in range(0, len(tokens), 1024):
        rows = slice(start, start + 1024)
        out[rows] = (token_bytes[tokens[rows, 1:]] * mask[rows, 1:]).sum(axis=1)
    return out


def shorten_prompt(document: Document, seq_len: int, bos_id: int | None) -> Document | None:
    """A record whose prompt (the tokens before its first target) fills ``seq_len`` or more, with the prompt cut
    from the left (BOS kept) to leave the answer room: ``seq_len - min(answer, seq_len // 2)`` prompt tokens, so
    a short answer fits in one sample with its nearest context. None when the prompt is shorter (unchanged) or
    when the record has no target at all."""
    mask = np.asarray(document.loss_mask)
    if not mask.any():
        return None
    first = int(np.argmax(mask))
    if first < seq_len:
        return None
    keep = seq_len - min(len(mask) - first, seq_len // 2)
    ids = np.asarray(document.ids)
    head = 1 if bos_id is not None and int(ids[0]) == bos_id else 0
    start = first - (keep - head)
    return Document(np.concatenate([ids[:head], ids[start:]]), np.concatenate([mask[:head], mask[start:]]))


def _pack_records(
    files: list[tuple[Path, str]],
    source: SourceConfig,
    writer: ShardWriter,
    rejects: TextIO,
    *,
    tokenizer: Any,
    long_documents: str,
    long_prompts: str,
    workers: int,
    on_progress: Callable[[int, int], None] | None,
    removed: np.ndarray,
) -> dict[str, int]:
    """Tokenize every record (and its counterfactual twin) into ``writer`` but the ``removed`` record numbers
    (duplicates, sorted); bad ones fail or go to ``rejects``; records whose prompt fills the sequence are cut or
    dropped (``long_prompts``). Returns the counts (``records``: those tokenized, after deduplication)."""
    counts = {
        "records": 0, "documents": 0, "rejected": 0, "truncated": 0, "tokens": 0, "long_prompts_cut": 0,
        "long_prompts_dropped": 0, "dedup_removed": len(removed),
    }  # fmt: skip
    if source.counterfactual is not None:
        counts.update(counterfactual_twinned=0, counterfactual_unchanged=0)
    width = writer.seq_len + 1
    records = _without(read_records(files), removed)
    for chunk, results in _encoded(records, tokenizer, source, workers):
        for (location, payload), (documents, error, outcome) in zip(chunk, results, strict=True):
            counts["records"] += 1
            if error:
                if source.on_error == "fail":
                    raise DataError(f"{error} (or set on_error: skip on source {source.name!r})")
                counts["rejected"] += 1
                rejects.write(json.dumps({"where": location, "error": error, "raw": _raw(payload)}) + "\n")
                continue
            if outcome:
                counts[f"counterfactual_{outcome}"] += 1
            for document in documents:
                shortened = shorten_prompt(document, writer.seq_len, tokenizer.bos_token_id)
                if shortened is not None:
                    if long_prompts == "drop":
                        counts["long_prompts_dropped"] += 1
                        continue
                    counts["long_prompts_cut"] += 1
                    document = shortened
                if long_documents == "truncate" and len(document.ids) > width:
                    counts["truncated"] += 1
                    document = Document(document.ids[:width], document.loss_mask[:width])
                counts["documents"] += 1
                counts["tokens"] += len(document.ids)
                writer.add(document)
        if on_progress:
            on_progress(counts["records"], counts["tokens"])
    writer.finish()
    return counts


def _without(records: Iterable[tuple[str, Any]], removed: np.ndarray) -> Iterator[tuple[str, Any]]:
    """The records but those whose number (from 0) is in the sorted ``removed``: before the tokenizing pool
    sees them, so what is kept does not depend on the number of workers."""
    skip = iter(removed.tolist())
    next_skip = next(skip, -1)
    for number, item in enumerate(records):
        if number == next_skip:
            next_skip = next(skip, -1)
            continue
        yield item


def prepare_source(
    source: SourceConfig,
    out_dir: Path,
    *,
    tokenizer: Any,
    seq_len: int,
    long_documents: str = "split",
    long_prompts: str = "truncate",
    shard_samples: int = 8192,
    workers: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    removed: np.ndarray | None = None,
) -> dict[str, Any]:
    """Tokenize and pack ``source`` into shards in ``out_dir`` (replaced atomically); return the index.

    ``on_progress(records, tokens)`` is called as chunks complete. Bad records fail with file:line, or with
    ``on_error: skip`` are counted and written to ``rejects.jsonl`` in the folder (next to it, as
    ``<folder>.rejects.jsonl``, when no record was usable). ``removed``: the sorted numbers (from 0, in the
    order the source's files are read) of records left out, the duplicates ``dedup.dedup_plan`` found.
    """
    started = time.perf_counter()
    removed = np.zeros(0, np.int64) if removed is None else np.asarray(removed, np.int64)
    source_recipe = recipe(source, seq_len, long_documents, long_prompts, digests=True, removed=removed)
    files = [(Path(f["path"]), f["type"]) for f in source_recipe["files"]]
    dtype = np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a shared prepared_dir must stay readable
    writer = ShardWriter(
        tmp, seq_len=seq_len, shard_samples=shard_samples, dtype=dtype, pad_id=pad_id,
        token_bytes=token_byte_lengths(tokenizer),
    )  # fmt: skip
    try:
        with open(tmp / REJECTS_FILE, "w", encoding="utf-8") as rejects:
            counts = _pack_records(
                files, source, writer, rejects, tokenizer=tokenizer, long_documents=long_documents,
                long_prompts=long_prompts, workers=workers or os.cpu_count() or 1, on_progress=on_progress,
                removed=removed,
            )  # fmt: skip
        if writer.target_tokens == 0:
            kept = ""
            if counts["rejected"]:  # the rejects matter most now: keep them next to the folder
                rejects_path = out_dir.with_name(f"{out_dir.name}.{REJECTS_FILE}")
                os.replace(tmp / REJECTS_FILE, rejects_path)
                kept = f"; the rejected records and why are listed in {rejects_path}"
            raise DataError(
                f"data source {source.name!r} ({source.path}): no usable samples ({counts['records']} records, "
                f"{counts['rejected']} rejected, {counts['long_prompts_dropped']} dropped for a prompt longer "
                f"than data.seq_len, no unmasked tokens){kept}; fix the data before training"
            )
        if counts["rejected"]:
            log.warning(
                "%s: skipped %d bad record(s) of %d; they are listed in %s",
                source.name, counts["rejected"], counts["records"], out_dir / REJECTS_FILE,
            )  # fmt: skip
        else:
            (tmp / REJECTS_FILE).unlink()
        _warn_long_prompts(source, counts, seq_len, long_prompts)
        if source.counterfactual is not None:
            log.info(
                "%s: %s", source.name, summary(source.counterfactual, counts["records"],
                counts["counterfactual_twinned"], counts["counterfactual_unchanged"]),
            )  # fmt: skip
        index = {
            "format_version": FORMAT_VERSION,
            "name": source.name,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "tokenizer_files": tokenizer_files_digest(getattr(tokenizer, "name_or_path", "")),
            "recipe": source_recipe,
            "dtype": dtype.name,
            **{f"num_{key}": value for key, value in counts.items()},
            "num_samples": sum(s["samples"] for s in writer.shards),
            "num_target_tokens": writer.target_tokens,
            "num_target_bytes": writer.target_bytes,
            "num_targetless_samples": writer.targetless_samples,
            "shards": writer.shards,
            "seconds": round(time.perf_counter() - started, 3),
        }
        _warn_targetless(source, index)
        writer.writing = INDEX_FILE
        write_json_atomically(tmp / INDEX_FILE, index, indent=1)  # last: its rename syncs the folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_folder(out_dir.parent)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"{out_dir}: disk full while writing {writer.writing} ({err.strerror}); nothing was kept. Free "
                "space or point data.prepared_dir at a larger filesystem, then run keeltune prepare again"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _warn_long_prompts(source: SourceConfig, counts: dict[str, int], seq_len: int, policy: str) -> None:
    done = counts["long_prompts_cut"] or counts["long_prompts_dropped"]
    if done:
        log.warning(
            "%s: %d record(s) of %d have a prompt of %d tokens or more (data.seq_len): %s (data.long_prompts: %s)",
            source.name, done, counts["records"], seq_len,
            "prompt cut from the left, answer kept" if policy == "truncate" else "left out", policy,
        )  # fmt: skip


def _warn_targetless(source: SourceConfig, index: dict[str, Any]) -> None:
    """Samples without a target token cost a forward pass and teach nothing; many of them starve the batches."""
    share = index["num_targetless_samples"] / max(index["num_samples"], 1)
    if share > TARGETLESS_WARNING:
        log.warning(
            "%s: %d of %d samples (%.0f%%) have no target token (prompt only, masked out of the loss): long "
            "unanswered turns or prompts; a training step whose whole batch is such samples is refused",
            source.name, index["num_targetless_samples"], index["num_samples"], 100 * share,
        )  # fmt: skip


def _raw(payload: Any) -> str:
    if isinstance(payload, bytes):
        return payload.decode("utf-8", errors="backslashreplace").rstrip("\n")
    return repr(payload)[:2000]


# --------------------------------------------------------------------------- is it prepared, and current?


def read_index(folder: Path) -> dict[str, Any] | None:
    """The folder's index, None when the folder was never prepared."""
    try:
        return json.loads((folder / INDEX_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise DataError(f"{folder / INDEX_FILE}: corrupted index; run keeltune prepare again") from None


def check_index(folder: Path, index: dict[str, Any], fingerprint: str | None) -> None:
    """Refuse unknown format versions and shards made with another tokenizer, saying what to do."""
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise DataError(
            f"{folder}: prepared with format version {version}, this keeltune reads version {FORMAT_VERSION}"
            f"{f' ({FORMAT_CHANGE})' if older else ''}; run keeltune prepare CONFIG again (it replaces the folder)"
        )
    if fingerprint is not None and index.get("tokenizer_fingerprint") != fingerprint:
        raise DataError(
            f"{folder}: prepared with another tokenizer ({index.get('tokenizer') or 'unknown'}, fingerprint "
            f"{index.get('tokenizer_fingerprint')}) than the model's (fingerprint {fingerprint}); run "
            "keeltune prepare again with this config's model"
        )


STALE_NAMES = {"dedup_removed": "the duplicate records data.dedup removes"}


def staleness(
    folder: Path,
    source: SourceConfig,
    tokenizer: Any,
    seq_len: int,
    long_documents: str,
    long_prompts: str,
    removed: np.ndarray | None = None,
) -> str | None:
    """What differs between the prepared ``folder`` and the source now (None: current, "not prepared" when
    there is no index), ``removed`` the records deduplication leaves out now; another tokenizer or format
    version raises DataError."""
    index = read_index(folder)
    if index is None:
        return "not prepared"
    check_index(folder, index, tokenizer_fingerprint(tokenizer))
    now = recipe(source, seq_len, long_documents, long_prompts, removed=removed)
    then = index["recipe"]
    settings = [
        STALE_NAMES.get(k, k)
        for k in sorted(set(now) | set(then))
        if k not in ("files", "path") and now.get(k) != then.get(k)
    ]
    changed = settings + (["the source files"] if _files_changed(now["files"], then["files"]) else [])
    if changed:
        return f"changed since it was prepared: {', '.join(changed)}"
    if [f["path"] for f in now["files"]] != [f["path"] for f in then["files"]]:
        _record_new_places(folder, index, now)
    return None


def _prepare_one(
    source: SourceConfig, folder: Path, tokenizer: Any, data: DataConfig, progress: Any, removed: np.ndarray
) -> dict:
    task = progress.add_task(source.name, total=None) if progress else None

    def show(records: int, tokens: int) -> None:
        if progress:
            progress.update(task, description=f"{source.name}: {records:,} records, {tokens:,} tokens")

    index = prepare_source(
        source,
        folder,
        tokenizer=tokenizer,
        seq_len=data.seq_len,
        long_documents=data.long_documents,
        long_prompts=data.long_prompts,
        shard_samples=data.shard_samples,
        workers=data.prepare_workers,
        on_progress=show,
        removed=removed,
    )
    dropped = f" ({len(removed)} duplicates left out)" if len(removed) else ""
    log.info(
        "%s: %d records%s -> %d samples, %d target tokens in %d shard(s), %.1f s (%s)",
        source.name, index["num_records"], dropped, index["num_samples"], index["num_target_tokens"],
        len(index["shards"]), index["seconds"], folder,
    )  # fmt: skip
    return index


def prepare_sets(
    data: DataConfig,
    run_dir: Path,
    tokenizer: Any,
    *,
    refresh: bool,
    progress: Any = None,
    held_out_only: bool = False,
    dedup_over: DataConfig | None = None,
) -> list[tuple[str, Path, str]]:
    """Prepare every set of the config that is not prepared yet; ``refresh`` also re-prepares stale ones
    (``keeltune prepare``), otherwise a stale set is refused with what to do (``keeltune train``).

    ``held_out_only`` (``keeltune eval``): the validation and retention sets only; a set already prepared with
    another tokenizer stays untouched and this tokenizer's goes next to it (``<folder>-tokenizer-<id>``).
    ``progress``: a rich Progress to show records and tokens on. ``dedup_over``: the data whose train sources are
    deduplicated together (a staged run's, all its stages'), default ``data``. Returns (key, folder, what
    happened)."""
    done = []
    fingerprint = tokenizer_fingerprint(tokenizer)
    generated = {f"data.train.{i}" for i, s in enumerate(data.train) if s.generate is not None}
    plan = (
        None
        if held_out_only
        else dedup_plan(dedup_over or data, data.prepared_root(run_dir), announce=refresh)
    )
    for key, source, folder in data.prepared_sets(run_dir):
        removed = _removed(plan, key, source, generated)
        if key in generated and not Path(source.path).is_file():
            done.append((key, folder, "drawn from the base model when training starts"))
            continue
        if held_out_only:
            if key.startswith("data.train."):
                continue
            index = read_index(folder)
            if index is not None and index.get("tokenizer_fingerprint") != fingerprint:
                folder = folder.with_name(f"{folder.name}-tokenizer-{fingerprint[:12]}")
        try:
            problem = staleness(
                folder, source, tokenizer, data.seq_len, data.long_documents, data.long_prompts, removed
            )
        except DataError as err:  # another tokenizer or format version: only an explicit prepare replaces it
            if not refresh:
                raise
            problem = str(err)
        if problem is None:
            done.append((key, folder, "current"))
            continue
        if problem != "not prepared" and not refresh:
            raise DataError(
                f"{key} ({source.name}): the shards in {folder} are stale ({problem}); run keeltune prepare "
                "CONFIG to prepare them again"
            )
        _prepare_one(source, folder, tokenizer, data, progress, removed)
        done.append((key, folder, "prepared"))
    return done


def _removed(plan: DedupPlan | None, key: str, source: SourceConfig, generated: set[str]) -> np.ndarray:
    """The records deduplication leaves out of a set: only train sources read from files have any."""
    if plan is None or not key.startswith("data.train.") or key in generated:
        return np.zeros(0, np.int64)
    return plan.removed_from(source.name)
