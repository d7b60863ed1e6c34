"""``keeltune demo --smoke``: the main job end to end on a tiny recipe, then again from the cached base."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import keeltune


def test_demo_smoke_runs_end_to_end_and_reuses_the_cached_base(tmp_path: Path) -> None:
    args = ("demo", "--smoke", "--root", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"))
    first = keeltune(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for text in ("task validation loss", "retention perplexity", "W&B offline run", "final model"):
        assert text in first.stdout
    run_dir = tmp_path / "runs" / "demo-smoke-finetune"
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert summary["task_loss_after"] < summary["task_loss_before"]  # it learned the task
    assert summary["base_cached"] is False
    assert (run_dir / "final" / "model.safetensors").is_file() and (
        run_dir / "final" / "tokenizer.json"
    ).is_file()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    bases = list((tmp_path / "cache").glob("demo-base-*"))
    assert len(bases) == 1 and (bases[0] / "model.safetensors").is_file()

    second = keeltune(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reused from cache" in second.stdout
    again = json.loads((run_dir / "demo_summary.json").read_text())
    assert again["base_cached"] is True
    assert again["retention_ppl_before"] == summary["retention_ppl_before"]  # same base, same baseline
