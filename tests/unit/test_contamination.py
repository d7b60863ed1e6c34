"""The contamination check: evaluation items and held-out records whose word n-grams the training data holds."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from keeltune.config import config_from_dict
from keeltune.data_pipeline.contamination import (
    check_contamination,
    contamination_report,
    excluded_items,
    read_report,
    words,
)

ANIMALS = ["otter", "heron", "badger", "falcon", "lynx", "walrus", "beaver", "marten", "ibis", "gecko"]
COLOURS = ["amber", "cobalt", "crimson", "olive", "slate", "ivory", "teal", "umber", "jade", "rust"]


def _sentence(k: int, length: int = 14) -> str:
    """A sentence of ``length`` words that shares no 4-gram with the sentence of another ``k``."""
    return " ".join(f"{ANIMALS[(k + i) % 10]}{k}x{i} {COLOURS[(k * 3 + i) % 10]}" for i in range(length // 2))


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(tmp_path: Path, *, exclude: bool = False, n: int = 4, **data: Any) -> Any:
    """Train on instruction records 0..19; a generate task of questions 100.. (item 1 copied from train
    record 7, item 2 too short), a multiple-choice task and a retention set (record 1 copied from train)."""
    train = [{"instruction": _sentence(k), "output": _sentence(k + 50)} for k in range(20)]
    train.append({"instruction": "ignored: a record of another shape"})
    qa = [
        {"instruction": _sentence(100), "answer": "yes"},
        {"instruction": train[7]["instruction"], "answer": [train[7]["output"], "another answer"]},
        {"instruction": "How are you", "answer": "fine"},  # 4 words: one 4-gram, fewer than 6 words
        {"instruction": _sentence(101), "answer": _sentence(102)},
    ]
    mc = [
        # the gold choice completes a training record's text; the wrong choice is another record's text
        {"text": train[3]["instruction"], "choices": [_sentence(120), train[3]["output"]], "gold": 1},
        {"text": _sentence(121), "choices": [train[4]["output"], _sentence(122)], "gold": 1},
    ]
    retention = [{"text": _sentence(200)}, {"text": train[12]["output"]}, {"text": "short"}]
    return config_from_dict({
        "run": {"name": "contam", "root": str(tmp_path / "runs")},
        "model": {"path": str(tmp_path / "no-model")},
        "data": {
            "seq_len": 64,
            "train": [
                {"name": "task", "path": _jsonl(tmp_path / "train.jsonl", train), "format": "instruction"},
                {"name": "replay", "generate": {"samples": 4}, "weight": 0.25},
            ],
            "retention": [{"name": "general", "path": _jsonl(tmp_path / "retention.jsonl", retention)}],
            **data,
        },
        "eval": {
            "tasks": [
                {"name": "qa", "path": _jsonl(tmp_path / "qa.jsonl", qa), "kind": "generate",
                 "format": "instruction"},
                {"name": "mc", "path": _jsonl(tmp_path / "mc.jsonl", mc), "kind": "multiple_choice"},
            ],
            "contamination": {"n": n, "exclude": exclude},
        },
    })  # fmt: skip


def test_words_are_lowercased_runs_of_letters_and_digits() -> None:
    assert words("Hello, World! it's 42-fold_x") == ["hello", "world", "it", "s", "42", "fold", "x"]
    tricky = "Café au LAIT, İstanbul \u212a\u00e9x \ud800 日本語 no.7\tTAB"
    assert words(tricky) == re.findall(r"[a-z0-9]+", tricky.lower())


def test_copied_items_are_flagged_short_ones_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path)
    with caplog.at_level(logging.INFO, logger="keeltune"):
        report = check_contamination(config)
    qa, mc, general = (report["sets"][k] for k in ("task/qa", "task/mc", "retention/general"))
    assert (qa["items"], qa["checked"], qa["unchecked"], qa["unchecked_items"]) == (4, 4, 0, [])
    assert [i["index"] for i in qa["flagged_items"]] == [1]
    flagged = qa["flagged_items"][0]
    # the instruction and the first reference are training record 7 word for word; "another answer" is not:
    # the item's 4-grams that reach into it are the ones missing
    assert flagged["line"] == 2 and flagged["where"].endswith("qa.jsonl:2")
    assert (flagged["ngrams"], flagged["found"], flagged["share"]) == (27, 25, round(25 / 27, 4))
    assert flagged["excerpt"].startswith(_sentence(7)[:40])
    # the gold choice completes item 0's training text; item 1's only copied text is a wrong choice
    assert [(i["index"], i["share"]) for i in mc["flagged_items"]] == [(0, 1.0)]
    assert mc["flagged"] == 1 and mc["checked"] == 2
    # the retention set: record 1 is a training output, record 2 one word
    assert [(i["index"], i["share"]) for i in general["flagged_items"]] == [(1, 1.0)]
    assert (general["unchecked"], general["unchecked_items"], general["items"]) == (1, [2], 3)
    assert report["unit"] == "word" and report["n"] == 4
    train = {s["name"]: s for s in report["train"]}
    assert train["task"]["records"] == 21 and "skipped" in train["replay"]
    assert "word 4-grams" in caplog.text and "task/qa" in caplog.text


def test_an_item_shorter_than_n_words_is_unchecked(tmp_path: Path) -> None:
    report = check_contamination(_config(tmp_path, n=6))
    qa = report["sets"]["task/qa"]
    assert (qa["unchecked"], qa["unchecked_items"], qa["checked"]) == (1, [2], 3)  # "How are you" + "fine"
    assert [i["index"] for i in qa["flagged_items"]] == [1]


def test_report_file_is_json_at_the_prepared_root(tmp_path: Path) -> None:
    config = _config(tmp_path, prepared_dir=str(tmp_path / "prepared"))
    report = check_contamination(config)
    path = tmp_path / "prepared" / "contamination.json"
    assert json.loads(path.read_text()) == report
    assert report["report"] == str(path)
    assert read_report(config) == report
    (tmp_path / "retention.jsonl").write_text(json.dumps({"text": _sentence(5)}) + "\n")  # another size
    assert read_report(config) is None


def test_exclusion_returns_the_flagged_indices(tmp_path: Path) -> None:
    assert excluded_items(_config(tmp_path)) == {}
    config = _config(tmp_path, exclude=True)
    assert excluded_items(config) == {"qa": frozenset({1}), "mc": frozenset({0})}  # computes the report
    path = config.data.prepared_root(config.run_dir) / "contamination.json"
    report = json.loads(path.read_text())
    report["sets"]["task/qa"]["flagged_items"].append({"index": 3})
    path.write_text(json.dumps(report))  # a current report is read, not computed again
    assert excluded_items(config)["qa"] == frozenset({1, 3})


def test_validation_overlap_and_nothing_to_check(tmp_path: Path) -> None:
    validation = tmp_path / "val.jsonl"
    _jsonl(validation, [{"instruction": _sentence(300), "output": _sentence(15 + 50)}])
    config = _config(tmp_path, validation={"name": "v", "path": str(validation), "format": "instruction"})
    val = contamination_report(config)["sets"]["val"]
    # half its 4-grams are those of training output 15; the ones spanning both halves are not
    assert val["checked"] == 1 and val["flagged"] == 0
    bare = config_from_dict({
        "run": {"name": "bare", "root": str(tmp_path / "runs")},
        "model": {"path": "m"},
        "data": {"train": [{"name": "t", "path": str(tmp_path / "train.jsonl"), "format": "instruction"}]},
    })  # fmt: skip
    assert contamination_report(bare) is None
    assert excluded_items(bare) == {}


def test_an_unwritable_prepared_root_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from keeltune.data_pipeline import contamination

    def refuse(path: Any, value: Any, **options: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(contamination, "write_json_atomically", refuse)
    config = _config(tmp_path, exclude=True)
    with caplog.at_level(logging.WARNING, logger="keeltune"):
        assert excluded_items(config)["qa"] == frozenset({1})
    assert "cannot write" in caplog.text and "Permission denied" in caplog.text
    assert read_report(config) is None
