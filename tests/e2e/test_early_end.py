"""Runs that end before max_steps through the real CLI: early stopping on val/loss and the retention guard
checkpoint first, say why in the log, and stay ended when resumed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import base_config, keeltune, read_metrics, train_losses, write_config


def _run(assets: dict, tmp_path: Path, name: str, regularization: dict) -> tuple[Path, Path]:
    config = base_config(
        assets,
        tmp_path / "runs",
        run={"name": name, "root": str(tmp_path / "runs")},
        training={"max_steps": 8, "warmup_steps": 1, "checkpoint": {"every_steps": 100, "keep_last": 2}},
        eval={"every_steps": 2, "micro_batch_size": 8},
        regularization=regularization,
    )
    return tmp_path / "runs" / name, write_config(tmp_path / f"{name}.yaml", config)


def test_early_stopping_checkpoints_says_why_and_stays_stopped_on_resume(
    assets: dict, tmp_path: Path
) -> None:
    # no eval can improve val/loss by 100 nats: the run ends at the first eval after the one at step 0
    run_dir, config = _run(assets, tmp_path, "early", {"early_stopping": {"patience": 1, "min_delta": 100.0}})
    done = keeltune("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()  # written although every_steps is 100
    assert (run_dir / "final" / "model.safetensors").is_file()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert (
        "ended at step 2 after checkpointing: early stopping: val/loss did not improve by more than "
        "min_delta=100 for patience=1 eval(s); best"
    ) in log
    assert json.loads((run_dir / "best.json").read_text())["step"] == 0
    again = keeltune("train", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == [1, 2]  # resumed with patience used up: nothing more trained


def test_retention_guard_warns_or_stops_after_checkpointing(assets: dict, tmp_path: Path) -> None:
    run_dir, config = _run(
        assets, tmp_path, "guard", {"retention_guard": {"max_forgetting_pct": 1e-9, "action": "stop"}}
    )
    done = keeltune("train", str(config), "--set", "training.lr=0.05")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    forgetting = [
        r["retention/general/forgetting_pct"] for r in read_metrics(run_dir) if "retention/general/ppl" in r
    ]
    print("forgetting_pct per eval:", forgetting)
    assert "ended at step 2 after checkpointing: retention guard: retention/general/forgetting_pct" in log
    assert (run_dir / "checkpoints" / "step_0000002").is_dir() and sorted(train_losses(run_dir)) == [1, 2]


def test_retention_guard_best_keeps_the_best_model_within_the_threshold(assets: dict, tmp_path: Path) -> None:
    """action best: the run goes on to max_steps; best/ holds the model of the eval with the lowest
    val/loss + mean retention loss rise among those within max_forgetting_pct, and that is the model it holds."""
    from safetensors.torch import load_file

    threshold = 50.0
    run_dir, config = _run(
        assets,
        tmp_path,
        "best",
        {"retention_guard": {"max_forgetting_pct": threshold, "action": "best", "retention_weight": 2.0}},
    )
    done = keeltune("train", str(config), "--set", "training.lr=0.01")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == list(range(1, 9))  # not stopped
    evals = [r for r in read_metrics(run_dir) if "val/loss" in r]
    base = evals[0]["retention/general/loss"]
    scores = {
        r["step"]: r["val/loss"] + 2.0 * (r["retention/general/loss"] - base)
        for r in evals
        if r["retention/general/forgetting_pct"] <= threshold
    }
    print("forgetting per eval:", {r["step"]: round(r["retention/general/forgetting_pct"], 1) for r in evals})
    print("eligible scores:", scores)
    assert 1 < len(scores) < len(evals)  # some evals are eligible, some are not: the threshold matters
    best_step = min(scores, key=scores.get)
    chosen = json.loads((run_dir / "best" / "keeltune_best.json").read_text())
    assert chosen["step"] == best_step and abs(chosen["score"] - scores[best_step]) < 1e-6
    # what best/ holds is that step's model: keeltune eval of it gives that eval's numbers
    evaluated = keeltune("eval", str(run_dir / "best"), "--config", str(config), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    numbers = json.loads(evaluated.stdout)
    assert abs(numbers["val/loss"] - chosen["val/loss"]) <= 1e-6, (numbers["val/loss"], chosen["val/loss"])
    if best_step != evals[-1]["step"]:
        final, best = (
            load_file(run_dir / "final" / "model.safetensors"),
            load_file(run_dir / "best" / "model.safetensors"),
        )
        assert any(not (final[n] == best[n]).all() for n in final)
    assert (run_dir / "best" / "tokenizer_config.json").is_file()
    assert not list(run_dir.glob(".tmp-best")) and not list(run_dir.glob(".old-best"))


def test_bias_guard_stops_after_checkpointing(assets: dict, tmp_path: Path) -> None:
    run_dir, config = _run(
        assets,
        tmp_path,
        "bias",
        {"bias_guard": {"max_amplification": 0.0, "significant": False, "action": "stop"}},
    )
    probes = {"probes": [{"kind": "templates", "axes": ["age", "religion"], "max_items_per_axis": 6}]}
    done = keeltune(
        "train", str(config), "--set", "training.lr=0.05", "--set", f"eval.bias={json.dumps(probes)}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spreads = {
        r["step"]: r["bias/templates/all/ll_spread_amplification"]
        for r in read_metrics(run_dir)
        if "bias/templates/all/ll_spread" in r
    }
    print("ll_spread amplification per eval:", spreads)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "ended at step 2 after checkpointing: bias guard: bias/templates/" in log
    assert "ll_spread rose by" in log and "(regularization.bias_guard) at step 2" in log
    assert sorted(spreads) == [0, 2] and sorted(train_losses(run_dir)) == [1, 2]
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
