"""``keeltune demo --smoke``: the main job end to end on a tiny recipe, then again from the cached base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import keeltune


def test_demo_smoke_runs_end_to_end_and_reuses_the_cached_base(tmp_path: Path) -> None:
    args = ("demo", "--smoke", "--root", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"))
    first = keeltune(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for text in ("task validation loss", "retention perplexity", "W&B offline run", "final model"):
        assert text in first.stdout
    assert "accuracy changes in points" in first.stdout
    assert "within noise (< 2 SE)" in first.stdout or "beyond noise (≥ 2 SE)" in first.stdout
    run_dir = tmp_path / "runs" / "demo-smoke-finetune"
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert summary["task_loss_after"] < summary["task_loss_before"]  # it learned the task
    assert summary["base_cached"] is False
    assert (run_dir / "final" / "model.safetensors").is_file() and (
        run_dir / "final" / "tokenizer.json"
    ).is_file()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # side by side: the same fine-tune with replay of general text, from the same base and baseline
    mitigated = summary["mitigated"]
    assert (
        mitigated["method"] == "replay 20%"
        and "replay 20%" in first.stdout
        and "side by side" in first.stdout
    )
    assert mitigated["retention_ppl_before"] == summary["retention_ppl_before"]
    assert mitigated["task_loss_after"] < mitigated["task_loss_before"]
    assert ("of the forgetting at a task-loss cost of" in first.stdout) == (summary["forgetting_pct"] > 0)
    replay_run = tmp_path / "runs" / "demo-smoke-finetune-replay"
    fractions = [
        r
        for r in map(json.loads, (replay_run / "metrics.jsonl").read_text().splitlines())
        if r.get("step") == 10
    ]
    assert any(abs(r.get("data/python-docs-replay/fraction", -1) - 0.2) < 0.05 for r in fractions)
    _check_task_accuracies(summary, mitigated, (run_dir, replay_run), tmp_path / "runs" / "demo-smoke-data")
    assert Path(summary["comparison_plot"]).read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    bases = list((tmp_path / "cache").glob("demo-base-*"))
    assert len(bases) == 1 and (bases[0] / "model.safetensors").is_file()

    args = (*args, "--no-mitigation")  # the rest: the unregularized fine-tune only
    second = keeltune(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reused from cache" in second.stdout
    again = json.loads((run_dir / "demo_summary.json").read_text())
    assert again["base_cached"] is True
    assert again["retention_ppl_before"] == summary["retention_ppl_before"]  # same base, same baseline

    for backend in ("zero3", "qlora"):  # the same demo through the other backends, from the cached base
        other = keeltune(*args, "--backend", backend, timeout=600)
        assert other.returncode == 0, other.stderr[-3000:]
        assert f"({backend})" in other.stdout and "reused from cache" in other.stdout
        result = json.loads(
            (tmp_path / "runs" / f"demo-smoke-finetune-{backend}" / "demo_summary.json").read_text()
        )
        assert result["backend"] == backend
        assert result["task_loss_after"] < result["task_loss_before"]
        if backend == "zero3":  # the same fp32 base, partitioned: the same baseline (seen: to the bit)
            assert abs(result["retention_ppl_before"] / summary["retention_ppl_before"] - 1) <= 1e-6
        else:  # the 4-bit base is close to, not equal to, the fp32 one
            assert abs(result["retention_ppl_before"] / summary["retention_ppl_before"] - 1) < 0.02


def _check_task_accuracies(summary: dict, mitigated: dict, runs: tuple[Path, ...], data: Path) -> None:
    """The multiple-choice tasks: accuracies with standard errors before and after, per-item files, held-out items."""
    for result in (summary, mitigated):
        for task in ("stdlib_mc", "docs_cloze"):
            found = result["tasks"][task]
            assert 0 <= found["acc_before"] <= 1 and 0 <= found["acc_after"] <= 1
            assert found["acc_before_stderr"] > 0 and found["acc_after_stderr"] > 0
            assert found["change_pts"] == pytest.approx(100 * (found["acc_after"] - found["acc_before"]))
            assert found["change_pts_stderr"] >= 0 and isinstance(found["within_noise"], bool)
            assert found["acc_before"] == summary["tasks"][task]["acc_before"]  # the same base
    assert set(mitigated["versus_plain"]) == {"stdlib_mc", "docs_cloze"}
    for run in runs:  # per-item results at step 0 and the last step, one line per item
        for step in (0, 10):
            for task in ("stdlib_mc", "docs_cloze"):
                assert len((run / "eval" / str(step) / f"{task}.jsonl").read_text().splitlines()) == 24
    quiz = [json.loads(line) for line in (data / "stdlib_mc.jsonl").read_text().splitlines()]
    trained = {
        json.loads(line)["instruction"] for line in (data / "task_train.jsonl").read_text().splitlines()
    }
    assert not trained & {item["instruction"] for item in quiz}  # the questions are held out
    general = [json.loads(line)["text"] for line in (data / "general_train.jsonl").read_text().splitlines()]
    for item in map(json.loads, (data / "docs_cloze.jsonl").read_text().splitlines()):
        passage = f"{item['text']} {item['choices'][item['gold']]}"
        assert not any(passage in text for text in general)  # held out of pretraining and replay
