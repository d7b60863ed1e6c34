"""Counterfactual term swaps (he <-> she, Christian <-> Muslim, ...): keeltune's swap lists per axis, a user's
swaps file, the ``Swapper`` that exchanges whole-word terms both ways at once (also used by the consistency
regularizer, which aligns a text with its twin through ``Swapper.spans``), and the augmentation of a train
source's records that ``keeltune prepare`` runs (``Augmenter``)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from keeltune.config import CounterfactualConfig, FieldNames, SourceConfig
from keeltune.data_pipeline.sources import DataError

# Each term appears once per axis, so a swap is its own inverse. "him" is left out: "her" already maps to
# "his" (object "her" vs possessive "her" needs a parser). Race/ethnicity and disability have no swap list:
# their terms are also ordinary words ("black", "white", "hearing") that a whole-word swap would get wrong.
_SWAPS: dict[str, tuple[tuple[str, str], ...]] = {
    "gender": (
        ("he", "she"),
        ("his", "her"),
        ("himself", "herself"),
        ("man", "woman"),
        ("men", "women"),
        ("boy", "girl"),
        ("boys", "girls"),
        ("father", "mother"),
        ("fathers", "mothers"),
        ("son", "daughter"),
        ("sons", "daughters"),
        ("brother", "sister"),
        ("brothers", "sisters"),
        ("husband", "wife"),
        ("husbands", "wives"),
        ("uncle", "aunt"),
        ("uncles", "aunts"),
        ("nephew", "niece"),
        ("nephews", "nieces"),
        ("grandfather", "grandmother"),
        ("grandson", "granddaughter"),
        ("boyfriend", "girlfriend"),
        ("king", "queen"),
        ("male", "female"),
        ("gentleman", "lady"),
        ("gentlemen", "ladies"),
        ("dad", "mum"),
        ("stepfather", "stepmother"),
    ),
    "religion": (
        ("Christian", "Muslim"),
        ("Christians", "Muslims"),
        ("Christianity", "Islam"),
        ("church", "mosque"),
        ("Bible", "Quran"),
        ("Christmas", "Eid"),
        ("priest", "imam"),
        ("Jewish", "Hindu"),
        ("Jews", "Hindus"),
        ("Judaism", "Hinduism"),
        ("synagogue", "temple"),
        ("Hanukkah", "Diwali"),
        ("rabbi", "pandit"),
        ("Buddhist", "Sikh"),
        ("Buddhists", "Sikhs"),
        ("Buddhism", "Sikhism"),
        ("atheist", "believer"),
        ("atheists", "believers"),
    ),
    "nationality": (
        ("American", "Indian"),
        ("Americans", "Indians"),
        ("America", "India"),
        ("British", "Nigerian"),
        ("Britain", "Nigeria"),
        ("Chinese", "Mexican"),
        ("China", "Mexico"),
        ("German", "Brazilian"),
        ("Germans", "Brazilians"),
        ("Germany", "Brazil"),
        ("French", "Japanese"),
        ("France", "Japan"),
    ),
    "age": (
        ("old", "young"),
        ("older", "younger"),
        ("oldest", "youngest"),
        ("elderly", "youthful"),
        ("pensioner", "teenager"),
        ("pensioners", "teenagers"),
        ("retiree", "student"),
        ("eighty-year-old", "twenty-year-old"),
        ("grandmother", "granddaughter"),
        ("grandfather", "grandson"),
        ("grandparents", "grandchildren"),
    ),
}
SWAPS_FIELDS = ("term", "counterpart")
TWINNED, UNCHANGED = "twinned", "unchanged"  # Augmenter outcomes of a chosen record ("" when not chosen)


def swap_pairs(axis: str) -> list[tuple[str, str]]:
    """The axis's swap list: (term, counterpart), each term once."""
    if axis not in _SWAPS:
        raise ValueError(f"unknown swap axis {axis!r}; known: {', '.join(_SWAPS)}")
    return list(_SWAPS[axis])


def axes_pairs(axes: Sequence[str]) -> list[tuple[str, str]]:
    """The swap lists of ``axes`` combined; a pair with a term an earlier axis already swaps is left out
    (gender and age both list grandfather: the first of them named keeps it), so each term has one counterpart."""
    pairs, seen = [], set()
    for axis in axes:
        for term, counterpart in swap_pairs(axis):
            if term.lower() not in seen and counterpart.lower() not in seen:
                pairs.append((term, counterpart))
                seen |= {term.lower(), counterpart.lower()}
    return pairs


def read_swaps(path: str | Path) -> list[tuple[str, str]]:
    """The (term, counterpart) pairs of a JSONL swaps file (``{"term": "nurse", "counterpart": "doctor"}`` per
    line; blank lines skipped). Refusals name file:line: not JSON, a missing, unknown, non-string or empty field,
    a term that is its own counterpart, or one given another counterpart than before (swaps go both ways)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: swaps file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    pairs: list[tuple[str, str]] = []
    partner: dict[str, tuple[str, int]] = {}  # lower-case term -> (its counterpart, the line that said so)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        term, counterpart = _swap_line(line, where)
        if term.lower() == counterpart.lower():
            raise DataError(f"{where}: {term!r} is its own counterpart")
        for word, other in ((term, counterpart), (counterpart, term)):
            known, line_number = partner.get(word.lower(), (other, number))
            if known.lower() != other.lower():
                raise DataError(
                    f"{where}: {word!r} is swapped with {known!r} already (line {line_number}); a term has one "
                    "counterpart (each pair swaps both ways)"
                )
        if term.lower() not in partner:
            partner[term.lower()], partner[counterpart.lower()] = (counterpart, number), (term, number)
            pairs.append((term, counterpart))
    if not pairs:
        raise DataError(
            f'{path}: no swap pairs; write one JSON line per pair: {{"term": ..., "counterpart": ...}}'
        )
    return pairs


def _swap_line(line: str, where: str) -> tuple[str, str]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(entry, dict):
        raise DataError(
            f'{where}: expected an object {{"term": ..., "counterpart": ...}}, got {type(entry).__name__}'
        )
    unknown = sorted(set(entry) - set(SWAPS_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; a line has only {list(SWAPS_FIELDS)}")
    values = []
    for name in SWAPS_FIELDS:
        if name not in entry:
            raise DataError(f"{where}: missing field {name!r}")
        value = entry[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: empty {name!r}")
        values.append(value.strip())
    return values[0], values[1]


class Swapper:
    """Exchanges every whole-word term of its pairs with its counterpart, both ways at once, case-insensitively
    and longest term first ("old man" before "old"). Case follows the word replaced: all capitals stay all
    capitals (HE -> SHE), a capital first letter stays (He -> She); a lower-case word takes the listed spelling
    (so proper names keep their capital)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)
        self.mapping: dict[str, str] = {}
        for term, counterpart in self.pairs:
            for word, other in ((term, counterpart), (counterpart, term)):
                if self.mapping.setdefault(word.lower(), other).lower() != other.lower():
                    raise ValueError(
                        f"{word!r} has two counterparts: {self.mapping[word.lower()]!r} and {other!r}"
                    )
        if not self.mapping:
            raise ValueError("a Swapper needs at least one (term, counterpart) pair")
        words = sorted(self.mapping, key=lambda w: (-len(w), w))
        self.pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)

    @classmethod
    def from_config(cls, axes: Sequence[str], swaps_path: str = "") -> Swapper:
        """The pairs of a swaps file when one is given (instead of keeltune's lists), else of ``axes``."""
        return cls(read_swaps(swaps_path) if swaps_path else axes_pairs(axes))

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, replacement) of every matched term in ``text``, in order and not overlapping."""
        return [(m.start(), m.end(), self._replacement(m.group(0))) for m in self.pattern.finditer(text)]

    def swap(self, text: str) -> str:
        """``text`` with every term exchanged for its counterpart."""
        return self.pattern.sub(lambda match: self._replacement(match.group(0)), text)

    def _replacement(self, word: str) -> str:
        counterpart = self.mapping[word.lower()]
        if len(word) > 1 and word.isupper():
            return counterpart.upper()
        return counterpart[:1].upper() + counterpart[1:] if word[0].isupper() else counterpart


@cache
def _axis_swapper(axis: str) -> Swapper:
    return Swapper(swap_pairs(axis))


def swap_terms(text: str, axis: str) -> str:
    """``text`` with the axis's terms exchanged (``Swapper`` of ``swap_pairs(axis)``)."""
    return _axis_swapper(axis).swap(text)


def twin_record(record: dict[str, Any], fmt: str, fields: FieldNames, swapper: Swapper) -> dict[str, Any]:
    """A copy of ``record`` with the terms swapped in every string it trains on (text; instruction, input and
    output; each turn's content); other fields, and values of the wrong type (encoding reports them), as they
    were."""

    def swapped(value: Any) -> Any:
        return swapper.swap(value) if isinstance(value, str) else value

    if fmt in ("chat", "sharegpt"):
        turns_field, text_field = (
            (fields.messages, fields.content) if fmt == "chat" else (fields.conversations, fields.value)
        )
        turns = record.get(turns_field)
        if not isinstance(turns, list):
            return dict(record)
        twin_turns = [
            {**turn, text_field: swapped(turn[text_field])}
            if isinstance(turn, dict) and text_field in turn
            else turn
            for turn in turns
        ]
        return {**record, turns_field: twin_turns}
    names = [fields.text] if fmt == "text" else [fields.instruction, fields.input, fields.output]
    return {**record, **{name: swapped(record[name]) for name in names if name in record}}


def picked(record: dict[str, Any], share: float) -> bool:
    """Whether ``record`` is among the ``share`` of records twinned: the sha256 of its JSON text (keys sorted)
    read as a number in [0, 1) is below ``share``. The same on every run, machine and worker count."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") < share * 2**64


@dataclass(frozen=True)
class Augmenter:
    """Counterfactual augmentation of one train source's records, record by record (in the tokenizer workers)."""

    swapper: Swapper
    config: CounterfactualConfig
    fmt: str
    fields: FieldNames

    @classmethod
    def from_source(cls, source: SourceConfig) -> Augmenter | None:
        """The source's augmentation; None when it has none."""
        config = source.counterfactual
        if config is None:
            return None
        return cls(Swapper.from_config(config.axes, config.swaps), config, source.format, source.fields)

    def __call__(self, record: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """The records that stand for ``record`` and the outcome: ``TWINNED`` (add: the record and its twin;
        swap: the twin), ``UNCHANGED`` (chosen, but no term found: the record alone) or "" (not chosen)."""
        if not picked(record, self.config.share):
            return [record], ""
        twin = twin_record(record, self.fmt, self.fields, self.swapper)
        if twin == record:
            return [record], UNCHANGED
        return ([record, twin] if self.config.mode == "add" else [twin]), TWINNED


def summary(config: CounterfactualConfig, records: int, twinned: int, unchanged: int) -> str:
    """What augmentation did to a source, for prepare's log: e.g. "counterfactual add (gender): 120 records, 97
    twins added, 23 without a term"."""
    lists = f"swaps file {config.swaps}" if config.swaps else ", ".join(config.axes)
    done = f"{twinned} twins added" if config.mode == "add" else f"{twinned} replaced by their twins"
    chosen = "" if config.share == 1 else f"{twinned + unchanged} chosen (share {config.share:g}): "
    return f"counterfactual {config.mode} ({lists}): {records} records, {chosen}{done}, {unchanged} without a term"
