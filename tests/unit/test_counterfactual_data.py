"""Counterfactual data augmentation: the Swapper (both ways, case, whole words, longest first, spans), users'
swaps files and their refusals, record twins per format, the deterministic choice of records, and ``keeltune
prepare`` of an augmented source (twins in the shards, counts, worker-count independence, re-preparing)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import Config, CounterfactualConfig, FieldNames, SourceConfig, config_from_dict
from keeltune.data_pipeline import prepare as prepare_module
from keeltune.data_pipeline.counterfactual import (
    TWINNED,
    UNCHANGED,
    Augmenter,
    Swapper,
    axes_pairs,
    picked,
    read_swaps,
    twin_record,
)
from keeltune.data_pipeline.formats import PROMPT_TEMPLATE
from keeltune.data_pipeline.prepare import DataError, prepare_sets
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.sharding.model import load_tokenizer
from tests.conftest import base_config, write_jsonl

NURSE = '{"term": "nurse", "counterpart": "doctor"}'


def test_swapper_exchanges_both_ways_keeps_case_matches_whole_words_longest_first() -> None:
    gender = Swapper.from_config(["gender"])
    text = "He said HIS Father met her grandfather; the theme: she-wolf, shepherd, other, fathers."
    swapped = "She said HER Mother met his grandmother; the theme: he-wolf, shepherd, other, mothers."
    assert gender.swap(text) == swapped
    spans = gender.spans(text)
    rebuilt, end = "", 0
    for start, stop, replacement in spans:
        rebuilt, end = rebuilt + text[end:start] + replacement, stop
    assert rebuilt + text[end:] == swapped  # the spans are exactly what swap replaces
    assert spans[:2] == [(0, 2, "She"), (8, 11, "HER")]
    own = Swapper([("old man", "young woman"), ("old", "new"), ("father", "mother"), ("grandfather", "nan")])
    assert own.swap("The Old Man, the old cat and my grandfather's father.") == (
        "The Young woman, the new cat and my nan's mother."
    )
    assert own.swap(own.swap("new young woman nan")) == "new young woman nan"
    # gender and age both swap grandfather: the axis named first keeps it, so each term has one counterpart
    assert Swapper.from_config(["gender", "age"]).swap("grandfather, old") == "grandmother, young"
    assert Swapper.from_config(["age", "gender"]).swap("grandfather, old") == "grandson, young"
    assert len(axes_pairs(["gender", "age"])) == len(axes_pairs(["gender"])) + len(axes_pairs(["age"])) - 2
    with pytest.raises(ValueError, match="'doctor' has two counterparts: 'nurse' and 'surgeon'"):
        Swapper([("nurse", "doctor"), ("doctor", "surgeon")])
    with pytest.raises(ValueError, match="unknown swap axis 'disability'"):
        Swapper.from_config(["disability"])


def test_a_swaps_file_replaces_the_builtin_lists(tmp_path: Path) -> None:
    path = tmp_path / "swaps.jsonl"
    reverse = '{"term": "Doctor", "counterpart": "NURSE"}'  # the same pair again, reversed: accepted
    path.write_text(f'\ufeff{NURSE}\n\n{reverse}\n{{"term": "Smith", "counterpart": "Jones"}}\n')
    assert read_swaps(path) == [("nurse", "doctor"), ("Smith", "Jones")]
    swapper = Swapper.from_config(["gender"], str(path))
    assert (
        swapper.swap("He asked Dr Smith, a doctor, and the NURSE.")
        == "He asked Dr Jones, a nurse, and the DOCTOR."
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"swaps.jsonl:3: not JSON \(Expecting property name"),
        ('["nurse", "doctor"]', 'swaps.jsonl:3: expected an object {"term": ..., "counterpart": ...}, got list'),
        ('{"term": "teacher"}', "swaps.jsonl:3: missing field 'counterpart'"),
        ('{"term": "a", "counterpart": "b", "note": 1}', r"swaps.jsonl:3: unknown field\(s\) \['note'\]"),
        ('{"term": 5, "counterpart": "b"}', "swaps.jsonl:3: 'term' must be a string, got int"),
        ('{"term": " ", "counterpart": "b"}', "swaps.jsonl:3: empty 'term'"),
        ('{"term": "Teacher", "counterpart": "teacher"}', "swaps.jsonl:3: 'Teacher' is its own counterpart"),
        ('{"term": "doctor", "counterpart": "surgeon"}', r"swaps.jsonl:3: 'doctor' is swapped with 'nurse' already "
         r"\(line 1\); a term has one counterpart"),
        ('{"term": "teacher", "counterpart": "Nurse"}', r"swaps.jsonl:3: 'Nurse' is swapped with 'doctor' already"),
    ],
)  # fmt: skip
def test_swaps_file_refusals_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "swaps.jsonl"
    path.write_text(f"{NURSE}\n\n{line}\n")
    with pytest.raises(DataError, match=message):
        read_swaps(path)


def test_missing_and_empty_swaps_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.jsonl: swaps file not found"):
        Swapper.from_config([], str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="empty.jsonl: no swap pairs; write one JSON line per pair"):
        read_swaps(tmp_path / "empty.jsonl")


def test_twin_record_swaps_every_trained_string_of_each_format() -> None:
    swapper, fields = Swapper.from_config(["gender"]), FieldNames()
    text = {"text": "She is his aunt.", "id": "she"}
    assert twin_record(text, "text", fields, swapper) == {"text": "He is her uncle.", "id": "she"}
    instruction = {"instruction": "Ask him.", "input": "his son", "output": "He said no.", "source": "he"}
    assert twin_record(instruction, "instruction", fields, swapper) == {
        "instruction": "Ask him.", "input": "her daughter", "output": "She said no.", "source": "he",
    }  # fmt: skip
    chat = {
        "messages": [{"role": "user", "content": "Is he in?"}, {"role": "assistant", "content": "She is."}]
    }
    twin = twin_record(chat, "chat", fields, swapper)
    assert twin == {
        "messages": [{"role": "user", "content": "Is she in?"}, {"role": "assistant", "content": "He is."}]
    }
    assert chat["messages"][0]["content"] == "Is he in?"  # the record itself is left as it was
    renamed = FieldNames(conversations="turns", speaker="who", value="said")
    sharegpt = {"turns": [{"who": "human", "said": "My brother?"}, {"who": "gpt", "said": "Your sister."}]}
    assert twin_record(sharegpt, "sharegpt", renamed, swapper) == {
        "turns": [{"who": "human", "said": "My sister?"}, {"who": "gpt", "said": "Your brother."}]
    }
    broken = {"messages": "not a list", "text": 5}  # left for encoding to report
    assert twin_record(broken, "chat", fields, swapper) == broken
    assert twin_record(broken, "text", fields, swapper) == broken


def test_the_records_chosen_depend_on_their_text_only_and_match_the_share() -> None:
    records = [{"text": f"Record {i}: he met his sister."} for i in range(200)]
    source = SourceConfig(name="s", path="x", counterfactual=CounterfactualConfig(mode="swap"))
    augment = Augmenter.from_source(source)
    assert augment is not None and source.counterfactual.share == 0.5
    outcomes = [augment(r)[1] for r in records]
    shuffled = random.Random(0).sample(range(200), 200)
    assert [augment(records[i])[1] for i in shuffled] == [
        outcomes[i] for i in shuffled
    ]  # order plays no part
    assert 70 <= outcomes.count(TWINNED) <= 130 and set(outcomes) == {TWINNED, ""}  # 0.5 of 200, sd 7
    replaced = [augment(r)[0] for r, outcome in zip(records, outcomes, strict=True) if outcome]
    assert all(len(out) == 1 and out[0]["text"].endswith("she met her brother.") for out in replaced)
    assert 20 <= sum(picked(r, 0.2) for r in records) <= 60  # 0.2 of 200, sd 5.7
    assert all(picked(r, 1.0) for r in records)
    add = Augmenter.from_source(SourceConfig(name="s", path="x", counterfactual=CounterfactualConfig()))
    assert add({"text": "he"}) == ([{"text": "he"}, {"text": "she"}], TWINNED)
    assert add({"text": "hello"}) == ([{"text": "hello"}], UNCHANGED)


# ------------------------------------------------------------------------------------- keeltune prepare
def _task(i: int) -> dict[str, str]:
    """Two of three records name a gender term (in the output, and in the instruction of some)."""
    if i % 3 == 0:
        return {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
    who = "her brother" if i % 2 else "the mother"
    return {"instruction": f"Who came on day {i}?", "input": "", "output": f"He came with {who} on day {i}."}


def _twin(record: dict[str, str]) -> dict[str, str]:
    output = record["output"].replace("He came", "She came").replace("her brother", "his sister")
    return {**record, "output": output.replace("the mother", "the father")}


RECORDS = [_task(i) for i in range(24)]


@pytest.fixture(scope="module")
def tokenizer(assets: dict):
    return load_tokenizer(str(assets["model"]))


def _config(assets: dict, tmp_path: Path, counterfactual: dict | None, workers: int = 1) -> Config:
    task = tmp_path / "task.jsonl"
    if not task.exists():
        tmp_path.mkdir(exist_ok=True)
        write_jsonl(task, RECORDS)
    source = {"name": "task", "path": str(task), "format": "instruction", "counterfactual": counterfactual}
    data = {"seq_len": 64, "train": [source], "validation": None, "retention": [], "prepare_workers": workers}
    return config_from_dict(base_config(assets, tmp_path / "runs", data=data))


def _prepare(config: Config, tokenizer, refresh: bool = True) -> list[str]:
    return [
        outcome for _, _, outcome in prepare_sets(config.data, config.run_dir, tokenizer, refresh=refresh)
    ]


def _documents(config: Config, tokenizer) -> list[str]:
    """The texts of the documents packed in the prepared shards, in order."""
    dataset = PackedDataset(config.run_dir / "data" / "train-task")
    ids, _ = dataset.get(np.arange(len(dataset)))
    stream = np.concatenate([ids[0], *(row[1:] for row in ids[1:])]).tolist()
    text = tokenizer.decode(stream, skip_special_tokens=False).replace(tokenizer.bos_token, "")
    return text.split(tokenizer.eos_token)[:-1]


def _rendered(record: dict[str, str]) -> str:
    return PROMPT_TEMPLATE.format(instruction=record["instruction"]) + record["output"]


def _index(config: Config) -> dict:
    return json.loads((config.run_dir / "data" / "train-task" / "index.json").read_text())


def test_prepare_adds_a_twin_of_every_record_with_a_term_and_reports_the_counts(
    assets: dict, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(assets, tmp_path, {"mode": "add"})
    with caplog.at_level(logging.INFO, logger="keeltune"):
        assert _prepare(config, tokenizer) == ["prepared"]
    expected = [doc for r in RECORDS for doc in ([r, _twin(r)] if r != _twin(r) else [r])]
    assert _documents(config, tokenizer) == [_rendered(r) for r in expected]
    index = _index(config)
    assert (index["num_records"], index["num_documents"]) == (24, 40)
    assert (index["num_counterfactual_twinned"], index["num_counterfactual_unchanged"]) == (16, 8)
    assert "task: counterfactual add (gender): 24 records, 16 twins added, 8 without a term" in caplog.text


def test_prepare_swap_mode_keeps_the_count_and_replaces_the_chosen_records(
    assets: dict, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(assets, tmp_path, {"mode": "swap"})
    with caplog.at_level(logging.INFO, logger="keeltune"):
        _prepare(config, tokenizer)
    chosen = [picked(r, 0.5) for r in RECORDS]
    expected = [_twin(r) if pick else r for r, pick in zip(RECORDS, chosen, strict=True)]
    replaced = sum(r != e for r, e in zip(RECORDS, expected, strict=True))
    assert 0 < replaced < 16 and _documents(config, tokenizer) == [_rendered(r) for r in expected]
    index = _index(config)
    assert (index["num_records"], index["num_documents"], index["num_counterfactual_twinned"]) == (
        24,
        24,
        replaced,
    )
    unchanged = sum(chosen) - replaced
    assert (
        f"task: counterfactual swap (gender): 24 records, {sum(chosen)} chosen (share 0.5): {replaced} replaced by "
        f"their twins, {unchanged} without a term" in caplog.text
    )


def test_prepare_gives_the_same_shards_with_one_or_two_workers(
    assets: dict, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 5)  # several chunks, dealt to both workers
    indexes = []
    for workers in (1, 2):
        config = _config(assets, tmp_path / f"w{workers}", {"mode": "swap", "fraction": 0.7}, workers)
        _prepare(config, tokenizer)
        indexes.append(_index(config))
    one, two = (
        {k: v for k, v in index.items() if k.startswith("num_") or k == "shards"} for index in indexes
    )
    assert one == two and one["num_counterfactual_twinned"] > 0


def test_changed_counterfactual_settings_or_swaps_file_make_the_shards_stale(
    assets: dict, tokenizer, tmp_path: Path
) -> None:
    config = _config(assets, tmp_path, {"mode": "add"})
    assert _prepare(config, tokenizer) == ["prepared"] and _prepare(config, tokenizer, refresh=False) == [
        "current"
    ]
    swap = _config(assets, tmp_path, {"mode": "swap"})
    with pytest.raises(DataError, match=r"stale \(changed since it was prepared: counterfactual\)"):
        _prepare(swap, tokenizer, refresh=False)
    assert _prepare(swap, tokenizer) == ["prepared"] and _index(swap)["num_documents"] == 24
    swaps = tmp_path / "swaps.jsonl"
    swaps.write_text('{"term": "brother", "counterpart": "cousin"}\n')
    own = _config(assets, tmp_path, {"swaps": str(swaps)})
    assert _prepare(own, tokenizer) == ["prepared"] and _prepare(own, tokenizer, refresh=False) == ["current"]
    assert _index(own)["num_counterfactual_twinned"] == 8  # the odd days name "her brother"
    assert _rendered(_task(1)).replace("brother", "cousin") in _documents(own, tokenizer)
    swaps.write_text('{"term": "brother", "counterpart": "nephew"}\n')  # same size, other content
    with pytest.raises(DataError, match=r"stale \(changed since it was prepared: counterfactual\)"):
        _prepare(own, tokenizer, refresh=False)
    assert _prepare(own, tokenizer) == ["prepared"]
    assert _rendered(_task(1)).replace("brother", "nephew") in _documents(own, tokenizer)
    assert _prepare(_config(assets, tmp_path, None), tokenizer) == ["prepared"]
    assert "num_counterfactual_twinned" not in _index(own)


def test_the_config_knows_exactly_the_axes_that_have_swap_lists() -> None:
    from keeltune.config import SWAP_AXES
    from keeltune.data_pipeline.counterfactual import _SWAPS

    assert tuple(_SWAPS) == SWAP_AXES
