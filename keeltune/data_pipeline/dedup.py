"""Duplicate training documents, found before tokenizing: which records ``keeltune prepare`` leaves out.

A *document* is one record of a ``data.train`` source read from files (``generate`` sources, drawn from the base
model when training starts, are not deduplicated; nor are validation and retention sets, whose overlap with the
training data is the contamination check's job). Its *text* is what its format trains on (``text``: the text;
``instruction``: instruction, input and output; ``chat``/``sharegpt``: ``role: content`` per turn), each part
with whitespace collapsed and lowercased, the parts joined by newlines. Records that do not decode take no part
(prepare fails on them or lists them as rejects).

The order is fixed: the train sources in config order, then the records of each source's files in order.
A document is removed when an EARLIER KEPT document is

* an **exact** copy: the same text (sha256), or
* a **near** copy: an LSH candidate (MinHash of the text's word ``shingle_words``-grams, datasketch, fixed seed;
  bands chosen for recall, ``lsh_bands``) whose estimated Jaccard similarity (the share of equal signature
  values) is >= ``threshold``; the kept copy named is the earliest such document.

Exact copies are settled first (16 bytes per document in memory); the near pass then compares the first copy of
each text. It runs in passes of ``max_index_docs`` documents: pass ``k`` indexes the kept documents among the
``k``-th block of documents (each compared with the block's kept documents before it) and then looks up every
later document not removed yet. A document is removed by the first block holding a kept document that matches
it, and there by the earliest one: exactly what one pass over everything decides, whatever ``max_index_docs``
(the MinHash signatures, ``num_perm`` x 4 bytes per document, wait in a temporary file next to the prepared
data). Nothing depends on the tokenizer or on ``data.prepare_workers``: prepare skips the removed records before
its tokenizing pool sees them.

The plan is written to ``<prepared root>/dedup.json`` (settings, per source counts, what it was computed from)
and ``dedup_removed.jsonl`` (one line per duplicate); a later call reuses them while the settings and the
files' sizes and modification times are unchanged.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from keeltune.atomic import atomic_path, write_json_atomically
from keeltune.config import DataConfig, DedupConfig, FieldNames, SourceConfig
from keeltune.data_pipeline.sources import DataError, decode_payload, read_records, resolve_files

REPORT_FILE = "dedup.json"
REMOVED_FILE = "dedup_removed.jsonl"
REPORT_VERSION = 1  # bump when how duplicates are found changes: older plans are computed again
SEED = 1  # the MinHash permutations: fixed, so a plan is the same on every machine and every run
NO_DOC = -1

log = logging.getLogger("keeltune")


def document_text(record: dict[str, Any], fmt: str, fields: FieldNames) -> str:
    """The normalised text of a record: the strings its format trains on, whitespace collapsed, lowercased,
    one line each (chat turns as ``role: content``). Missing or non-string fields are left out."""
    if fmt == "text":
        parts: list[Any] = [record.get(fields.text)]
    elif fmt == "instruction":
        parts = [record.get(fields.instruction), record.get(fields.input), record.get(fields.output)]
    else:
        turns_field, role, content = (
            (fields.messages, fields.role, fields.content)
            if fmt == "chat"
            else (fields.conversations, fields.speaker, fields.value)
        )
        turns = record.get(turns_field)
        parts = [
            f"{t.get(role)}: {t.get(content)}"
            for t in (turns if isinstance(turns, list) else [])
            if isinstance(t, dict) and isinstance(t.get(content), str)
        ]
    return "\n".join(" ".join(p.split()).lower() for p in parts if isinstance(p, str) and p)


def shingles(text: str, size: int) -> set[bytes]:
    """The distinct word ``size``-grams of ``text`` (a shorter text: its words as one shingle; none if empty)."""
    words = text.split()
    if len(words) <= size:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def train_sources(data: DataConfig) -> list[SourceConfig]:
    """The train sources that are deduplicated: those read from files, in config order."""
    return [s for s in data.train if s.generate is None]


def settings_of(dedup: DedupConfig) -> dict[str, Any]:
    """What the plan depends on among the settings (``max_index_docs`` changes memory only)."""
    return {k: v for k, v in dataclasses.asdict(dedup).items() if k != "max_index_docs"}


def _inputs(data: DataConfig) -> dict[str, Any]:
    """Everything the plan depends on: settings, and each source's files (size and modification time)."""
    sources = []
    for source in train_sources(data):
        files = []
        for path, kind in resolve_files(source.path, source.type):
            found = [
                p.stat()
                for p in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
            ]
            files.append({
                "path": str(path), "type": kind, "size": sum(s.st_size for s in found),
                "mtime_ns": max((s.st_mtime_ns for s in found), default=0),
            })  # fmt: skip
        sources.append({
            "name": source.name, "type": source.type, "format": source.format,
            "fields": dataclasses.asdict(source.fields), "files": files,
        })  # fmt: skip
    return {"version": REPORT_VERSION, "settings": settings_of(data.dedup), "sources": sources}


RECALL_AT_THRESHOLD = 0.95  # chance that a pair exactly at the threshold becomes an LSH candidate


def lsh_bands(dedup: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index: the longest bands (fewest chance candidates, which the
    signatures' comparison then weeds out) with which a pair whose similarity is the threshold shares a band
    with probability >= ``RECALL_AT_THRESHOLD`` (1 - (1 - t^r)^b; more similar pairs: more likely still).
    128 permutations at 0.8: 18 bands of 7 rows, 0.985 at the threshold, 0.004 at similarity 0.3."""
    for rows in range(dedup.num_perm // 2, 0, -1):
        bands = dedup.num_perm // rows
        if 1 - (1 - dedup.threshold**rows) ** bands >= RECALL_AT_THRESHOLD:
            return bands, rows
    return dedup.num_perm, 1


# --------------------------------------------------------------------------- reading: hashes and signatures


@dataclasses.dataclass
class _Documents:
    """Per document (in plan order): its source and record number, text hash, and whether it has words; the
    signatures and the locations wait in temporary files."""

    source: np.ndarray  # int32: position of the source in ``train_sources``
    record: (
        np.ndarray
    )  # int64: record number within the source (as prepare counts them, bad records included)
    digest: np.ndarray  # (n, 16) uint8: sha256 of the text, first 16 bytes
    has_words: np.ndarray  # bool
    signatures: np.ndarray | None  # (n, num_perm) uint32, memory-mapped; None when near is off
    locations: Path  # one line per document: where it is (file:line)
    offsets: np.ndarray  # int64: where each document's line starts in ``locations``
    records: list[int]  # records read per source, bad ones included


def _read_documents(sources: list[SourceConfig], dedup: DedupConfig, work: Path) -> _Documents:
    """One pass over the records: text hashes in memory (about 40 bytes per document), MinHash signatures and
    locations to files in ``work``."""
    minhash = None
    if dedup.near:  # datasketch (and scipy) only when near copies are looked for
        from datasketch import MinHash

        minhash = MinHash(num_perm=dedup.num_perm, seed=SEED)
    source_ids, record_ids, offsets = array.array("i"), array.array("q"), array.array("q")
    digests, has_words = bytearray(), bytearray()
    records = []
    signature_file, locations = work / "signatures.bin", work / "locations.txt"
    with open(signature_file, "wb") as signatures, open(locations, "wb") as where:
        for number, source in enumerate(sources):
            count = 0
            for location, payload in read_records(resolve_files(source.path, source.type)):
                count += 1
                try:
                    record = decode_payload(location, payload, source.fields.text)
                except DataError:
                    continue
                text = document_text(record, source.format, source.fields)
                source_ids.append(number)
                record_ids.append(count - 1)
                digests += hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]
                has_words.append(bool(text))
                offsets.append(where.tell())
                where.write(location.replace("\n", " ").encode("utf-8", "backslashreplace") + b"\n")
                if minhash is not None:
                    minhash.clear()
                    minhash.update_batch(shingles(text, dedup.shingle_words))
                    signatures.write(minhash.hashvalues.astype(np.uint32).tobytes())
            records.append(count)
    n = len(source_ids)
    mapped = None
    if dedup.near and n:
        mapped = np.memmap(signature_file, dtype=np.uint32, mode="r", shape=(n, dedup.num_perm))
    return _Documents(
        source=np.frombuffer(source_ids, np.int32) if n else np.zeros(0, np.int32),
        record=np.frombuffer(record_ids, np.int64) if n else np.zeros(0, np.int64),
        digest=np.frombuffer(bytes(digests), np.uint8).reshape(n, 16),
        has_words=np.frombuffer(bytes(has_words), np.bool_),
        signatures=mapped,
        locations=locations,
        offsets=np.frombuffer(offsets, np.int64) if n else np.zeros(0, np.int64),
        records=records,
    )


# --------------------------------------------------------------------------- deciding


def first_copies(digest: np.ndarray) -> np.ndarray:
    """For each document, the position of the first document with the same text hash (itself if first)."""
    if not len(digest):
        return np.zeros(0, np.int64)
    keys = np.ascontiguousarray(digest).view(np.dtype((np.void, digest.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


def near_matches(
    signatures: np.ndarray, eligible: np.ndarray, dedup: DedupConfig, bands: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, int]:
    """For each document, the earliest earlier KEPT eligible document it nearly copies (NO_DOC if none) and
    their estimated similarity, among the ``eligible`` documents, in passes of ``dedup.max_index_docs`` (see
    the module's docstring); and the number of passes."""
    from datasketch import LeanMinHash, MinHashLSH

    n = len(signatures)
    kept_by = np.full(n, NO_DOC, np.int64)
    similarity = np.zeros(n, np.float32)
    order = np.flatnonzero(eligible)
    block = dedup.max_index_docs
    passes = 0

    def match(lsh: MinHashLSH, i: int, sketch: LeanMinHash) -> bool:
        for j in sorted(lsh.query(sketch)):  # the earliest qualifying kept document
            estimate = float(np.count_nonzero(signatures[j] == sketch.hashvalues)) / dedup.num_perm
            if estimate >= dedup.threshold:
                kept_by[i], similarity[i] = j, estimate
                return True
        return False

    def sketch(i: int) -> LeanMinHash:
        return LeanMinHash(seed=SEED, hashvalues=np.asarray(signatures[i]), scheme="affine32")

    for start in range(0, len(order), block):
        passes += 1
        lsh = MinHashLSH(num_perm=dedup.num_perm, params=bands)
        for i in order[start : start + block].tolist():
            if kept_by[i] == NO_DOC:  # not matched by a kept document of an earlier block
                mine = sketch(i)
                if not match(lsh, i, mine):
                    lsh.insert(i, mine, check_duplication=False)
        if not lsh.is_empty():
            for i in order[start + block :].tolist():
                if kept_by[i] == NO_DOC:
                    match(lsh, i, sketch(i))
        del lsh
    return kept_by, similarity, passes


def _decide(docs: _Documents, dedup: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per document: the kept document it copies (NO_DOC: it is kept), whether exactly, the similarity; and
    the number of LSH passes."""
    n = len(docs.source)
    own = np.arange(n, dtype=np.int64)
    first = first_copies(docs.digest) if dedup.exact else own
    passes = 0
    near_by, near_similarity = np.full(n, NO_DOC, np.int64), np.zeros(n, np.float32)
    if dedup.near and n:
        eligible = (first == own) & docs.has_words
        near_by, near_similarity, passes = near_matches(docs.signatures, eligible, dedup, lsh_bands(dedup))
    # a copy of a text whose first copy a near match removed is, like that first copy, a near copy of the
    # match: the earliest kept document it matches, as one pass in order would find
    exact = first != own
    via_near = exact & (near_by[first] != NO_DOC)
    kept_by = np.where(via_near, near_by[first], np.where(exact, first, near_by))
    similarity = np.where(exact & ~via_near, 1.0, near_similarity[first]).astype(np.float32)
    return kept_by, exact & ~via_near, similarity, passes


# --------------------------------------------------------------------------- the plan and its report


@dataclasses.dataclass
class DedupPlan:
    """What prepare removes: per source name, the sorted record numbers left out (none with ``action:
    report``); and the report (``dedup.json``)."""

    removed: dict[str, np.ndarray]
    report: dict[str, Any]

    def removed_from(self, name: str) -> np.ndarray:
        return self.removed.get(name, np.zeros(0, np.int64))


class _Locations:
    """Where each document is, read back from the temporary file by line offset."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        self.handle, self.offsets = open(path, "rb"), offsets  # noqa: SIM115 (closed by close)

    def __getitem__(self, i: int) -> str:
        self.handle.seek(int(self.offsets[i]))
        return self.handle.readline().decode("utf-8").rstrip("\n")

    def close(self) -> None:
        self.handle.close()


def _write_duplicates(path: Path, docs: _Documents, names: list[str], found: tuple[np.ndarray, ...]) -> None:
    kept_by, exact, similarity = found
    where = _Locations(docs.locations, docs.offsets)
    try:
        with open(path, "w", encoding="utf-8") as out:
            for i in np.flatnonzero(kept_by != NO_DOC).tolist():
                k = int(kept_by[i])
                out.write(json.dumps({
                    "source": names[docs.source[i]], "index": int(docs.record[i]), "where": where[i],
                    "kept_source": names[docs.source[k]], "kept_index": int(docs.record[k]),
                    "kept_where": where[k], "kind": "exact" if exact[i] else "near",
                    "similarity": round(float(similarity[i]), 4),
                }) + "\n")  # fmt: skip
    finally:
        where.close()


def _counts(docs: _Documents, names: list[str], kept_by: np.ndarray, exact: np.ndarray, action: str) -> dict:
    count = len(names)
    duplicate = kept_by != NO_DOC
    kept_in = np.zeros((count, count), np.int64)  # [source of the copy, source of the kept document]
    np.add.at(kept_in, (docs.source[duplicate], docs.source[kept_by[duplicate]]), 1)
    exact_per = np.bincount(docs.source[duplicate & exact], minlength=count)
    near_per = np.bincount(docs.source[duplicate & ~exact], minlength=count)
    per_document = np.bincount(docs.source, minlength=count)
    return {
        name: {
            "records": docs.records[s],
            "documents": int(per_document[s]),
            "exact_duplicates": int(exact_per[s]),
            "near_duplicates": int(near_per[s]),
            "removed": int(exact_per[s] + near_per[s]) if action == "remove" else 0,
            "across_sources": int(kept_in[s].sum() - kept_in[s, s]),
            "kept_copy_in": {names[t]: int(kept_in[s, t]) for t in range(count) if kept_in[s, t]},
        }
        for s, name in enumerate(names)
    }


@contextlib.contextmanager
def _work_folder(root: Path) -> Iterator[str]:
    """A temporary folder for the signatures: next to the prepared data (where the space is), or in the
    system's temporary folder when that cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = tempfile.TemporaryDirectory(prefix=".dedup-", dir=root)
    except OSError:
        work = tempfile.TemporaryDirectory(prefix="keeltune-dedup-")
    with work as folder:
        yield folder


def compute_plan(data: DataConfig, root: Path) -> DedupPlan:
    """Find the duplicates of the train sources, write ``dedup.json`` and ``dedup_removed.jsonl`` to ``root``
    (a folder that cannot be written is warned about) and return the plan.

    ``dedup.json``: ``{"settings": {...data.dedup, "bands": [b, r], "seed"}, "sources": {name: {"records",
    "documents" (records that decode), "exact_duplicates", "near_duplicates", "removed", "across_sources"
    (duplicates whose kept copy is in another source), "kept_copy_in": {source: count}}}, "documents",
    "passes", "seconds", "removed_file", "inputs"}``; ``dedup_removed.jsonl``: one line per duplicate (removed,
    or only listed with ``action: report``), ``{"source", "index" (record number in the source, from 0),
    "where", "kept_source", "kept_index", "kept_where", "kind": "exact" | "near", "similarity"}``."""
    started = time.perf_counter()
    dedup, sources = data.dedup, train_sources(data)
    names = [s.name for s in sources]
    inputs = _inputs(data)
    with _work_folder(root) as work:
        docs = _read_documents(sources, dedup, Path(work))
        kept_by, exact, similarity, passes = _decide(docs, dedup)
        docs.signatures = None  # closes the memory map before its folder goes
        lines = Path(work) / REMOVED_FILE
        _write_duplicates(lines, docs, names, (kept_by, exact, similarity))
        report = {
            "settings": {**dataclasses.asdict(dedup), "bands": list(lsh_bands(dedup)), "seed": SEED},
            "sources": _counts(docs, names, kept_by, exact, dedup.action),
            "documents": len(docs.source),
            "passes": passes,
            "seconds": round(time.perf_counter() - started, 3),
            "removed_file": str(root / REMOVED_FILE),
            "inputs": inputs,
        }
        _write(root, report, lines)
    removed = {}
    if dedup.action == "remove":
        duplicate = kept_by != NO_DOC
        removed = {name: docs.record[duplicate & (docs.source == s)] for s, name in enumerate(names)}
    return DedupPlan(removed, report)


def _write(root: Path, report: dict[str, Any], lines: Path) -> None:
    try:
        with atomic_path(root / REMOVED_FILE) as tmp:
            shutil.copyfile(lines, tmp)
        write_json_atomically(root / REPORT_FILE, report, indent=1)  # last: it vouches for the other file
    except OSError as err:  # a prepared_dir shared read-only: the plan still stands, it is not kept
        log.warning(
            "dedup: cannot write %s (%s); the plan is computed again next time",
            root / REPORT_FILE, err.strerror or err,
        )  # fmt: skip


def read_plan(data: DataConfig, root: Path) -> DedupPlan | None:
    """The plan written to ``root`` when it was computed from what the config reads now; None otherwise."""
    try:
        report = json.loads((root / REPORT_FILE).read_text())
        if not isinstance(report, dict) or report.get("inputs") != _inputs(data):
            return None
        removed: dict[str, list[int]] = {}
        if data.dedup.action == "remove":
            with open(root / REMOVED_FILE, encoding="utf-8") as lines:
                for line in lines:
                    entry = json.loads(line)
                    removed.setdefault(entry["source"], []).append(entry["index"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    return DedupPlan({name: np.asarray(found, np.int64) for name, found in removed.items()}, report)


def dedup_plan(data: DataConfig, root: Path, *, announce: bool = False) -> DedupPlan | None:
    """The current plan, computed and written when missing or stale; its summary is logged then, and with
    ``announce`` also when it was current (``keeltune prepare``). None when deduplication is off or no train
    source is read from files."""
    if not (data.dedup.exact or data.dedup.near) or not train_sources(data):
        return None
    plan = read_plan(data, root)
    fresh = plan is None
    if plan is None:
        plan = compute_plan(data, root)
    if fresh or announce:
        _log_summary(plan.report, fresh)
    return plan


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per source: records, exact and near duplicates, how many copy another source, removed."""
    lines = []
    for name, entry in report["sources"].items():
        line = (
            f"dedup {name}: {entry['records']} records, {entry['exact_duplicates']} exact and "
            f"{entry['near_duplicates']} near duplicates ({entry['across_sources']} of another source's records), "
            f"{entry['removed']} removed"
        )
        if report["settings"]["action"] == "report" and entry["exact_duplicates"] + entry["near_duplicates"]:
            line += " (data.dedup.action: report)"
        lines.append(line)
    return lines


def _log_summary(report: dict[str, Any], fresh: bool) -> None:
    for line in summary_lines(report):
        log.info("%s", line)
    how = "found in" if fresh else "as found before (settings and files unchanged) in"
    log.info(
        "dedup: %d documents, duplicates %s %d LSH pass(es), %.1f s; listed in %s",
        report["documents"], how, report["passes"], report["seconds"], report["removed_file"],
    )  # fmt: skip


def removed_digest(removed: np.ndarray) -> dict[str, Any]:
    """What a source's prepared samples depend on of the plan: how many and which records were removed."""
    digest = hashlib.sha256(np.asarray(removed, np.int64).tobytes()).hexdigest()
    return {"records": len(removed), "sha256": digest}
