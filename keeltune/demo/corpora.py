"""Offline demo corpora built from what ships with CPython.

* :func:`general_corpus` -- "general" prose: the language-reference topics of
  ``pydoc_data.topics`` (what ``help("for")`` shows), one document per topic,
  split by topic into train / retention / retention_test.
* :func:`instruction_dataset` -- a domain instruction set: short question /
  answer records about public functions, classes and methods of a fixed list
  of pure-Python standard-library modules, answered from their docstrings and
  ``inspect.signature``.

Everything is deterministic for a given CPython version: no randomness, no
network, no use of the salted built-in ``hash``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Fraction of the general corpus (in characters) held out in each evaluation split.
HELD_OUT_FRACTION = 0.12

# General-corpus documents are topics cut into pieces of at most this many characters.
CHUNK_CHARS = 3000

# Fraction of documented objects (by qualified name) whose records go to "val".
VAL_FRACTION = 0.06

# Pure-Python standard-library modules whose docstrings make the instruction set.
# Modules with import side effects, GUI or platform-specific dependencies are left out.
INSTRUCTION_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "genericpath",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.cookies",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "json.decoder",
    "json.encoder",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "mimetypes",
    "netrc",
    "ntpath",
    "numbers",
    "opcode",
    "operator",
    "optparse",
    "pathlib",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "quopri",
    "queue",
    "random",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "stringprep",
    "subprocess",
    "symtable",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
)

_MAX_DOC_CHARS = 700  # answers quote at most this much of a docstring
_MAX_SIGNATURE_CHARS = 240


# --------------------------------------------------------------------------- general corpus


def general_corpus(chunk_chars: int | None = CHUNK_CHARS) -> dict[str, list[str]]:
    """Return ``pydoc_data.topics`` texts as ``{"train", "retention", "retention_test"}`` documents.

    With ``chunk_chars`` set, each topic is cut at paragraph boundaries into
    documents of at most ``chunk_chars`` characters (a longer paragraph stays
    whole), and the chunks, visited in (topic name, position) order, each go to
    the split furthest below its target share of characters: every split then
    samples all parts of the reference evenly. With ``chunk_chars=None`` each
    topic is one document and whole topics are split (largest first, ties by
    name), so held-out topics are never seen, but the two held-out splits then
    differ a lot in difficulty. Documents keep their (topic, position) order.
    """
    from pydoc_data.topics import topics

    if chunk_chars is None:  # (key, text) in visiting order: largest topic first
        names = sorted(topics, key=lambda n: (-len(topics[n]), n))
        items = [((name, 0), _clean(topics[name])) for name in names]
    else:
        items = [
            ((name, i), chunk)
            for name in sorted(topics)
            for i, chunk in enumerate(_chunks(_clean(topics[name]), chunk_chars))
        ]
    targets = {
        "train": 1.0 - 2 * HELD_OUT_FRACTION,
        "retention": HELD_OUT_FRACTION,
        "retention_test": HELD_OUT_FRACTION,
    }
    filled = dict.fromkeys(targets, 0)
    members: dict[str, list[tuple[tuple[str, int], str]]] = {split: [] for split in targets}
    seen = 0
    for key, doc in items:
        seen += len(doc)
        split = max(targets, key=lambda s: targets[s] * seen - filled[s])  # first max wins ties: "train"
        filled[split] += len(doc)
        members[split].append((key, doc))
    return {split: [doc for _, doc in sorted(docs)] for split, docs in members.items()}


def _chunks(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most ``max_chars`` (single paragraphs may exceed it)."""
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + 2 + len(paragraph) > max_chars:
            chunks.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return chunks


def _clean(text: str) -> str:
    """Normalise whitespace: no trailing spaces, at most one blank line in a row."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


# --------------------------------------------------------------------------- instruction data


def instruction_dataset() -> dict[str, list[dict[str, str]]]:
    """Return ``{"train", "val"}`` instruction records about standard-library APIs.

    Each public, documented function, class or method gives up to three
    records: what it does (docstring's opening paragraphs), its signature, and
    a one-line summary with the module it lives in. An object's records all go
    to the same split, chosen by a stable hash of its qualified name.
    """
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    for qualname, obj, kind in _documented_objects():
        digest = hashlib.sha256(qualname.encode()).digest()
        split = "val" if int.from_bytes(digest[:8], "big") / 2**64 < VAL_FRACTION else "train"
        splits[split].extend(_records(qualname, obj, kind))
    return splits


def _documented_objects() -> Iterator[tuple[str, Any, str]]:
    """Yield ``(qualified name, object, kind)`` for public documented APIs, sorted and deduplicated."""
    seen: set[int] = set()
    for module_name in INSTRUCTION_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a module missing from this build of CPython
                continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__ or id(obj) in seen:
                continue
            if inspect.isfunction(obj):
                seen.add(id(obj))
                yield f"{module_name}.{name}", obj, "function"
            elif inspect.isclass(obj):
                seen.add(id(obj))
                yield f"{module_name}.{name}", obj, "class"
                for attr, member in sorted(vars(obj).items()):
                    if attr.startswith("_") or not inspect.isfunction(member) or id(member) in seen:
                        continue
                    seen.add(id(member))
                    yield f"{module_name}.{name}.{attr}", member, "method"


def _records(qualname: str, obj: Any, kind: str) -> list[dict[str, str]]:
    """The instruction records for one object; empty when it has no usable docstring."""
    doc = _doc_excerpt(obj, kind)
    if not doc:
        return []
    signature = _signature(qualname, obj)
    owner, _, name = qualname.rpartition(".")
    if kind == "method":  # "module.Class.method": the module is the owner's owner
        module, _, cls = owner.rpartition(".")
        short = f"{cls}.{name}"
    else:
        module, short = owner, name
    records = [
        {
            "instruction": f"What does the `{qualname}` {kind} do?",
            "input": "",
            "output": (f"`{signature}`\n\n" if signature else "") + doc,
        }
    ]
    if signature:
        records.append(
            {
                "instruction": f"Show the signature of `{qualname}`.",
                "input": "",
                "output": f"```python\n{signature}\n```",
            }
        )
    summary = doc.split("\n\n", 1)[0].replace("\n", " ")
    records.append(
        {
            "instruction": f"Which module provides `{short}`, and what is it for?",
            "input": "",
            "output": f"`{short}` is a {kind} in the `{module}` module. {summary}",
        }
    )
    return records


def _doc_excerpt(obj: Any, kind: str) -> str:
    """The docstring's opening paragraphs, cut at a paragraph boundary near ``_MAX_DOC_CHARS``."""
    raw = obj.__doc__ if kind != "class" else obj.__dict__.get("__doc__")
    if not isinstance(raw, str):
        return ""
    doc = _clean(inspect.cleandoc(raw))
    # Too short to learn from (e.g. ast.Or's "Or"), or showing a memory address.
    if len(doc.split()) < 3 or " at 0x" in doc:
        return ""
    paragraphs = doc.split("\n\n")
    kept = [paragraphs[0][:_MAX_DOC_CHARS]]
    for paragraph in paragraphs[1:]:
        if len("\n\n".join(kept)) + len(paragraph) + 2 > _MAX_DOC_CHARS:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


def _signature(qualname: str, obj: Any) -> str:
    """``qualname(params)`` or ``""`` when there is none, it is too long or not deterministic."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    if len(text) > _MAX_SIGNATURE_CHARS or "<" in text or not _reproducible(text):
        return ""
    return f"{qualname}{text}"


def _reproducible(text: str) -> bool:
    """False when ``text`` shows a memory address or this interpreter's paths (a ``sys.executable`` default)."""
    local = {sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.expanduser("~")}
    return " at 0x" not in text and not any(len(path) > 1 and path in text for path in local)


# --------------------------------------------------------------------------- files


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any] | str]) -> Path:
    """Write records as JSON lines (a plain string becomes ``{"text": ...}``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            row = {"text": record} if isinstance(record, str) else record
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
