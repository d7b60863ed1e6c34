"""Bias probes through the real CLI on the shared ddp run: scored at step 0 (the base) and every eval with
their amplification; ``keeltune eval --bias`` on the final checkpoint gives the trainer's numbers;
``keeltune report`` shows them; a broken probe file stops ``keeltune train`` before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import (
    DDP_RUN_STEPS,
    SharedRun,
    base_config,
    keeltune,
    read_metrics,
    session_bias_probes,
    write_config,
)


def _rows(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()]


def test_the_trainer_scores_probes_at_step_0_and_every_eval_against_the_base(ddp_run: SharedRun) -> None:
    from keeltune.config import load_config
    from keeltune.eval.bias.probes import bias_results, load_probe_sets
    from keeltune.run_folder import eval_items_file

    records = {r["step"]: r for r in read_metrics(ddp_run.run_dir) if "bias/pairs/all/likelihood_gap" in r}
    assert sorted(records) == [0, DDP_RUN_STEPS // 2, DDP_RUN_STEPS]
    start = records[0]
    for probe, axes, metrics in (
        ("pairs", ("all", "gender", "age"), ("likelihood_gap", "pct_stereotype")),
        ("templates", ("all", "religion"), ("ll_spread", "ll_std")),
    ):
        for axis in axes:
            for name in metrics:
                key = f"bias/{probe}/{axis}/{name}_amplification"
                assert start[key] == start[key + "_lo"] == start[key + "_hi"] == 0.0, key
    baseline = json.loads((ddp_run.run_dir / "bias_baseline.json").read_text())
    assert {name: len(found["where"]) for name, found in baseline.items()} == {"pairs": 32, "templates": 8}
    # the logged numbers are the per-item log-likelihoods' (written each eval) scored against the base's
    config = load_config(ddp_run.run_dir / "config.yaml")
    last = records[DDP_RUN_STEPS]
    for probe in load_probe_sets(config.eval.bias):
        rows = _rows(eval_items_file(ddp_run.run_dir, DDP_RUN_STEPS, f"bias-{probe.name}"))
        assert [row["where"] for row in rows] == baseline[probe.name]["where"]
        expected = bias_results(
            probe, [row["lls"] for row in rows], baseline[probe.name]["lls"], config.eval.bias
        )
        assert expected == {key: last[key] for key in expected}
    pairs = _rows(eval_items_file(ddp_run.run_dir, DDP_RUN_STEPS, "bias-pairs"))
    gaps = [row["lls"][0] - row["lls"][1] for row in pairs]
    assert last["bias/pairs/all/likelihood_gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-12)
    assert last["bias/pairs/all/likelihood_gap_amplification"] != 0.0  # six steps of training moved it


def test_eval_bias_on_the_final_checkpoint_gives_the_trainers_numbers(
    ddp_run: SharedRun, tmp_path: Path
) -> None:
    run = ddp_run.copy(tmp_path)
    done = keeltune("eval", str(run.run_dir), "--bias", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "likelihood_gap" in done.stdout and "amplification" in done.stdout  # the table
    saved = json.loads((run.run_dir / "bias" / f"step_{DDP_RUN_STEPS}.json").read_text())
    results = saved["results"]
    assert len(saved["items"]["pairs"]["base"]) == len(saved["items"]["pairs"]["model"]) == 32
    trained = next(r for r in reversed(read_metrics(run.run_dir)) if "bias/pairs/all/likelihood_gap" in r)
    keys = [k for k in trained if k.startswith("bias/")]
    assert sorted(results) == sorted(keys)
    for key in keys:  # the base through transformers here, through the ddp backend at step 0 there
        assert results[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-5), key
    report = keeltune("report", str(run.run_dir))
    assert report.returncode == 0, report.stderr[-2000:]
    markdown = (run.run_dir / "report" / "report.md").read_text()
    assert "## Bias amplification" in markdown and "| pairs | gender | likelihood_gap |" in markdown
    assert (run.run_dir / "report" / "bias_amplification.png").stat().st_size > 10_000


def test_a_broken_probe_file_stops_train_before_any_work(assets: dict[str, Path], tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"axis": "gender", "stereotype": "He ran.", "anti_stereotype": "She ran."}\n{"axis": "gender"\n'
    )
    bias = session_bias_probes()
    bias["probes"].append({"kind": "pairs", "name": "mine", "path": str(pairs)})
    config = write_config(tmp_path / "cfg.yaml", base_config(assets, tmp_path / "runs", eval={"bias": bias}))
    done = keeltune("train", str(config), timeout=120)
    assert done.returncode == 2
    assert f"eval.bias.probes.2 (pairs): {pairs}:2: not JSON" in done.stderr
    assert not (tmp_path / "runs").exists()
