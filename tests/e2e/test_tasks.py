"""Task evaluation in a trained run (the session's ddp run: a retention cloze task every 2 steps, a generation
task at the evals of steps 0, 3 and 6), ``keeltune eval --tasks`` and ``--lm-eval`` on it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import DDP_RUN_STEPS, SharedRun, keeltune, read_metrics


def _items(run_dir: Path, step: int, task: str) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "eval" / str(step) / f"{task}.jsonl").read_text().splitlines()
    ]


def test_tasks_are_evaluated_at_their_intervals_with_per_item_records(ddp_run: SharedRun) -> None:
    run_dir = ddp_run.run_dir
    records = read_metrics(run_dir)
    steps = {
        task: [r["step"] for r in records if f"task/{task}/{metric}" in r]
        for task, metric in (("cloze", "acc"), ("qa", "f1"))
    }
    assert steps == {"cloze": [0, 2, 4, DDP_RUN_STEPS], "qa": [0, 3, DDP_RUN_STEPS]}
    baseline = json.loads((run_dir / "baseline.json").read_text())
    assert {"task/cloze/acc", "task/cloze/acc_norm_stderr", "task/qa/f1", "task/qa/chrf"} <= set(baseline)
    for record in records:
        if "task/cloze/acc" in record:  # a retention task: its change since step 0, in its own units
            assert record["task/cloze/acc_change"] == record["task/cloze/acc"] - baseline["task/cloze/acc"]
            items = _items(run_dir, record["step"], "cloze")
            assert len(items) == 7 and all(len(i["loglikelihoods"]) == len(i["choices"]) == 4 for i in items)
            assert sum(i["acc"] for i in items) / 7 == record["task/cloze/acc"]
            assert all(
                i["acc"] == float(max(range(4), key=i["loglikelihoods"].__getitem__) == i["gold"])
                for i in items
            )
        if "task/qa/f1" in record:
            assert "task/qa/f1_change" not in record  # not a retention task
            items = _items(run_dir, record["step"], "qa")
            assert len(items) == 5 and sum(i["f1"] for i in items) / 5 == record["task/qa/f1"]
            assert all(
                set(i) >= {"prompt", "generation", "references", "exact_match", "rouge_l"} for i in items
            )


def test_the_final_model_carries_the_training_format_as_its_chat_template(ddp_run: SharedRun) -> None:
    """Trained on instruction records without a chat template: final/ renders a question exactly as training
    did (the generation task's prompts are rendered by the training formats)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ddp_run.run_dir / "final")
    assert (ddp_run.run_dir / "final" / "chat_template.jinja").is_file()
    question = json.loads(
        Path(yaml.safe_load(ddp_run.config.read_text())["eval"]["tasks"][1]["path"])
        .read_text()
        .splitlines()[0]
    )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question["instruction"]}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == _items(ddp_run.run_dir, DDP_RUN_STEPS, "qa")[0]["prompt"]
    assert rendered.endswith("### Response:\n")


def test_eval_of_chosen_tasks_only(ddp_run: SharedRun) -> None:
    done = keeltune("eval", str(ddp_run.run_dir), "--tasks", "qa", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got and all(key.startswith("task/qa/") for key in got)  # no held-out set, no other task
    logged = next(
        r for r in read_metrics(ddp_run.run_dir) if r["step"] == DDP_RUN_STEPS and "task/qa/f1" in r
    )
    assert all(got[key] == logged[key] for key in ("task/qa/exact_match", "task/qa/f1"))
    table = keeltune("eval", str(ddp_run.run_dir), "--tasks", "cloze")
    assert (
        table.returncode == 0
        and "task/cloze/acc_norm" in table.stdout
        and "change since step 0" in table.stdout
    )
    unknown = keeltune("eval", str(ddp_run.run_dir), "--tasks", "nope")
    assert unknown.returncode == 2 and "--tasks: ['nope'] are not tasks of this config" in unknown.stderr


def test_lm_eval_on_a_run_lands_in_the_run_folder_and_agrees_with_keeltunes_scorer(
    ddp_run: SharedRun, tmp_path: Path
) -> None:
    """The run's cloze task as a local lm-evaluation-harness task (data on disk, offline) on the exported final
    checkpoint: lm-eval's accuracy equals what the trainer's own scorer logged at the last step (lm-eval is told
    to start each context with BOS, as keeltune's text format does)."""
    copy = ddp_run.copy(tmp_path)
    cloze = yaml.safe_load(copy.config.read_text())["eval"]["tasks"][0]["path"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "cloze_lm.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "cloze_lm",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": cloze}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "description": "<|bos|>",
                "doc_to_text": "{{text}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    done = keeltune(
        "eval", str(copy.run_dir), "--lm-eval", "cloze_lm", "--include-path", str(tasks), "--json"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    logged = next(
        r for r in read_metrics(copy.run_dir) if "task/cloze/acc" in r and r["step"] == DDP_RUN_STEPS
    )
    assert got["lm_eval/cloze_lm/acc"] == logged["task/cloze/acc"]
    assert got["lm_eval/cloze_lm/acc_norm"] == logged["task/cloze/acc_norm"]
    saved = json.loads((copy.run_dir / "lm_eval" / f"step_{DDP_RUN_STEPS}.json").read_text())
    assert saved["tasks"] == ["cloze_lm"] and "cloze_lm" in saved["results"]
    last = read_metrics(copy.run_dir)[-1]
    assert last["step"] == DDP_RUN_STEPS and last["lm_eval/cloze_lm/acc"] == got["lm_eval/cloze_lm/acc"]
