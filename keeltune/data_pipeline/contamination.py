"""Contamination check, at prepare time: which evaluation items the training data already holds, word for word.

The unit is the **word**: a lowercased run of ASCII letters and digits (``[a-z0-9]+`` of the lowercased text;
punctuation, whitespace and other characters separate words and are dropped). An item's evidence is the set of
its distinct word ``n``-grams (``eval.contamination.n``, 8 by default); an item is *flagged* when the share of
them that occur anywhere in the training data exceeds ``eval.contamination.threshold``. An item of fewer than
``n`` words has no ``n``-gram and is reported as *unchecked*.

What is checked (each one an *item*):

* every item of every ``eval.tasks`` entry (the first ``max_items``, as evaluation reads them);
* every record of ``data.validation`` and of every ``data.retention`` set (held-out text, the same idea).

The words of an item are those of the strings the model reads or is scored against, in this order:

* the fields the task's (or set's) format renders: ``text``: the text field; ``instruction``: instruction,
  input and output (those present); ``chat`` / ``sharegpt``: every turn's content, in order (roles are not
  text). Other string fields (ids, sources, metadata) are not evidence;
* then, for a ``generate`` task, each reference answer not already among those strings, and for a
  ``multiple_choice`` task the gold choice only (the wrong choices are not evidence of memorisation).

The strings are read as one run of words, so an ``n``-gram may span a question and its answer: a training
record that holds both in the same order (in any format) matches it.

The training data is every record of every ``data.train`` source except ``generate`` ones (text drawn from the
base model when training starts, which does not exist at prepare time), read with its own format the same way
(the fields its format trains on, in order). It is streamed once past an index of the items' ``n``-grams:
memory grows with the items' ``n``-grams (and their vocabulary), never with the training data. Records that
do not decode are skipped here (prepare fails on them or lists them as rejects).

The report is written atomically to ``<prepared root>/contamination.json``; it records what it was computed
from (settings, and the size and modification time of every file), so a later call reuses it while those are
unchanged (``contamination_report``) and computes it again otherwise. See ``check_contamination`` for its format.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from keeltune.atomic import write_json_atomically
from keeltune.config import Config, FieldNames, SourceConfig, TaskConfig
from keeltune.data_pipeline.sources import DataError, decode_payload, read_records, resolve_files
from keeltune.data_pipeline.task_items import TaskItem, load_task_items

REPORT_FILE = "contamination.json"
REPORT_VERSION = 1  # bump when what the report holds or how it is computed changes: older reports are redone
UNIT = "word"
WORD = re.compile(r"[a-z0-9]+")
EXCERPT_CHARS = 160
CHUNK_IDS = 1 << 20  # training word ids hashed and looked up at once
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash of a window mod 2**64

log = logging.getLogger("keeltune")


# bytes.translate: every byte but a-z and 0-9 becomes a space. In UTF-8 every byte of a non-ASCII character is
# >= 128, so splitting the translated bytes gives exactly ``WORD.findall(text.lower())``, several times faster
_SEPARATE = bytes(c if chr(c) in "0123456789abcdefghijklmnopqrstuvwxyz" else 32 for c in range(256))


def _word_keys(text: str) -> list[bytes]:
    return text.lower().encode("utf-8", "surrogatepass").translate(_SEPARATE).split()


def words(text: str) -> list[str]:
    """The words of ``text``: lowercased runs of ASCII letters and digits (``WORD.findall(text.lower())``)."""
    return [word.decode("ascii") for word in _word_keys(text)]


def record_strings(record: dict[str, Any], fmt: str, fields: FieldNames) -> list[str]:
    """The strings of a record that its format renders, in order (missing or non-string fields are left out)."""
    if fmt == "text":
        values: list[Any] = [record.get(fields.text)]
    elif fmt == "instruction":
        values = [record.get(fields.instruction), record.get(fields.input), record.get(fields.output)]
    else:
        turns_field, content = (
            (fields.messages, fields.content) if fmt == "chat" else (fields.conversations, fields.value)
        )
        turns = record.get(turns_field)
        values = [t.get(content) for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    return [v for v in values if isinstance(v, str) and v]


def task_item_strings(task: TaskConfig, item: TaskItem) -> list[str]:
    """The strings of an evaluation item (see the module's docstring): its prompt fields, then the references
    not already among them (generate) or the gold choice (multiple_choice)."""
    strings = record_strings(item.record, task.format, task.fields)
    if task.kind == "multiple_choice":
        strings.append(item.choices[item.gold])
    else:
        strings += [r for r in item.references if r not in strings]
    return strings


@dataclasses.dataclass
class _Item:
    set_name: str
    index: int
    line: int | None
    where: str
    excerpt: str
    words: int


def _excerpt(strings: list[str]) -> str:
    text = " ".join(" ".join(strings).split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _line(where: str) -> int | None:
    """The line number of a JSONL location ``file:12`` (None for a Parquet row ``file#12`` or a whole file)."""
    head, _, tail = where.rpartition(":")
    return int(tail) if head and tail.isdigit() else None


def _source_records(source: SourceConfig) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(location, record) of every record of a source; None for one that does not decode."""
    for location, payload in read_records(resolve_files(source.path, source.type)):
        try:
            yield location, decode_payload(location, payload, source.fields.text)
        except DataError:
            yield location, None


def _held_out_sets(config: Config) -> list[tuple[str, str, SourceConfig]]:
    """(set name, kind, source) of the validation and retention sets, named as evaluation names them."""
    data = config.data
    sets = [("val", "validation", data.validation)] if data.validation else []
    return sets + [(f"retention/{s.name}", "retention", s) for s in data.retention]


def has_items(config: Config) -> bool:
    """Whether the config has anything to check: evaluation tasks, a validation or a retention set."""
    return bool(config.eval.tasks or config.data.validation or config.data.retention)


def report_path(config: Config) -> Path:
    return config.data.prepared_root(config.run_dir) / REPORT_FILE


# --------------------------------------------------------------------------- what the report depends on


def _file_stats(pattern: str, source_type: str) -> list[dict[str, Any]]:
    stats = []
    for path, kind in resolve_files(pattern, source_type):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found = [f.stat() for f in files]
        stats.append({
            "path": str(path), "type": kind, "size": sum(s.st_size for s in found),
            "mtime_ns": max((s.st_mtime_ns for s in found), default=0),
        })  # fmt: skip
    return stats


def _source_inputs(source: SourceConfig) -> dict[str, Any]:
    return {
        "name": source.name, "path": source.path, "type": source.type, "format": source.format,
        "fields": dataclasses.asdict(source.fields), "files": _file_stats(source.path, source.type),
    }  # fmt: skip


def _inputs(config: Config) -> dict[str, Any]:
    """Everything the report depends on: settings, and the size and modification time of every file read."""
    settings = config.eval.contamination
    tasks = []
    for task in config.eval.tasks:
        stat = Path(task.path).stat() if Path(task.path).is_file() else None
        tasks.append({
            "name": task.name, "path": task.path, "kind": task.kind, "format": task.format,
            "fields": dataclasses.asdict(task.fields), "max_items": task.max_items,
            "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None,
        })  # fmt: skip
    return {
        "version": REPORT_VERSION,
        "n": settings.n,
        "threshold": settings.threshold,
        "tasks": tasks,
        "held_out": {name: _source_inputs(source) for name, _, source in _held_out_sets(config)},
        "train": [_source_inputs(s) for s in config.data.train if s.generate is None],
    }


# --------------------------------------------------------------------------- the n-gram index


def _window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The polynomial hash (mod 2**64) of every window of ``n`` consecutive ids."""
    count = len(ids) - n + 1
    values = ids.astype(np.uint64)
    hashes = values[:count].copy()
    for k in range(1, n):
        hashes *= _MULTIPLIER
        hashes += values[k : k + count]
    return hashes


class _Index:
    """The distinct n-grams of the items (word ids, 0 for none), sorted by hash, and which item holds which.

    Two different n-grams of the same 64-bit hash (about one chance in 10**6 for 10**7 n-grams) count as one;
    a training window is only counted as found after its words are compared with the n-gram's."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.vocab: dict[bytes, int] = {}
        self.ids: list[int] = []  # every item's word ids, each item followed by a 0
        self.items: list[_Item] = []

    def add(self, item: _Item, strings: list[str]) -> None:
        vocab = self.vocab
        item_words = _word_keys(" ".join(strings))
        item.words = len(item_words)
        self.items.append(item)
        self.ids += [vocab.setdefault(w, len(vocab) + 1) for w in item_words]
        self.ids.append(0)

    def build(self) -> None:
        n, ids = self.n, np.asarray(self.ids, dtype=np.int64)
        owner = np.repeat(np.arange(len(self.items)), [i.words + 1 for i in self.items])
        valid = np.zeros(0, np.int64)
        if len(ids) >= n:
            zeros = np.concatenate([[0], np.cumsum(ids == 0)])
            starts = np.arange(len(ids) - n + 1)
            valid = np.nonzero(zeros[starts + n] == zeros[starts])[0]  # windows inside one item
        if not len(valid):  # every item shorter than n words
            self.hashes, self.table = np.zeros(0, np.uint64), np.zeros((0, n), np.int64)
            self.pair_item, self.pair_ngram = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            hashes, first, inverse = np.unique(
                _window_hashes(ids, n)[valid], return_index=True, return_inverse=True
            )
            windows = np.lib.stride_tricks.sliding_window_view(ids, n)
            self.hashes, self.table = hashes, np.ascontiguousarray(windows[valid[first]])
            pairs = np.unique(owner[valid].astype(np.int64) * len(hashes) + inverse.reshape(-1))
            self.pair_item, self.pair_ngram = pairs // len(hashes), pairs % len(hashes)
        # a bitmap of the hashes' top bits (16 or more bits per n-gram) answers most windows "no" at once:
        # the sorted search is left only the few it lets through
        bits = max(16, int(np.ceil(np.log2(16 * max(len(self.hashes), 1)))))
        self.shift = np.uint64(64 - bits)
        self.bitmap = np.zeros(1 << bits, dtype=bool)
        self.bitmap[self.hashes >> self.shift] = True
        self.ngrams = np.bincount(self.pair_item, minlength=len(self.items))
        self.found = np.zeros(len(self.hashes), dtype=bool)
        del self.ids

    def look_up(self, ids: list[int]) -> None:
        """Mark the indexed n-grams among the windows of ``ids`` (training word ids, 0 for unknown words)."""
        if len(ids) < self.n or not len(self.hashes):
            return
        array = np.asarray(ids, dtype=np.int64)
        hashes = _window_hashes(array, self.n)
        maybe = np.nonzero(self.bitmap[hashes >> self.shift])[0]
        where = np.minimum(np.searchsorted(self.hashes, hashes[maybe]), len(self.hashes) - 1)
        same_hash = self.hashes[where] == hashes[maybe]
        hits, ngram = maybe[same_hash], where[same_hash]
        if not len(hits):
            return
        windows = np.lib.stride_tricks.sliding_window_view(array, self.n)[hits]
        same = (windows == self.table[ngram]).all(axis=1)
        self.found[ngram[same]] = True

    def found_per_item(self) -> np.ndarray:
        weights = self.found[self.pair_ngram].astype(np.float64)
        return np.bincount(self.pair_item, weights=weights, minlength=len(self.items)).astype(np.int64)


# --------------------------------------------------------------------------- the check


def _index_items(config: Config, index: _Index) -> dict[str, dict[str, Any]]:
    """Add every task item and held-out record to ``index``; returns each set's entry of the report so far."""
    sets: dict[str, dict[str, Any]] = {}
    for task in config.eval.tasks:
        name = f"task/{task.name}"
        sets[name] = {"kind": "task", "name": task.name, "path": task.path}
        for item in load_task_items(task):
            strings = task_item_strings(task, item)
            where = f"{task.path}:{item.line}"
            index.add(_Item(name, item.index, item.line, where, _excerpt(strings), 0), strings)
    for name, kind, source in _held_out_sets(config):
        sets[name] = {"kind": kind, "name": source.name, "path": source.path, "unreadable": 0}
        number = 0
        for location, record in _source_records(source):
            if record is None:
                sets[name]["unreadable"] += 1
                continue
            strings = record_strings(record, source.format, source.fields)
            index.add(_Item(name, number, _line(location), location, _excerpt(strings), 0), strings)
            number += 1
    return sets


def _stream_training(config: Config, index: _Index) -> list[dict[str, Any]]:
    """Look every training record's windows up in ``index``; returns what was read, per source."""
    get, unknown, read = index.vocab.get, itertools.repeat(0), []
    for source in config.data.train:
        if source.generate is not None:
            read.append({"name": source.name, "skipped": "drawn from the base model when training starts"})
            continue
        counts = {"name": source.name, "path": source.path, "records": 0, "unreadable": 0, "words": 0}
        chunk: list[int] = []
        for _, record in _source_records(source):
            if record is None:
                counts["unreadable"] += 1
                continue
            counts["records"] += 1
            record_words = _word_keys("\n".join(record_strings(record, source.format, source.fields)))
            counts["words"] += len(record_words)
            chunk += map(get, record_words, unknown)
            chunk.append(0)
            if len(chunk) >= CHUNK_IDS:
                index.look_up(chunk)
                chunk = []
        index.look_up(chunk)
        read.append(counts)
    return read


def check_contamination(config: Config) -> dict[str, Any]:
    """Run the check, log a summary, write the report to ``<prepared root>/contamination.json`` (atomically; a
    folder that cannot be written is warned about) and return the report:

    ``{"unit": "word", "n", "threshold", "report": path, "seconds", "train": [per train source: name, path,
    records, unreadable, words; or name and why it was skipped], "sets": {set name: entry}, "inputs": {...}}``

    with a set named ``task/<task>``, ``val`` or ``retention/<set>``, and each entry ``{"kind": "task" |
    "validation" | "retention", "name", "path", "items", "checked", "unchecked", "unchecked_items": [item
    indices], "flagged", "flagged_items": [{"index", "line", "where", "share", "found", "ngrams",
    "excerpt"}]}`` (held-out sets also count their ``unreadable`` records). ``index`` is the item's position
    (a task item's index, a held-out record's position among the set's readable records), ``line`` its line
    in a JSONL file (null otherwise), ``where`` file and line (or row), ``share`` = ``found`` / ``ngrams``:
    the item's distinct n-grams found in the training data over all of them."""
    started = time.perf_counter()
    settings = config.eval.contamination
    inputs = _inputs(config)
    index = _Index(settings.n)
    sets = _index_items(config, index)
    index.build()
    train = _stream_training(config, index)
    found, ngrams = index.found_per_item(), index.ngrams
    for entry in sets.values():
        entry.update(items=0, checked=0, unchecked=0, unchecked_items=[], flagged=0, flagged_items=[])
    for item, hits, total in zip(index.items, found.tolist(), ngrams.tolist(), strict=True):
        entry = sets[item.set_name]
        entry["items"] += 1
        if total == 0:
            entry["unchecked"] += 1
            entry["unchecked_items"].append(item.index)
            continue
        entry["checked"] += 1
        share = hits / total
        if share > settings.threshold:
            entry["flagged"] += 1
            entry["flagged_items"].append({
                "index": item.index, "line": item.line, "where": item.where, "share": round(share, 4),
                "found": hits, "ngrams": total, "excerpt": item.excerpt,
            })  # fmt: skip
    path = report_path(config)
    report = {
        "unit": UNIT,
        "n": settings.n,
        "threshold": settings.threshold,
        "report": str(path),
        "seconds": round(time.perf_counter() - started, 3),
        "train": train,
        "sets": sets,
        "inputs": inputs,
    }
    _log_summary(report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, report, indent=1)
    except OSError as err:  # a prepared_dir shared read-only: the check still stands, it is not kept
        log.warning(
            "contamination report: cannot write %s (%s); the check runs again when the report is next asked for",
            path, err.strerror or err,
        )  # fmt: skip
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per task / held-out set: items, checked, unchecked, flagged, with the unit and n."""
    n, threshold = report["n"], report["threshold"]
    lines = []
    for name, entry in report["sets"].items():
        line = (
            f"contamination {name}: {entry['items']} items, {entry['checked']} checked, {entry['unchecked']} "
            f"unchecked (fewer than {n} words), {entry['flagged']} flagged (more than {threshold:.0%} of their "
            f"{report['unit']} {n}-grams in the training data)"
        )
        if entry["flagged_items"]:
            shown = ", ".join(str(i["index"]) for i in entry["flagged_items"][:10])
            more = f" and {entry['flagged'] - 10} more" if entry["flagged"] > 10 else ""
            line += f": items {shown}{more}"
        lines.append(line)
    return lines


def _log_summary(report: dict[str, Any]) -> None:
    read = [s for s in report["train"] if "records" in s]
    log.info(
        "contamination check: %s %d-grams (lowercased runs of letters and digits) of evaluation items looked up "
        "in %d train source(s), %d records, %d words, %.1f s; report in %s",
        report["unit"], report["n"], len(read), sum(s["records"] for s in read),
        sum(s["words"] for s in read), report["seconds"], report["report"],
    )  # fmt: skip
    for line, entry in zip(summary_lines(report), report["sets"].values(), strict=True):
        (log.warning if entry["flagged"] else log.info)("%s", line)


def read_report(config: Config) -> dict[str, Any] | None:
    """The report at the config's prepared root when it was computed from what the config reads now (same
    settings, same file sizes and modification times); None when missing, unreadable or stale."""
    try:
        report = json.loads(report_path(config).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("inputs") == _inputs(config) else None


def contamination_report(config: Config) -> dict[str, Any] | None:
    """The current report, computed (and written) when missing or stale; None when the config has nothing to
    check (no evaluation task, validation or retention set)."""
    config = config.whole_run_view()
    if not has_items(config):
        return None
    return read_report(config) or check_contamination(config)


def excluded_items(config: Config) -> dict[str, frozenset[int]]:
    """With ``eval.contamination.exclude``: the flagged item indices of every task, by task name (an empty set
    for a task with none), from the current report, which is computed first when missing or stale; ``{}``
    without ``exclude``. Several processes may call this at once: each writes the same report atomically."""
    if not config.eval.contamination.exclude or not config.eval.tasks:
        return {}
    report = contamination_report(config)
    assert report is not None
    return {
        task.name: frozenset(i["index"] for i in report["sets"][f"task/{task.name}"]["flagged_items"])
        for task in config.eval.tasks
    }
