"""Deduplication of the training sources in ``prepare`` (exact and MinHash-LSH near copies, within and across
sources, the same plan in one LSH pass or several and with any number of workers, its report, staleness) and the
low-data warning."""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import ConfigError, DataConfig, DedupConfig, FieldNames, SourceConfig, config_from_dict
from keeltune.data_pipeline import dedup
from keeltune.data_pipeline.low_data import warn_low_data
from keeltune.data_pipeline.prepare import DataError, prepare_sets, prepare_source, read_index
from keeltune.sharding.model import load_tokenizer
from tests.conftest import _general_texts, base_config, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(assets: dict):
    return load_tokenizer(str(assets["model"]))


@pytest.fixture(scope="module")
def vocabulary() -> list[str]:
    return sorted({w for text in _general_texts() for w in text.split() if w.isalpha()})[:3000]


def _document(rng: random.Random, vocabulary: list[str], words: int = 100) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def _changed(text: str, positions: list[int], new: str = "zebra") -> str:
    words = text.split()
    for p in positions:
        words[p] = f"{new}{p}"
    return " ".join(words)


@pytest.fixture(scope="module")
def texts(vocabulary) -> dict[str, list[str]]:
    """A first and a second train source, a validation and a retention set, with known copies:
    first: 0..9 distinct, 10 = 3 (other case and spacing), 11 = 5 with one word changed, 12 distinct;
    second: 0 = first 1, 1 = first 7 with one word changed, 2 distinct, 3 = its own 2;
    validation and retention copy first 0 and first 2."""
    rng = random.Random(0)
    first = [_document(rng, vocabulary) for _ in range(10)]
    first += [
        "  " + first[3].upper().replace(" ", "   \n"),
        _changed(first[5], [30]),
        _document(rng, vocabulary),
    ]
    distinct = _document(rng, vocabulary)
    second = [first[1], _changed(first[7], [10]), distinct, distinct]
    return {"first": first, "second": second, "val": [first[0], first[4]], "retention": [first[2]]}


def _config(assets: dict, root: Path, texts: dict[str, list[str]], **dedup_settings) -> object:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        name: write_jsonl(root / f"{name}.jsonl", [{"text": t} for t in items])
        for name, items in texts.items()
    }
    raw = base_config(assets, root / "runs")
    raw["data"].update(
        train=[
            {"name": "first", "path": str(files["first"]), "weight": 0.75},
            {"name": "second", "path": str(files["second"]), "weight": 0.25},
        ],
        validation={"name": "val", "path": str(files["val"])},
        retention=[{"name": "general", "path": str(files["retention"])}],
        prepare_workers=1,
        dedup=dedup_settings,
    )
    return config_from_dict(raw)


def _removed_lines(config) -> list[dict]:
    path = config.data.prepared_root(config.run_dir) / dedup.REMOVED_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


def _index(config, name: str) -> dict:
    return read_index(config.data.prepared_root(config.run_dir) / name)


def test_exact_and_near_copies_are_removed_within_and_across_sources(
    assets, tokenizer, texts, tmp_path, caplog
) -> None:
    config = _config(assets, tmp_path, texts)
    with caplog.at_level(logging.INFO, logger="keeltune"):
        outcomes = prepare_sets(config.data, config.run_dir, tokenizer, refresh=True)
    assert [o for _, _, o in outcomes] == ["prepared"] * 4
    assert (
        "dedup first: 13 records, 1 exact and 1 near duplicates (0 of another source's records), 2 removed\n"
        "dedup second: 4 records, 2 exact and 1 near duplicates (2 of another source's records), 3 removed"
    ) in "\n".join(r.getMessage() for r in caplog.records)
    removed = {(e["source"], e["index"]): e for e in _removed_lines(config)}
    assert sorted(removed) == [("first", 10), ("first", 11), ("second", 0), ("second", 1), ("second", 3)]
    assert removed["first", 10] | {"where": ""} == {
        "source": "first", "index": 10, "where": "", "kept_source": "first", "kept_index": 3,
        "kept_where": f"{tmp_path / 'first.jsonl'}:4", "kind": "exact", "similarity": 1.0,
    }  # fmt: skip
    assert removed["first", 10]["where"] == f"{tmp_path / 'first.jsonl'}:11"
    near = removed["first", 11]
    assert (near["kind"], near["kept_index"]) == ("near", 5) and 0.8 <= near["similarity"] < 1
    assert (removed["second", 0]["kept_source"], removed["second", 0]["kept_index"]) == ("first", 1)
    assert (removed["second", 1]["kind"], removed["second", 1]["kept_source"]) == ("near", "first")
    assert (removed["second", 3]["kept_source"], removed["second", 3]["kept_index"]) == ("second", 2)
    report = json.loads((config.data.prepared_root(config.run_dir) / dedup.REPORT_FILE).read_text())
    assert report["sources"] == {
        "first": {"records": 13, "documents": 13, "exact_duplicates": 1, "near_duplicates": 1, "removed": 2,
                  "across_sources": 0, "kept_copy_in": {"first": 2}},
        "second": {"records": 4, "documents": 4, "exact_duplicates": 2, "near_duplicates": 1, "removed": 3,
                   "across_sources": 2, "kept_copy_in": {"first": 2, "second": 1}},
    }  # fmt: skip
    assert report["settings"]["threshold"] == 0.8 and report["passes"] == 1
    first, second = _index(config, "train-first"), _index(config, "train-second")
    assert (first["num_records"], first["num_dedup_removed"]) == (11, 2)
    assert (second["num_records"], second["num_dedup_removed"]) == (1, 3)
    assert first["recipe"]["dedup_removed"]["records"] == 2
    for held_out in ("val-val", "retention-general"):  # copies of training records, never deduplicated
        index = _index(config, held_out)
        assert index["num_dedup_removed"] == 0 and "dedup_removed" not in index["recipe"]
    assert _index(config, "val-val")["num_records"] == 2
    # the shards are those of the source without its copies
    kept = write_jsonl(
        tmp_path / "kept.jsonl", [{"text": t} for t in texts["first"][:10] + texts["first"][12:]]
    )
    alone = prepare_source(SourceConfig(name="first", path=str(kept)), tmp_path / "alone", tokenizer=tokenizer,
                           seq_len=64, workers=1)  # fmt: skip
    assert [s["sha256"] for s in alone["shards"]] == [s["sha256"] for s in first["shards"]]


def test_action_report_keeps_every_record_and_lists_the_copies(assets, tokenizer, texts, tmp_path) -> None:
    config = _config(assets, tmp_path, texts, action="report")
    prepare_sets(config.data, config.run_dir, tokenizer, refresh=True)
    assert len(_removed_lines(config)) == 5
    report = json.loads((config.data.prepared_root(config.run_dir) / dedup.REPORT_FILE).read_text())
    assert [(s["exact_duplicates"], s["near_duplicates"], s["removed"]) for s in report["sources"].values()] == [
        (1, 1, 0), (2, 1, 0),
    ]  # fmt: skip
    assert [_index(config, f"train-{name}")["num_records"] for name in ("first", "second")] == [13, 4]
    assert "dedup_removed" not in _index(config, "train-first")["recipe"]
    lines = dedup.summary_lines(report)
    assert lines[1] == (
        "dedup second: 4 records, 2 exact and 1 near duplicates (2 of another source's records), 0 removed "
        "(data.dedup.action: report)"
    )


def test_the_shards_do_not_depend_on_the_workers_and_changing_the_plan_makes_them_stale(
    assets, tokenizer, texts, tmp_path
) -> None:
    def shards(workers: int, root: Path) -> list[str]:
        config = _config(assets, root, texts)
        config.data.prepare_workers = workers
        prepare_sets(config.data, config.run_dir, tokenizer, refresh=True)
        return [
            s["sha256"] for name in ("train-first", "train-second") for s in _index(config, name)["shards"]
        ]

    assert shards(1, tmp_path / "one") == shards(2, tmp_path / "two")
    config = _config(assets, tmp_path / "one", texts, max_index_docs=2)  # memory only: still current
    assert [o for _, _, o in prepare_sets(config.data, config.run_dir, tokenizer, refresh=False)] == [
        "current"
    ] * 4
    stricter = _config(assets, tmp_path / "one", texts, threshold=0.95)  # the one-word changes are kept now
    with pytest.raises(
        DataError,
        match=r"data.train.0 \(first\): the shards in .* are stale \(changed since it was prepared: the duplicate "
        r"records data.dedup removes\)",
    ):
        prepare_sets(stricter.data, stricter.run_dir, tokenizer, refresh=False)
    outcomes = prepare_sets(stricter.data, stricter.run_dir, tokenizer, refresh=True)
    assert [o for _, _, o in outcomes] == ["prepared", "prepared", "current", "current"]
    assert _index(stricter, "train-first")["num_dedup_removed"] == 1


def _variants(vocabulary: list[str], count: int, seed: int) -> list[str]:
    """Documents of a few families: each a base text with 0 to 5 of its 100 words replaced (similarity about
    1 to 0.6), then the bases."""
    rng = random.Random(seed)
    bases = [_document(rng, vocabulary) for _ in range(count // 6)]
    texts = [
        _changed(rng.choice(bases), rng.sample(range(60), rng.randint(0, 5)), f"v{i}x") for i in range(count)
    ]
    return texts + bases


def _reference(signatures: np.ndarray, threshold: float, bands: tuple[int, int]) -> list[tuple[int, int]]:
    """The rule, by brute force: a document is removed when an earlier kept one shares an LSH band with it
    and their estimated similarity is >= threshold; (document, earliest such kept one)."""
    b, r = bands
    kept: list[int] = []
    removed = []
    for i, mine in enumerate(signatures):
        for j in kept:
            shares_band = any(
                (signatures[j][k * r : (k + 1) * r] == mine[k * r : (k + 1) * r]).all() for k in range(b)
            )
            if shares_band and np.count_nonzero(signatures[j] == mine) / len(mine) >= threshold:
                removed.append((i, j))
                break
        else:
            kept.append(i)
    return removed


def test_one_lsh_pass_and_many_give_the_plan_of_the_rule(vocabulary, tmp_path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _variants(vocabulary, 120, seed=1)])
    plans = {}
    for block in (1_000_000, 7, 1):
        data = DataConfig(
            train=[SourceConfig(name="docs", path=str(source))], dedup=DedupConfig(max_index_docs=block)
        )
        plan = dedup.compute_plan(data, tmp_path / f"plan-{block}")
        plans[block] = (plan.report["passes"], (tmp_path / f"plan-{block}" / dedup.REMOVED_FILE).read_text())
    lines = [json.loads(line) for line in plans[1][1].splitlines()]
    texts = [
        dedup.document_text(json.loads(line), "text", FieldNames())
        for line in source.read_text().splitlines()
    ]
    compared = len(set(texts))  # the first copy of each text
    assert [passes for passes, _ in plans.values()] == [1, -(-compared // 7), compared]
    assert plans[7][1] == plans[1][1] == plans[1_000_000][1]
    assert 20 < sum(e["kind"] == "near" for e in lines) < len(lines)
    # the rule by brute force, which an exact copy meets with similarity 1: the same kept copies
    from datasketch import MinHash

    settings = DedupConfig()
    signatures = []
    for text in texts:
        minhash = MinHash(num_perm=settings.num_perm, seed=dedup.SEED)
        minhash.update_batch(dedup.shingles(text, 5))
        signatures.append(minhash.hashvalues)
    expected = _reference(np.array(signatures), settings.threshold, dedup.lsh_bands(settings))
    assert [(e["index"], e["kept_index"]) for e in lines] == expected


def test_dedup_settings_out_of_range_are_refused_with_their_key(assets, tmp_path) -> None:
    for settings, message in (
        ({"threshold": 0}, r"data.dedup.threshold: must be in \(0, 1\]"),
        ({"threshold": 1.5}, r"data.dedup.threshold: must be in \(0, 1\]"),
        ({"num_perm": 8}, r"data.dedup.num_perm: must be >= 16"),
        ({"shingle_words": 0}, r"data.dedup.shingle_words: must be >= 1"),
        ({"action": "drop"}, r"data.dedup.action: 'drop' is not one of \['remove', 'report'\]"),
    ):
        raw = base_config(assets, tmp_path)
        raw["data"]["dedup"] = settings
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)


def test_few_samples_for_many_steps_warn_with_the_controls_left_off(
    assets, tokenizer, tmp_path, caplog
) -> None:
    raw = base_config(assets, tmp_path / "runs", training={"max_steps": 200, "warmup_steps": 2},
                      regularization={"neftune_alpha": 5.0, "early_stopping": {"patience": 3}})  # fmt: skip
    config = config_from_dict(raw)
    prepare_sets(config.data, config.run_dir, tokenizer, refresh=True)
    samples = _index(config, "train-task")["num_samples"]
    with caplog.at_level(logging.WARNING, logger="keeltune"):
        warnings = warn_low_data(config)
    epochs = 200 * 8 / samples
    assert len(warnings) == 1 and warnings[0] in caplog.text
    message = warnings[0]
    assert message.startswith(f"data.train.0 (task): only {samples} samples (after deduplication) for "
                              f"training.max_steps 200 x training.global_batch_size 8: about {epochs:.1f} epochs")  # fmt: skip
    for control in ("training.max_steps: ", "regularization.dropout", "regularization.weight_decay",
                    "a second data.train source with a weight", "regularization.kl.weight or regularization.l2sp"):  # fmt: skip
        assert control in message
    assert "neftune" not in message and "early_stopping" not in message  # already on
    few = copy.deepcopy(raw)
    few["training"]["max_steps"] = 4
    assert warn_low_data(config_from_dict(few)) == []
