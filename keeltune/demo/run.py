"""``keeltune demo``: offline, on CPU, with real text. Pretrain a tiny base (cached), fine-tune it, show forgetting.

The base model is pretrained with keeltune's own training loop on the English text of Python's documentation
(``pydoc_data.topics``) and cached by recipe; the fine-tune teaches it the standard library's docstrings as
instructions while retention perplexity on held-out documentation shows what it forgets. Two multiple-choice
tasks, scored at the fine-tune's start and end, put accuracies with standard errors on the same story: which
module defines a name (the domain) and how a held-out documentation passage goes on (retention).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from keeltune.atomic import atomic_path
from keeltune.config import BACKENDS, DEFAULT_BACKEND, Config, config_from_dict
from keeltune.demo import corpora
from keeltune.demo.recipe import DEFAULT, EVAL_ONLY, SMOKE, Recipe, Schedule, llama_config
from keeltune.demo.tokenizer import train_tokenizer
from keeltune.eval.names import STDERR, task_metric
from keeltune.eval.scoring import sample_stderr
from keeltune.launcher.entry import train_rank
from keeltune.launcher.run_dir import prepare_run_dir
from keeltune.run_folder import eval_items_file
from keeltune.training.report import plot_comparison, read_metrics
from keeltune.training.report import plot_curves as plot_task_and_retention
from keeltune.training.trainer import TrainSummary

BASE_INFO = "pretrain.json"


class DemoError(RuntimeError):
    """The demo could not reach what it promises (e.g. the base model's perplexity)."""


@dataclass(frozen=True)
class DemoFiles:
    """The demo's JSONL sets."""

    general_train: Path
    retention: Path
    retention_test: Path
    task_train: Path
    task_val: Path
    module_quiz: Path  # multiple choice: which module defines a name (domain task)
    docs_cloze: Path  # multiple choice: how a passage of general_retention_test goes on (retention task)


DOMAIN_TASK = "stdlib_mc"
RETENTION_TASK = "docs_cloze"


def write_datasets(folder: Path, task_items: int = DEFAULT.task_items) -> DemoFiles:
    """Build the general corpus, the instruction set and ``task_items`` items of each multiple-choice task from
    this Python's standard library. The cloze passages come from ``retention_test``: held out of pretraining,
    of the fine-tune and of its replay, and not the retention-perplexity set."""
    folder.mkdir(parents=True, exist_ok=True)
    general = corpora.general_corpus()
    tasks = corpora.instruction_dataset()
    training = [r["instruction"] for r in tasks["train"]]
    return DemoFiles(
        general_train=corpora.write_jsonl(folder / "general_train.jsonl", general["train"]),
        retention=corpora.write_jsonl(folder / "general_retention.jsonl", general["retention"]),
        retention_test=corpora.write_jsonl(
            folder / "general_retention_test.jsonl", general["retention_test"]
        ),
        task_train=corpora.write_jsonl(folder / "task_train.jsonl", tasks["train"]),
        task_val=corpora.write_jsonl(folder / "task_val.jsonl", tasks["val"]),
        module_quiz=corpora.write_jsonl(
            folder / f"{DOMAIN_TASK}.jsonl", corpora.module_quiz(task_items, training)
        ),
        docs_cloze=corpora.write_jsonl(
            folder / f"{RETENTION_TASK}.jsonl",
            corpora.docs_cloze(general["retention_test"], general["train"], task_items),
        ),
    )


def eval_tasks(files: DemoFiles, every_steps: int) -> list[dict[str, Any]]:
    """The fine-tune's multiple-choice tasks (``eval.tasks``), every ``every_steps`` steps (and at 0 and the
    end, as always)."""
    return [
        {
            "name": DOMAIN_TASK,
            "path": str(files.module_quiz),
            "kind": "multiple_choice",
            "format": "instruction",
            "every_steps": every_steps,
        },
        {
            "name": RETENTION_TASK,
            "path": str(files.docs_cloze),
            "kind": "multiple_choice",
            "format": "text",
            "retention": True,
            "every_steps": every_steps,
        },
    ]


def recipe_key(recipe: Recipe, files: DemoFiles) -> str:
    """Changes when the recipe, the data or the Python version changes (then the base is pretrained again);
    the recipe's evaluation-only numbers (``EVAL_ONLY``) do not count."""
    numbers = {k: v for k, v in asdict(recipe).items() if k not in EVAL_ONLY}
    digest = hashlib.sha256(json.dumps(numbers, sort_keys=True, default=str).encode())
    digest.update(sys.version.encode())
    for path in (files.general_train, files.task_train):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def phase_config(
    name: str,
    root: Path,
    model: Path,
    schedule: Schedule,
    recipe: Recipe,
    train: dict[str, str],
    files: DemoFiles,
    backend: str = DEFAULT_BACKEND,
    *,
    overrides: dict[str, Any] | None = None,
    retention_test: bool = False,
    tasks: list[dict[str, Any]] | None = None,
) -> Config:
    """A keeltune config for one demo phase (validated like any YAML config). ``overrides`` is merged into it
    (nested dicts merged, other values replaced); ``retention_test`` also evaluates the second held-out split;
    ``tasks`` are its ``eval.tasks`` (see ``eval_tasks``)."""
    retention = [{"name": "python-docs", "path": str(files.retention)}]
    if retention_test:
        retention.append({"name": "python-docs-test", "path": str(files.retention_test)})
    data: dict[str, Any] = {"seq_len": recipe.seq_len, "train": [train], "retention": retention}
    if train["format"] == "instruction":
        data["validation"] = {"name": "stdlib-qa", "path": str(files.task_val), "format": "instruction"}
    tree = {
        "run": {"name": name, "root": str(root)},
        "model": {"path": str(model)},
        "data": data,
        "training": {
            "max_steps": schedule.steps,
            "global_batch_size": schedule.batch_size,
            "micro_batch_size": schedule.micro_batch_size,
            "lr": schedule.lr * (recipe.lora_lr_scale if BACKENDS[backend].adapters else 1.0),
            "warmup_steps": schedule.warmup_steps,
            "min_lr_ratio": schedule.min_lr_ratio,
            "grad_clip": schedule.grad_clip,
            "precision": "fp32",
            "seed": recipe.seed,
            "checkpoint": {"every_steps": max(1, schedule.steps // 2), "keep_last": 1},
        },
        "sharding": {"backend": backend},
        "regularization": {"weight_decay": schedule.weight_decay},
        "eval": {
            "every_steps": schedule.eval_every,
            "micro_batch_size": 16,
            "max_samples": recipe.eval_max_samples,
            "tasks": tasks or [],
            "task_batch_size": recipe.task_batch_size,
        },
        "logging": {"every_steps": 1, "wandb": {"mode": "offline", "project": "keeltune-demo"}},
    }
    return config_from_dict(merge_tree(tree, overrides or {}), origin=f"demo:{name}")


def merge_tree(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``overrides`` merged in: nested dicts merged key by key, other values replaced."""
    merged = dict(tree)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def train(config: Config) -> TrainSummary:
    run_dir, _ = prepare_run_dir(config)
    return train_rank(run_dir)


def ensure_base(
    recipe: Recipe, files: DemoFiles, root: Path, cache: Path, console: Console
) -> tuple[Path, dict]:
    """The pretrained base for this recipe: from the cache, or pretrained now and cached."""
    key = recipe_key(recipe, files)
    base = cache / f"demo-base-{key}"
    if (base / BASE_INFO).is_file():
        info = json.loads((base / BASE_INFO).read_text())
        console.print(
            f"[green]base model[/] reused from cache: {base} (retention ppl {info['retention_ppl']:.1f})"
        )
        return base, {**info, "cached": True}
    started = time.perf_counter()
    init = root / f"demo-init-{key}"
    console.print("[bold]1/2 pretraining the base model[/] on Python's documentation (cached afterwards)")
    tokenizer = train_tokenizer(
        _texts(files.general_train) + _texts(files.task_train, "output"), recipe.vocab_size, init
    )
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    LlamaForCausalLM(llama_config(recipe, tokenizer)).save_pretrained(init)
    config = phase_config(
        f"demo-pretrain-{key}",
        root,
        init,
        recipe.pretrain,
        recipe,
        {"name": "python-docs", "path": str(files.general_train), "format": "text"},
        files,
    )
    summary = train(config)
    ppl = summary.last_eval["retention/python-docs/ppl"]
    if ppl > recipe.max_pretrain_ppl:
        raise DemoError(
            f"the pretrained base reached held-out perplexity {ppl:.1f}, above the promised "
            f"{recipe.max_pretrain_ppl:.0f}; see {summary.run_dir}/metrics.jsonl"
        )
    info = {
        "retention_ppl": ppl,
        "initial_retention_ppl": summary.first_eval.get("retention/python-docs/ppl", float("nan")),
        "pretrain_seconds": round(time.perf_counter() - started, 1),
        "pretrain_run": str(summary.run_dir),
        "recipe_key": key,
    }
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(base) as tmp:  # the cached base appears whole (with its BASE_INFO) or not at all
        shutil.copytree(summary.final_model, tmp)
        (tmp / BASE_INFO).write_text(json.dumps(info, indent=1))
    shutil.rmtree(init, ignore_errors=True)
    return base, {**info, "cached": False}


def _texts(path: Path, field: str = "text") -> list[str]:
    return [json.loads(line)[field] for line in path.read_text().splitlines() if line]


def plot_curves(run_dir: Path, out: Path) -> Path | None:
    """Task validation loss and retention perplexity over the fine-tune, side by side."""
    return plot_task_and_retention(
        read_metrics(run_dir),
        out,
        task_title="Task: standard-library Q&A",
        retention_title="Retention: held-out Python docs (lower is better)",
    )


REPLAY_SHARE = 0.2  # general text in the mitigated fine-tune: the best method of bench/forgetting.py


def replay_overrides(task: dict[str, str], files: DemoFiles, share: float = REPLAY_SHARE) -> dict[str, Any]:
    """Mix ``share`` of general text (the pretraining corpus) into the fine-tune's training stream."""
    general = {"name": "python-docs-replay", "path": str(files.general_train), "format": "text"}
    return {"data": {"train": [{**task, "weight": round(1 - share, 6)}, {**general, "weight": share}]}}


def _item_accuracies(run_dir: Path, step: int, task: str) -> dict[int, float]:
    """Each item's accuracy (0 or 1) in one eval of ``task``, from the run's per-item file."""
    rows = eval_items_file(run_dir, step, task).read_text().splitlines()
    return {row["index"]: row["acc"] for row in map(json.loads, rows)}


def _paired_change(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """The change in accuracy points over the items both hold, and its standard error: that of the mean
    per-item difference (the same items twice, so paired; lm-eval's sample standard error)."""
    diffs = [100 * (after[i] - before[i]) for i in sorted(before.keys() & after.keys())]
    return sum(diffs) / len(diffs), sample_stderr(diffs) or 0.0


def within_noise(change: float, stderr: float) -> bool:
    """Whether a change is under two standard errors (no change at all counts as within noise)."""
    return change == 0 or abs(change) < 2 * stderr


def _change(found: dict[str, Any]) -> str:
    """A change in points with its standard error and, in words, whether it is within two of them."""
    noise = "within noise (< 2 SE)" if found["within_noise"] else "beyond noise (≥ 2 SE)"
    return f"{found['change_pts']:+.1f} ± {found['change_pts_stderr']:.1f}, {noise}"


def _accuracies(summary: TrainSummary) -> dict[str, dict[str, Any]]:
    """Each task's accuracy (a fraction) at step 0 and at the end with their standard errors, and the change in
    points with its paired standard error."""
    before, after = summary.first_eval, summary.last_eval
    found: dict[str, dict[str, Any]] = {}
    for task in (DOMAIN_TASK, RETENTION_TASK):
        key = task_metric(task, "acc")
        if key not in before or key not in after:
            continue
        change, stderr = _paired_change(
            _item_accuracies(summary.run_dir, 0, task),
            _item_accuracies(summary.run_dir, summary.steps, task),
        )
        found[task] = {
            "acc_before": before[key],
            "acc_before_stderr": before[key + STDERR],
            "acc_after": after[key],
            "acc_after_stderr": after[key + STDERR],
            "change_pts": change,
            "change_pts_stderr": stderr,
            "within_noise": within_noise(change, stderr),
        }
    return found


def _versus(plain: TrainSummary, other: TrainSummary) -> dict[str, dict[str, Any]]:
    """Each task's final accuracy of ``other`` minus ``plain``'s, in points, with the paired standard error."""
    found = {}
    for task in (DOMAIN_TASK, RETENTION_TASK):
        change, stderr = _paired_change(
            _item_accuracies(plain.run_dir, plain.steps, task),
            _item_accuracies(other.run_dir, other.steps, task),
        )
        found[task] = {
            "change_pts": change,
            "change_pts_stderr": stderr,
            "within_noise": within_noise(change, stderr),
        }
    return found


def _outcome(summary: TrainSummary, seconds: float) -> dict[str, Any]:
    before, after = summary.first_eval, summary.last_eval
    return {
        "task_loss_before": before["val/loss"],
        "task_loss_after": after["val/loss"],
        "retention_ppl_before": before["retention/python-docs/ppl"],
        "retention_ppl_after": after["retention/python-docs/ppl"],
        "forgetting_pct": after["retention/python-docs/forgetting_pct"],
        "tasks": _accuracies(summary),
        "tokens_per_s": summary.tokens_per_s,
        "finetune_seconds": round(seconds, 1),
        "run_dir": str(summary.run_dir),
        "wandb": summary.wandb,
        "final_model": str(summary.final_model),
    }


def run_demo(
    *,
    root: Path,
    smoke: bool = False,
    cache: Path | None = None,
    backend: str = DEFAULT_BACKEND,
    mitigation: bool = True,
) -> dict[str, Any]:
    """Run the whole demo and print its summary; returns the numbers shown. ``backend`` is the fine-tune's
    (the base is always pretrained with plain data parallel, and cached). With ``mitigation`` the fine-tune
    runs twice, without and with replay of general text, and both are shown side by side."""
    console = Console(stderr=False)
    recipe = SMOKE if smoke else DEFAULT
    label = "demo-smoke" if smoke else "demo"
    root = root.resolve()
    cache = (cache or Path(os.environ.get("KEELTUNE_CACHE", "~/.cache/keeltune"))).expanduser().resolve()
    started = time.perf_counter()
    files = write_datasets(root / f"{label}-data", recipe.task_items)
    base, base_info = ensure_base(recipe, files, root, cache, console)
    task = {"name": "stdlib-qa", "path": str(files.task_train), "format": "instruction"}
    # the multiple-choice tasks at the fine-tune's step 0 and last step only (the trainer always scores both)
    tasks = eval_tasks(files, every_steps=recipe.finetune.steps)

    def finetune(name: str, overrides: dict[str, Any] | None = None) -> tuple[TrainSummary, float]:
        shutil.rmtree(root / name, ignore_errors=True)  # each demo shows a fresh fine-tune
        config = phase_config(
            name, root, base, recipe.finetune, recipe, task, files, backend, overrides=overrides, tasks=tasks
        )
        began = time.perf_counter()
        return train(config), time.perf_counter() - began

    console.print(
        f"[bold]2/2 fine-tuning[/] ({backend}) on standard-library Q&A, evaluating retention on held-out docs"
    )
    name = f"{label}-finetune" + ("" if backend == DEFAULT_BACKEND else f"-{backend}")
    summary, seconds = finetune(name)
    plot = plot_curves(summary.run_dir, summary.run_dir / "curves.png")
    result: dict[str, Any] = {
        **_outcome(summary, seconds),
        "backend": backend,
        "base": str(base),
        "base_cached": base_info["cached"],
        "plot": str(plot),
    }
    if mitigation:
        method = f"replay {REPLAY_SHARE:.0%}"
        console.print(
            f"[bold]and again with {method}[/] of general text mixed in, against forgetting (side by side)"
        )
        mitigated, seconds = finetune(f"{name}-replay", replay_overrides(task, files))
        result["mitigated"] = {
            "method": method,
            **_outcome(mitigated, seconds),
            "versus_plain": _versus(summary, mitigated),
        }
        result["comparison_plot"] = str(
            plot_comparison(
                {"fine-tuned": read_metrics(summary.run_dir), f"+ {method}": read_metrics(mitigated.run_dir)},
                summary.run_dir / "comparison.png",
                task_title="Task: standard-library Q&A (validation loss)",
                retention_title="Retention: held-out Python docs (perplexity, lower is better)",
            )
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    _print_summary(console, result, base_info)
    (summary.run_dir / "demo_summary.json").write_text(json.dumps(result, indent=1))
    return result


def _percent(value: float, stderr: float) -> str:
    """An accuracy and its standard error in percent, e.g. ``41.3% ± 2.4``."""
    return f"{100 * value:.1f}% ± {100 * stderr:.1f}"


def _print_summary(console: Console, r: dict[str, Any], base_info: dict[str, Any]) -> None:
    mitigated = r.get("mitigated")
    table = Table(title=f"keeltune demo: fine-tuning a tiny base on standard-library Q&A ({r['backend']})")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    if mitigated:
        table.add_column(f"fine-tuned + {mitigated['method']}", justify="right")
    runs = [r, mitigated] if mitigated else [r]
    table.add_row(
        "task validation loss",
        f"{r['task_loss_before']:.3f}",
        *(
            f"{x['task_loss_after']:.3f} ({100 * (x['task_loss_after'] / x['task_loss_before'] - 1):+.1f}%)"
            for x in runs
        ),
    )
    table.add_row(
        "retention perplexity (held-out Python docs)",
        f"{r['retention_ppl_before']:.1f}",
        *(f"{x['retention_ppl_after']:.1f} ({x['forgetting_pct']:+.1f}% forgetting)" for x in runs),
    )
    console.print(table)
    labels = {DOMAIN_TASK: "domain", RETENTION_TASK: "retention, held-out docs"}
    shown = [t for t in labels if t in r["tasks"]]
    if shown:
        accuracy = Table(
            title=f"multiple-choice accuracy ± standard error (chance {1 / corpora.CHOICES:.0%})"
        )
        for column in ("task", "base", "fine-tuned", *([f"+ {mitigated['method']}"] if mitigated else [])):
            accuracy.add_column(column, justify="left" if column == "task" else "right")
        for task in shown:
            first = r["tasks"][task]
            accuracy.add_row(
                f"{task} ({labels[task]})",
                _percent(first["acc_before"], first["acc_before_stderr"]),
                *(
                    _percent(x["tasks"][task]["acc_after"], x["tasks"][task]["acc_after_stderr"])
                    for x in runs
                ),
            )
        console.print(accuracy)
        console.print(
            "accuracy changes in points ± standard error (paired over the same items):", soft_wrap=True
        )
        names = ["fine-tuned", f"+ {mitigated['method']}"] if mitigated else ["fine-tuned"]
        for task in shown:
            changes = [f"{name} {_change(x['tasks'][task])}" for name, x in zip(names, runs, strict=True)]
            console.print(f"  {task}: " + "; ".join(changes), soft_wrap=True)
        if mitigated:
            versus = [f"{task} {_change(v)}" for task, v in mitigated["versus_plain"].items()]
            console.print(
                f"  {mitigated['method']} minus plain fine-tune: " + "; ".join(versus), soft_wrap=True
            )
    if mitigated and r["forgetting_pct"] > 0:
        removed = 100 * (1 - mitigated["forgetting_pct"] / r["forgetting_pct"])
        cost = 100 * (mitigated["task_loss_after"] / r["task_loss_after"] - 1)
        console.print(
            f"{mitigated['method']} removed {removed:.0f}% of the forgetting at a task-loss cost of {cost:+.1f}% "
            "(other methods, measured: bench/forgetting.py, docs/benchmarks.md)"
        )
    elif mitigated:
        console.print("the unregularized fine-tune did not forget here: nothing for replay to remove")
    source = "cached" if r["base_cached"] else f"pretrained in {base_info['pretrain_seconds']:.0f} s"
    console.print(f"base model        {r['base']} ({source}, retention ppl {base_info['retention_ppl']:.1f})")
    console.print(f"fine-tune speed   {r['tokens_per_s']:,.0f} tokens/s")
    times = [f"{r['finetune_seconds']:.0f} s"]
    if mitigated:
        times.append(f"{mitigated['finetune_seconds']:.0f} s with {mitigated['method']}")
    console.print(f"fine-tune time    {', '.join(times)} (evaluations included)")
    for x in runs:
        console.print(f"run folder        {x['run_dir']}")
    console.print(f"W&B offline run   {r['wandb']}  (upload: wandb sync <that folder>)")
    for x in runs:
        console.print(f"final model       {x['final_model']}  (Hugging Face format)")
    console.print(f"curves            {r['plot']}")
    if mitigated:
        console.print(f"side by side      {r['comparison_plot']}")
    console.print(f"total time        {r['seconds']:.0f} s")
