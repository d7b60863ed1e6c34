"""Offline demo corpora built from what ships with CPython.

* :func:`general_corpus` -- "general" prose: the language-reference topics of
  ``pydoc_data.topics`` (what ``help("for")`` shows), one document per topic,
  split by topic into train / retention / retention_test.
* :func:`instruction_dataset` -- a domain instruction set: short question /
  answer records about public functions, classes and methods of a fixed list
  of pure-Python standard-library modules, answered from their docstrings and
  ``inspect.signature``.
* :func:`module_quiz` and :func:`docs_cloze` -- multiple-choice evaluation items: which module defines a
  name of the instruction set (domain), and how a held-out documentation passage goes on (retention).

Everything is deterministic for a given CPython version: no randomness, no
network, no use of the salted built-in ``hash``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import random
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
        splits[_split_of(qualname)].extend(_records(qualname, obj, kind))
    return splits


def _split_of(qualname: str) -> str:
    """The instruction split of an object's records: "val" for a stable ``VAL_FRACTION`` of the names."""
    return "val" if _stable(qualname) / 2**64 < VAL_FRACTION else "train"


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


# --------------------------------------------------------------------------- multiple-choice evaluation items

CHOICES = 4  # per multiple-choice item: chance is 1 / CHOICES
# Cloze items: chosen on the base model (the signal above chance, evaluation cost), not on any fine-tune. One
# next word (as LAMBADA) left the base ~29 points above chance where three-word phrases left it ~10, since a
# phrase's own frequency outweighs the passage; a longer passage did not help the tiny base and cost more.
CLOZE_CONTEXT_CHARS = 160  # a cloze item's passage: about this much text before the answer
CLOZE_ANSWER_WORDS = 1  # the words a cloze item asks for
CLOZE_GAP_WORDS = 8  # at least this many words between two cloze answers of one document
CONTAMINATION_N = (
    8  # a cloze item with any word 8-gram in the training text is left out (as the trainer checks)
)


def _stable(text: str) -> int:
    """A deterministic 64-bit number for ``text`` (the built-in ``hash`` is salted)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _balanced_golds(count: int, seed: str) -> list[int]:
    """``count`` gold positions, each position used equally often (to one), in a deterministic shuffle."""
    golds = [i % CHOICES for i in range(count)]
    random.Random(_stable(seed)).shuffle(golds)
    return golds


def _item(prompt: dict[str, str], gold: str, distractors: list[str], position: int) -> dict[str, Any]:
    choices = list(distractors)
    choices.insert(position, gold)
    return {**prompt, "choices": choices, "gold": position}


def module_quiz(count: int, instructions: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``count`` items "Which module defines `X`?" (``instruction`` format) about the instruction set's names.

    X is a public documented function or class of one of ``INSTRUCTION_MODULES`` whose records go to the
    instruction set's "train" split (so a fine-tune is taught the fact, as "`X` is a function in the `m`
    module. ..."), and no other module of the set has an attribute X (one right answer). The choices are
    that sentence's opening with the defining module and with three other modules of the set, drawn by a
    stable hash; the right one's position is balanced over the items. An item whose question text is one
    of ``instructions`` (the training data's) is left out: questions are held out, facts are not.
    """
    modules: dict[str, Any] = {}
    for module_name in INSTRUCTION_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                modules[module_name] = importlib.import_module(module_name)
            except ImportError:
                continue
    seen_instructions = set(instructions)
    candidates = []
    for qualname, obj, kind in _documented_objects():
        if kind == "method" or not _records(qualname, obj, kind) or _split_of(qualname) != "train":
            continue
        module_name, _, name = qualname.rpartition(".")
        question = f"Which module defines `{name}`?"
        if question in seen_instructions or sum(hasattr(m, name) for m in modules.values()) != 1:
            continue
        candidates.append((_stable(f"quiz:{qualname}"), qualname, module_name, name, kind, question))
    chosen = sorted(candidates)[:count]
    golds = _balanced_golds(len(chosen), "quiz-gold")
    items = []
    for (_, qualname, module_name, name, kind, question), position in zip(chosen, golds, strict=True):
        others = sorted(m for m in modules if m != module_name)
        picked = random.Random(_stable(f"quiz-distractors:{qualname}")).sample(others, CHOICES - 1)
        items.append(
            _item(
                {"instruction": question, "input": ""},
                f"`{name}` is a {kind} in the `{module_name}` module.",
                [f"`{name}` is a {kind} in the `{m}` module." for m in picked],
                position,
            )
        )
    return items


def _answer_pattern(words: int) -> re.Pattern[str]:
    """A space after a word, then the answer: ``words`` plain words on the same line, ending before a space or
    punctuation (a lookahead: every position is tried)."""
    return re.compile(r"(?<=\S) (?=((?:[A-Za-z]+ ){" + str(words - 1) + r"}[A-Za-z]+)(?:[\s.,;:!?)]|$))")


def docs_cloze(
    documents: list[str],
    training: list[str],
    count: int,
    *,
    answer_words: int = CLOZE_ANSWER_WORDS,
    context_chars: int = CLOZE_CONTEXT_CHARS,
) -> list[dict[str, Any]]:
    """``count`` cloze items (``text`` format) from held-out ``documents``: a passage, then which of four
    phrases of ``answer_words`` words (one: a word) comes next, scored after a space (lm-eval style).

    Answers are plain words on an unindented line of prose, at least ``CLOZE_GAP_WORDS`` words apart; the
    passage is the ~``context_chars`` characters before the answer, starting at a word. The three distractors
    are answers of other candidate items, from other documents (so frequent words are drawn more often). An
    item with any word ``CONTAMINATION_N``-gram (passage and answer) that occurs in ``training`` is left out (the
    documentation repeats whole passages across topics), as is one whose passage is too short to check; of the
    rest, ``count`` are kept by a stable hash, and the right one's position is balanced over the items.
    """
    seen = {gram for text in training for gram in _ngrams(text)}
    candidates = []  # (hash, document, context, answer)
    for number, document in enumerate(documents):
        last_word = -CLOZE_GAP_WORDS
        for match in _answer_pattern(answer_words).finditer(document):
            line_start = document.rfind("\n", 0, match.start()) + 1
            words_before = len(document[: match.start()].split())
            if (
                match.start() < context_chars // 2
                or document[line_start].isspace()
                or words_before - last_word < CLOZE_GAP_WORDS
            ):
                continue
            window = document[max(0, match.start() - context_chars) : match.start()]
            context = window if match.start() <= context_chars else window.split(None, 1)[-1]
            answer = match.group(1)
            grams = _ngrams(f"{context} {answer}")
            if len(grams) <= answer_words or any(gram in seen for gram in grams):
                continue
            last_word = words_before
            candidates.append((_stable(f"cloze:{number}:{match.start()}"), number, context.lstrip(), answer))
    chosen = sorted(candidates)[:count]
    golds = _balanced_golds(len(chosen), "cloze-gold")
    pool = sorted({(answer.lower(), number, answer) for _, number, _, answer in candidates})
    items = []
    for (key, number, context, answer), position in zip(chosen, golds, strict=True):
        rng = random.Random(key)
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            lowered, other_number, phrase = rng.choice(pool)
            if other_number != number and lowered not in {d.lower() for d in [answer, *distractors]}:
                distractors.append(phrase)
        items.append(_item({"text": context}, answer, distractors, position))
    return items


def _ngrams(text: str, n: int = CONTAMINATION_N) -> list[tuple[str, ...]]:
    """The word ``n``-grams of ``text`` (lowercased runs of letters and digits), in order."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


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
