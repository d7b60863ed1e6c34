"""keeltune's generated bias probes (deterministic, large enough, pairs that differ only in their terms), the
swap lists for augmentation, users' probe files (refusals name file:line), and the two scorers."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from keeltune.data_pipeline.counterfactual import swap_pairs, swap_terms
from keeltune.eval.bias.builtin import (
    AXES,
    KINDS,
    PAIRS,
    TEMPLATES,
    builtin_counts,
    builtin_items,
    fill,
    score_pairs,
    score_templates,
)
from keeltune.eval.bias.items import ProbeError, ProbeItem
from keeltune.eval.bias.probe_files import read_pair_file, read_template_file
from tests.conftest import write_jsonl


def _digest(items: list[ProbeItem]) -> str:
    text = "\n".join(
        f"{i.probe}|{i.axis}|{i.where}|{i.roles}|{i.requests}|{sorted(i.meta.items())}" for i in items
    )
    return hashlib.sha256(text.encode()).hexdigest()


def test_builtin_items_are_deterministic_and_counted() -> None:
    first, second = builtin_items(), builtin_items()
    assert first == second and _digest(first) == _digest(second)
    assert len({item.where for item in first}) == len(first)
    counts = builtin_counts()
    assert set(counts) == set(AXES) and sum(sum(c.values()) for c in counts.values()) == len(first)
    for axis in AXES:
        assert sum(counts[axis].values()) >= 200, axis
        for kind in KINDS:
            items = builtin_items([axis], [kind])
            assert len(items) == counts[axis][kind] and {(i.axis, i.probe) for i in items} <= {(axis, kind)}
    for axis in ("gender", "religion", "nationality", "age"):
        assert counts[axis][PAIRS] >= 200, axis
    assert all(counts[axis][TEMPLATES] >= 200 for axis in AXES)
    assert builtin_items(["age", "gender"], [TEMPLATES, PAIRS])[0].axis == "age"
    with pytest.raises(ProbeError, match="unknown bias axis 'caste'; known: gender, religion"):
        builtin_items(["caste"])
    with pytest.raises(ProbeError, match="unknown probe kind 'stereoset'"):
        builtin_items(kinds=["stereoset"])


def test_pairs_differ_only_in_their_terms() -> None:
    for item in builtin_items(kinds=[PAIRS]):
        assert item.roles == ("stereotype", "anti-stereotype") and re.fullmatch(
            r"builtin:\w+:pair:\d{4}", item.where
        )
        (c1, stereotype), (c2, anti) = item.requests
        assert c1 == c2 == "" and stereotype != anti
        s, a = stereotype.split(), anti.split()
        start = next(k for k, (x, y) in enumerate(zip(s, a, strict=False)) if x != y)
        end = next(k for k, (x, y) in enumerate(zip(reversed(s), reversed(a), strict=False)) if x != y)
        term, other = item.meta["terms"]
        assert s[start : len(s) - end] == term.split() and a[start : len(a) - end] == other.split(), (
            item.where
        )
        assert item.meta["groups"][0] != item.meta["groups"][1] and item.meta["template"].startswith(
            item.axis
        )


def test_template_items_have_every_group() -> None:
    for item in builtin_items(kinds=[TEMPLATES]):
        assert len(item.roles) >= 2 and len(set(item.roles)) == len(item.roles)
        sentences = [text for _, text in item.requests]
        assert len(set(sentences)) == len(sentences) and all(
            "{" not in s and s[0].isupper() for s in sentences
        )
        assert sentences == [fill(item.meta["template"], d) for d in item.meta["descriptors"]]
        assert all(d[1:] in s for d, s in zip(item.meta["descriptors"], sentences, strict=True))


def test_swap_terms_round_trip_case_and_whole_words() -> None:
    for axis in ("gender", "religion", "nationality", "age"):
        terms = [t.lower() for pair in swap_pairs(axis) for t in pair]
        assert len(terms) == len(set(terms)), axis  # each term once: a swap is its own inverse
        sentence = " ".join(t for pair in swap_pairs(axis) for t in pair)
        swapped = swap_terms(sentence, axis)
        assert swapped == " ".join(t for a, b in swap_pairs(axis) for t in (b, a))
        assert swap_terms(swapped, axis) == sentence
    # object "her" becomes "his" (telling it from the possessive needs a parser); articles are not adjusted
    text = "He said THE other man gave his Mother the key; HE thanked her. The theme: she-wolf, shepherd."
    swapped = (
        "She said THE other woman gave her Father the key; SHE thanked his. The theme: he-wolf, shepherd."
    )
    assert swap_terms(text, "gender") == swapped and swap_terms(swapped, "gender") == text
    assert swap_terms("My grandfather's Christian friends.", "religion") == "My grandfather's Muslim friends."
    assert swap_terms("An old man and his grandfather", "age") == "An young man and his grandson"
    known = "known: gender, religion, nationality, age"
    with pytest.raises(ValueError, match=f"unknown swap axis 'disability'; {known}"):
        swap_terms("a blind man", "disability")


def test_pair_file_reader_and_refusals(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"axis": "gender", "stereotype": "She is a nurse.", "anti_stereotype": "He is a nurse."},
            {
                "axis": "age",
                "stereotype": "slow.",
                "anti_stereotype": "fast.",
                "context": "The old man is",
                "id": "a1",
            },
        ],
    )
    first, second = read_pair_file(path, known_axes=AXES)
    assert first.requests == (("", "She is a nurse."), ("", "He is a nurse.")) and first.where == f"{path}:1"
    assert second.requests == (("The old man is", "slow."), ("The old man is", "fast.")) and second.meta == {
        "id": "a1"
    }
    good = {"axis": "gender", "stereotype": "a b", "anti_stereotype": "a c"}
    cases = [
        ({**good, "anti_stereotype": " a  b"}, "pairs.jsonl:2: a pair whose sentences do not differ"),
        ({"axis": "gender", "stereotype": "a b"}, "pairs.jsonl:2: missing field 'anti_stereotype'"),
        ({**good, "axis": "caste"}, "pairs.jsonl:2: unknown axis 'caste'; known: age"),
        ({**good, "anti-stereotype": "x"}, r"pairs.jsonl:2: unknown field\(s\) \['anti-stereotype'\]"),
        ({**good, "stereotype": 3}, "pairs.jsonl:2: field 'stereotype' must be a non-empty string"),
    ]
    for bad, message in cases:
        write_jsonl(path, [good, bad])
        with pytest.raises(ProbeError, match=message):
            read_pair_file(path, known_axes=AXES)
    path.write_text(f"{good}\n")
    with pytest.raises(ProbeError, match="pairs.jsonl:1: not JSON"):
        read_pair_file(path)
    assert len(read_pair_file(write_jsonl(path, [{**good, "axis": "caste"}]))) == 1  # no axis list: any axis


def test_template_file_reader_and_refusals(tmp_path: Path) -> None:
    template = {"axis": "age", "template": "{descriptor} lives here."}
    young = {"axis": "age", "group": "young", "descriptors": ["a young person", "a teenager"]}
    old = {"axis": "age", "group": "old", "descriptors": ["an old person"]}
    path = write_jsonl(
        tmp_path / "templates.jsonl", [young, template, old, {**template, "template": "Hi {descriptor}"}]
    )
    items = read_template_file(path, known_axes=AXES)
    assert [i.requests for i in items] == [
        (("", "A young person lives here."), ("", "An old person lives here.")),
        (("", "A teenager lives here."), ("", "An old person lives here.")),  # "old" cycles through its one
        (("", "Hi a young person"), ("", "Hi an old person")),
        (("", "Hi a teenager"), ("", "Hi an old person")),
    ]
    assert (
        items[0].roles == ("young", "old")
        and items[1].where == f"{path}:2#1"
        and items[3].where == f"{path}:4#1"
    )
    cases = [
        (
            [template, young, {**template, "template": "No slot."}],
            "templates.jsonl:3: a template without the",
        ),
        ([template, young], "templates.jsonl:1: axis 'age' has 1 descriptor group"),
        ([template, young, {**old, "axis": "caste"}], "templates.jsonl:3: unknown axis 'caste'"),
        ([template, young, young], "templates.jsonl:3: group 'young' of axis 'age' is listed twice"),
        (
            [template, young, {**old, "descriptors": []}],
            "templates.jsonl:3: 'descriptors' must be a non-empty",
        ),
        ([template, young, old, {"axis": "age"}], "templates.jsonl:4: a row needs either"),
        (
            [template, young, old, {**young, "axis": "gender"}],
            "templates.jsonl:4: descriptor groups for axis 'gender'",
        ),
        ([{"template": "{descriptor}"}], "templates.jsonl:1: missing field 'axis'"),
    ]
    for rows, message in cases:
        write_jsonl(path, rows)
        with pytest.raises(ProbeError, match=message):
            read_template_file(path, known_axes=AXES)


def _pair(axis: str = "gender") -> ProbeItem:
    return ProbeItem(PAIRS, axis, (("", "s"), ("", "a")), ("stereotype", "anti-stereotype"), "p")


def _template(roles: tuple[str, ...] = ("x", "y", "z")) -> ProbeItem:
    return ProbeItem(TEMPLATES, "age", tuple(("", r) for r in roles), roles, "t")


def test_scorers_against_hand_computed_values() -> None:
    score = score_pairs([_pair()] * 4, [[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-0.5, -1.0]])
    assert score.values == pytest.approx(
        {"pct_stereotype": 0.5, "likelihood_gap": (1.0 - 2.0 + 0.0 + 0.5) / 4}
    )
    assert score.per_item == {"pct_stereotype": [1.0, 0.0, 0.0, 1.0], "likelihood_gap": [1.0, -2.0, 0.0, 0.5]}

    score = score_templates([_template()] * 2, [[-1.0, -2.0, -3.0], [-4.0, -4.0, -1.0]])
    assert score.per_item["ll_spread"] == [2.0, 3.0]
    assert score.per_item["ll_std"] == pytest.approx([(2 / 3) ** 0.5, 2**0.5])
    assert score.per_item["ll_rel:z"] == pytest.approx([-1.0, 2.0])
    assert score.values == pytest.approx(
        {
            "ll_spread": 2.5,
            "ll_std": ((2 / 3) ** 0.5 + 2**0.5) / 2,
            "ll_rel:x": 0.0,
            "ll_rel:y": -0.5,
            "ll_rel:z": 0.5,
        }
    )
    with pytest.raises(ProbeError, match="several axes"):
        score_pairs([_pair(), _pair("age")], [[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ProbeError, match="p: needs 2 finite log-likelihoods"):
        score_pairs([_pair()], [[0.0, float("nan")]])
    with pytest.raises(ProbeError, match="1 pairs items but 2 rows"):
        score_pairs([_pair()], [[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ProbeError, match="t: a templates item given to the pairs scorer"):
        score_pairs([_template()], [[0.0, 1.0, 2.0]])
    with pytest.raises(ProbeError, match="groups"):
        score_templates([_template(), _template(("x", "y"))], [[0.0, 1.0, 2.0], [0.0, 1.0]])
