"""``keeltune review create`` on a QLoRA run: its answers come from the merged model in ``final/``, or, without
``final/``, from its newest checkpoint merged onto the 4-bit base: the same answers either way."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import SharedRun


def test_review_answers_of_a_qlora_run_from_final_or_from_its_checkpoint(
    qlora_run: SharedRun, assets: dict[str, Path], tmp_path: Path
) -> None:
    """Plain-text prompts (general text): the fine-tune continues them rather than ending at once."""
    from keeltune.training.review_answers import review_items

    general = str(assets["general"])
    options = {"against": [], "prompts": general, "fmt": "text", "n": 4, "seed": 3, "max_new_tokens": 6}
    run = qlora_run.copy(tmp_path)
    items, key = review_items(run.run_dir, **options)
    assert key["prompts"] == {"source": general, "format": "text", "count": 4}
    from_final = _run_answers(items, key)
    shutil.rmtree(run.run_dir / "final")
    from_checkpoint = _run_answers(*review_items(run.run_dir, **options))
    assert from_final == from_checkpoint and len(from_final) == 4
    assert any(from_final.values())  # some continue with text (others with whitespace only)


def _run_answers(items: list[dict], key: dict) -> dict[int, str]:
    """The run's (model 0's) answer to each prompt."""
    found = {}
    for item in items:
        side = next(s for s, model in key["sides"][item["id"]].items() if model == 0)
        found[key["prompt_index"][item["id"]]] = item["answers"][side]
    return found
