"""``keeltune eval`` and ``keeltune report`` on a short trained run of the tiny model (the session's ddp run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import DDP_RUN_STEPS, SharedRun, keeltune, read_metrics

STEPS = DDP_RUN_STEPS
HALF = STEPS // 2  # the other checkpoint and eval


@pytest.fixture
def trained(ddp_run: SharedRun) -> tuple[Path, Path]:
    """The session's ddp run (tests/conftest.py): 6 steps, evaluated at steps 0, 3 and 6, checkpointed at 3 and 6;
    (run folder, config). Read-only: a test that writes into the run folder works on ``ddp_run.copy(tmp_path)``."""
    return ddp_run.run_dir, ddp_run.config


def _eval_json(*args: str) -> dict[str, float]:
    done = keeltune("eval", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _logged(run_dir: Path, step: int) -> dict[str, float]:
    return next(r for r in read_metrics(run_dir) if r["step"] == step and "val/loss" in r)


@pytest.mark.parametrize("step", [None, HALF])
def test_eval_of_a_checkpoint_equals_what_the_trainer_logged(
    trained: tuple[Path, Path], step: int | None
) -> None:
    run_dir, _ = trained
    got = _eval_json(str(run_dir), *([] if step is None else ["--checkpoint", str(step)]))
    logged = _logged(run_dir, STEPS if step is None else step)
    keys = [f"{s}/{m}" for s in ("val", "retention/general") for m in ("loss", "ppl", "bpb")]
    keys += ["retention/general/forgetting_pct", "retention/general/forgetting_bpb_pct"]
    # the held-out sets, and the config's tasks: the cloze (its own interval, every 2 steps: not logged at 3)
    # and the generation task (logged at 3 and 6)
    tasks = sorted(k for k in got if k.startswith("task/"))
    assert sorted(set(got) - set(tasks)) == sorted(keys)
    assert {"task/cloze/acc", "task/cloze/acc_change", "task/qa/f1", "task/qa/chrf_stderr"} <= set(tasks)
    keys += [key for key in tasks if key in logged]
    assert ("task/cloze/acc" in keys) == (step is None) and "task/qa/exact_match" in keys
    for key in keys:
        assert abs(got[key] - logged[key]) <= 1e-6, (key, got[key], logged[key])


def test_eval_on_several_local_ranks_gives_the_one_process_numbers(
    assets: dict, trained: tuple[Path, Path]
) -> None:
    """--nproc: torch's launcher starts the ranks, each evaluates whole micro-batches, the batch sums are added
    in batch order: a checkpoint on 2 ranks gives exactly what the 1-rank trainer logged, and the base model on
    3 ranks exactly the baseline."""
    run_dir, cfg = trained
    got = _eval_json(str(run_dir), "--nproc", "2")
    logged = _logged(run_dir, STEPS)
    held_out = ("val/loss", "val/bpb", "retention/general/loss", "retention/general/bpb")
    for key in (*held_out, "retention/general/forgetting_pct", "retention/general/forgetting_bpb_pct"):
        assert got[key] == logged[key], (key, got[key], logged[key])
    for key in ("task/cloze/acc", "task/cloze/acc_norm", "task/qa/exact_match"):  # the tasks too
        assert got[key] == logged[key], (key, got[key], logged[key])
    base = _eval_json(str(assets["model"]), "--config", str(cfg), "--nproc", "3")
    baseline = json.loads((run_dir / "baseline.json").read_text())
    assert base["retention/general/loss"] == baseline["retention/general/loss"]
    assert base["retention/general/bpb"] == baseline["retention/general/bpb"]
    assert base["retention/general/forgetting_pct"] == base["retention/general/forgetting_bpb_pct"] == 0.0


def test_eval_of_the_base_model_equals_the_baseline(assets: dict, trained: tuple[Path, Path]) -> None:
    run_dir, cfg = trained
    got = _eval_json(str(assets["model"]), "--config", str(cfg))
    baseline = json.loads((run_dir / "baseline.json").read_text())
    for key in ("val/loss", "retention/general/ppl"):
        assert abs(got[key] - baseline[key]) <= 1e-6, key
    assert abs(got["retention/general/forgetting_pct"]) <= 1e-6


def test_eval_prints_a_table_and_refuses_wrong_targets(assets: dict, trained: tuple[Path, Path]) -> None:
    run_dir, _ = trained
    done = keeltune("eval", str(run_dir), "--max-samples", "2")
    assert done.returncode == 0, done.stderr
    assert "retention/general" in done.stdout and "forgetting" in done.stdout and "bits/byte" in done.stdout
    missing = keeltune("eval", str(run_dir), "--checkpoint", str(HALF + 1))
    assert missing.returncode == 2 and f"complete checkpoints: [{HALF}, {STEPS}]" in missing.stderr
    no_config = keeltune("eval", str(assets["model"]))
    assert no_config.returncode == 2 and "--config CONFIG" in no_config.stderr


def test_report_writes_plots_and_a_summary_with_the_logged_numbers(
    ddp_run: SharedRun, tmp_path: Path
) -> None:
    run_dir = ddp_run.copy(tmp_path).run_dir  # the report goes into the run folder
    done = keeltune("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    out = run_dir / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "bias_amplification.png",
        "forgetting.png",
        "learning_rate.png",
        "task_metrics.png",
        "task_vs_retention.png",
        "train_loss.png",
    ]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "report.md").read_text()
    text = (out / "report.md").read_text()
    evals = [r for r in read_metrics(run_dir) if "val/loss" in r]
    assert "# Run report: test" in text and "backend: ddp" in text and f"steps: {STEPS} of {STEPS}" in text
    assert f"{evals[0]['val/loss']:.4f} (step 0) -> {evals[-1]['val/loss']:.4f} (step {STEPS})" in text
    best = min(evals, key=lambda r: r["val/loss"])
    assert f"best step by task validation loss: {best['step']} " in text
    printed = re.search(r"forgetting ([+-][0-9.]+)%.*bits per byte .*, forgetting ([+-][0-9.]+)%", text)
    assert printed and float(printed.group(1)) == round(evals[-1]["retention/general/forgetting_pct"], 2)
    assert float(printed.group(2)) == round(evals[-1]["retention/general/forgetting_bpb_pct"], 2)
    cloze = [r for r in read_metrics(run_dir) if "task/cloze/acc" in r]
    assert [r["step"] for r in cloze] == [0, 2, 4, 6]  # the task's own interval, and the end
    line = (
        f"`task/cloze/acc`: {cloze[0]['task/cloze/acc']:.4f} (step 0) -> {cloze[-1]['task/cloze/acc']:.4f} ± "
    )
    assert line in text and "change since step 0" in text


def test_report_skips_plots_whose_data_is_missing(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from keeltune.training.report import write_report

    run_dir = tmp_path / "train-only"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((trained[0] / "config.yaml").read_text())
    train_only = [r for r in read_metrics(trained[0]) if "train/loss" in r]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_only))
    report = write_report(run_dir, tmp_path / "out")
    assert sorted(p.name for p in report.parent.glob("*.png")) == ["learning_rate.png", "train_loss.png"]
    assert "task validation" not in report.read_text()


def test_eval_of_a_model_with_another_tokenizer_prepares_its_own_sets(
    assets: dict, ddp_run: SharedRun, tmp_path: Path
) -> None:
    import shutil

    from keeltune.demo.tokenizer import train_tokenizer

    copy = ddp_run.copy(tmp_path)  # the other tokenizer's sets are prepared into the config's run folder
    run_dir, cfg = copy.run_dir, copy.config
    other = tmp_path / "other-model"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(assets["model"] / name, other / name)
    train_tokenizer(
        [json.loads(line)["text"] for line in assets["general"].read_text().splitlines()], 300, other
    )
    index_before = (run_dir / "data" / "val-task" / "index.json").read_text()
    got = _eval_json(str(other), "--config", str(cfg))
    assert set(got) >= {"val/loss", "retention/general/ppl"} and got["val/loss"] > 0
    assert (
        run_dir / "data" / "val-task" / "index.json"
    ).read_text() == index_before  # the run's sets untouched
    assert len(list((run_dir / "data").glob("retention-general-tokenizer-*"))) == 1


def test_export_interpolated_toward_the_base_spans_base_to_fine_tuned(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """export --interpolate ALPHA: 0 gives the base's numbers (the baseline), 1 the fine-tuned checkpoint's."""
    run_dir, cfg = trained
    baseline = json.loads((run_dir / "baseline.json").read_text())
    logged = _logged(run_dir, STEPS)
    numbers = {}
    for alpha in ("0", "1"):
        out = tmp_path / f"alpha-{alpha}"
        done = keeltune("export", str(run_dir), "--out", str(out), "--interpolate", alpha)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"interpolated toward the base with alpha {alpha}" in done.stdout
        numbers[alpha] = _eval_json(str(out), "--config", str(cfg))
    for key in ("val/loss", "retention/general/loss"):
        assert abs(numbers["0"][key] - baseline[key]) <= 1e-6, (key, numbers["0"][key], baseline[key])
        assert abs(numbers["1"][key] - logged[key]) <= 1e-6, (key, numbers["1"][key], logged[key])
    bad = keeltune("export", str(run_dir), "--out", str(tmp_path / "bad"), "--interpolate", "2")
    assert bad.returncode != 0 and "alpha must be in [0, 1]" in bad.stderr
