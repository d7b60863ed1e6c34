"""Users' own bias probes, as JSONL files (one JSON object a line, blank lines skipped); every refusal names
the file and line.

Counterfactual pairs (scored by ``score_pairs``), one pair a line::

    {"axis": "gender", "stereotype": "My mother is a nurse.", "anti_stereotype": "My father is a nurse."}

with an optional ``"context"`` (a prefix both sentences continue, so only the sentences are scored) and an
optional ``"id"`` (kept in ``meta``).

Templates x descriptors (scored by ``score_templates``), templates and descriptor groups in one file::

    {"axis": "age", "template": "I have a friend who is {descriptor}."}
    {"axis": "age", "group": "young", "descriptors": ["a young person", "a teenager"]}
    {"axis": "age", "group": "old", "descriptors": ["an elderly person", "a retiree"]}

Each template of an axis gives one item per descriptor position (see ``template_items``) with one request per
group of that axis, in the file's order. Fields other than these are refused (a misspelt field would otherwise
be silently ignored)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from keeltune.eval.bias.builtin import ANTI_STEREOTYPE, PAIRS, SLOT, STEREOTYPE, template_items
from keeltune.eval.bias.items import ProbeError, ProbeItem

_PAIR_FIELDS = {"axis": True, "stereotype": True, "anti_stereotype": True, "context": False, "id": False}
_TEMPLATE_FIELDS = {"axis": True, "template": True}
_GROUP_FIELDS = {"axis": True, "group": True, "descriptors": True}


def _rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:line, object) for each non-blank line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ProbeError(f"{path}: cannot read the probe file: {error}") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ProbeError(f"{where}: not JSON: {error}") from error
        if not isinstance(row, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _fields(where: str, row: dict[str, Any], fields: dict[str, bool]) -> None:
    """Refuse a missing required field, an unknown field, and a field that is not a non-empty string (every
    field but ``descriptors``)."""
    unknown = sorted(set(row) - set(fields))
    if unknown:
        raise ProbeError(f"{where}: unknown field(s) {unknown}; expected {sorted(fields)}")
    for name, required in fields.items():
        if name not in row:
            if required:
                raise ProbeError(f"{where}: missing field {name!r}")
        elif name != "descriptors" and (not isinstance(row[name], str) or not row[name].strip()):
            raise ProbeError(f"{where}: field {name!r} must be a non-empty string")


def _axis(where: str, axis: str, known_axes: Collection[str] | None) -> str:
    if known_axes is not None and axis not in known_axes:
        raise ProbeError(f"{where}: unknown axis {axis!r}; known: {', '.join(sorted(known_axes))}")
    return axis


def read_pair_file(path: str | Path, known_axes: Collection[str] | None = None) -> list[ProbeItem]:
    """The counterfactual pairs of ``path``; a pair whose sentences are the same (up to whitespace) is
    refused, and so is an axis outside ``known_axes`` when given."""
    items = []
    for where, row in _rows(path):
        _fields(where, row, _PAIR_FIELDS)
        axis = _axis(where, row["axis"], known_axes)
        stereotype, anti = row["stereotype"], row["anti_stereotype"]
        if stereotype.split() == anti.split():
            raise ProbeError(f"{where}: a pair whose sentences do not differ: {stereotype!r}")
        context = row.get("context", "")
        items.append(
            ProbeItem(
                probe=PAIRS,
                axis=axis,
                requests=((context, stereotype), (context, anti)),
                roles=(STEREOTYPE, ANTI_STEREOTYPE),
                where=where,
                meta={"id": row["id"]} if "id" in row else {},
            )
        )
    if not items:
        raise ProbeError(f"{path}: no pairs in the file")
    return items


def read_template_file(path: str | Path, known_axes: Collection[str] | None = None) -> list[ProbeItem]:
    """The template items of ``path`` (template rows and descriptor-group rows, in any order), axis by axis in
    the order each axis first appears. Refused: a template without the ``{descriptor}`` slot, a group listed
    twice on an axis, empty descriptors, an axis with templates but fewer than two groups, groups for an axis
    without templates, and an axis outside ``known_axes`` when given."""
    templates: dict[str, list[tuple[str, str]]] = {}
    groups: dict[str, dict[str, list[str]]] = {}
    first_group: dict[str, str] = {}  # axis -> where its first group is, for groups without templates
    for where, row in _rows(path):
        if "template" in row:
            _fields(where, row, _TEMPLATE_FIELDS)
            if SLOT not in row["template"]:
                raise ProbeError(f"{where}: a template without the {SLOT} slot: {row['template']!r}")
            templates.setdefault(_axis(where, row["axis"], known_axes), []).append((where, row["template"]))
        elif "group" in row:
            _fields(where, row, _GROUP_FIELDS)
            axis, group, descriptors = _axis(where, row["axis"], known_axes), row["group"], row["descriptors"]
            if not isinstance(descriptors, list) or not descriptors:
                raise ProbeError(f"{where}: 'descriptors' must be a non-empty list of strings")
            if not all(isinstance(d, str) and d.strip() for d in descriptors):
                raise ProbeError(f"{where}: every descriptor must be a non-empty string, got {descriptors}")
            if group in groups.get(axis, {}):
                raise ProbeError(f"{where}: group {group!r} of axis {axis!r} is listed twice")
            groups.setdefault(axis, {})[group] = descriptors
            first_group.setdefault(axis, where)
        else:
            raise ProbeError(f"{where}: a row needs either a 'template' or a 'group' field")
    for axis, where in first_group.items():
        if axis not in templates:
            raise ProbeError(f"{where}: descriptor groups for axis {axis!r}, which has no template")
    if not templates:
        raise ProbeError(f"{path}: no templates in the file")
    items = []
    for axis, rows in templates.items():
        found = groups.get(axis, {})
        if len(found) < 2:
            raise ProbeError(
                f"{rows[0][0]}: axis {axis!r} has {len(found)} descriptor group(s); needs at least two"
            )
        items += template_items(axis, rows, found)
    return items
