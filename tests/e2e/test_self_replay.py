"""Self-replay: a train source drawn from the base model when training starts, mixed in by weight, reused.
Here under QLoRA; tests/distributed/test_zero3.py checks 2-rank ZeRO-3's samples against transformers' own
sampling with each rank's seed, and that a run finding a samples file trains on it (its losses equal ZeRO-3's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_config, keeltune, read_metrics, with_base_samples, write_config

SAMPLES = 24


def self_replay_config(assets: dict, root: Path) -> dict:
    config = base_config(assets, root, run={"name": "self", "root": str(root)}, sharding={"backend": "qlora"})
    return with_base_samples(config, "base-samples", samples=SAMPLES, max_new_tokens=40, batch_size=10)


def samples(run_dir: Path) -> list[str]:
    lines = (run_dir / "base_samples" / "base-samples.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module")
def run(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("self_replay")
    cfg = write_config(root / "cfg.yaml", self_replay_config(assets, root / "runs"))
    prepared = keeltune("prepare", str(cfg))  # before training there is no model sample to prepare
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "data.train.1: drawn from the base model when training starts" in prepared.stdout
    done = keeltune("train", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "self"


def test_samples_are_drawn_and_mixed_in_by_weight(run: Path, assets: dict) -> None:
    drawn = samples(run)
    assert SAMPLES - 2 <= len(drawn) <= SAMPLES  # rows of special tokens only are dropped
    assert len(set(drawn)) > SAMPLES // 2  # temperature 1 samples, not one greedy text
    fractions = [
        r["data/base-samples/fraction"] for r in read_metrics(run) if "data/base-samples/fraction" in r
    ]
    assert fractions and abs(fractions[-1] - 0.25) < 0.05
    assert (run / "data" / "train-base-samples" / "index.json").is_file()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"name": "g", "path": "x.jsonl", "generate": {"samples": 4}}, "has no path"),
        ({"name": "g", "generate": {"samples": 0}}, "samples, batch_size: must be >= 1"),
        ({"name": "g", "generate": {"temperature": 0}}, "temperature: must be > 0"),
    ],
)
def test_bad_generated_sources_are_refused_at_load(
    assets: dict, tmp_path: Path, source: dict, message: str
) -> None:
    from keeltune.config import ConfigError, load_config

    cfg = base_config(assets, tmp_path)
    cfg["data"]["train"].append(source)
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "cfg.yaml", cfg))
    cfg = base_config(assets, tmp_path)
    cfg["data"]["retention"].append({"name": "g", "generate": {"samples": 4}})
    with pytest.raises(ConfigError, match="only train sources can be drawn from the base model"):
        load_config(write_config(tmp_path / "cfg.yaml", cfg))
