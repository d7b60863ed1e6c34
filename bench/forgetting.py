"""Forgetting benchmark: how much of the forgetting each regularizer removes, and what it costs the task.

On the demo's pretrained tiny base (Python's documentation) and fine-tune (standard-library Q&A, 100 steps of
16x256, AdamW 5e-4), each method runs with the same steps, data order and seed; ``none`` is the unregularized
baseline of the same seed. Two held-out general splits are evaluated: each method's setting is chosen on the
selection split (``python-docs``, first seed) and reported on the other (``python-docs-test``), over every seed.

    removed = 1 - forgetting(method) / forgetting(none)     forgetting = retention perplexity rise, percent
    cost    = task val loss(method) / task val loss(none) - 1

Methods: replay of general text, self-replay (text drawn from the base model when training starts, no general
data), KL to the base, L2-SP, EWC (Fisher on the selection split), LoRA adapters (the qlora backend),
combinations, and weight interpolation toward the base after training (WiSE-FT,
``keeltune export --interpolate``), alone and after KL.
Selection: the setting removing the most forgetting within the cost budget of its goal (2% for methods that
train on general data, 3% for those that do not: self-replay, KL, L2-SP, EWC, LoRA, interpolation); the
cheapest setting if none fits.
Finished runs are kept in ``ROOT/results.json`` and not run again, so an interrupted benchmark continues.

    python bench/forgetting.py [--root /tmp/keeltune-forgetting] [--seeds 0 1] [--plot docs/forgetting.png]
                               [--methods self-replay kl ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from keeltune.config import load_config
from keeltune.demo.recipe import DEFAULT
from keeltune.demo.run import (
    DemoFiles,
    ensure_base,
    merge_tree,
    phase_config,
    replay_overrides,
    train,
    write_datasets,
)
from keeltune.sharding.interpolate import interpolate_toward_base
from keeltune.training.report import read_metrics, series
from keeltune.training.run_eval import EvalTarget, evaluate_target

SELECT, REPORT = "python-docs", "python-docs-test"


@dataclass(frozen=True)
class Setting:
    """One regularized fine-tune: its config overrides, whether it trains on general data, and for weight
    interpolation (WiSE-FT) the fraction ``alpha`` of the change of the ``source`` setting's run that is kept."""

    method: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    backend: str = "ddp"
    general_data: bool = False
    alpha: float | None = None
    source: Setting | None = None

    @property
    def key(self) -> str:
        return f"{self.method}:{self.label}"

    @property
    def budget_pct(self) -> float:
        return 2.0 if self.general_data else 3.0


def run_name(setting: Setting, seed: int) -> str:
    """A run folder name (letters, digits, '.', '_', '-') for a setting and seed."""
    label = re.sub(r"[^A-Za-z0-9._-]", "", setting.label.replace(" ", "_").replace("%", "pct"))
    method = setting.method.replace("+", "-plus-")
    return f"fg-{method}-{label}-s{seed}"


def self_replay_overrides(task: dict[str, str], share: float) -> dict[str, Any]:
    """Mix ``share`` of text drawn from the base model when training starts (no general data)."""
    generated = {"name": "base-samples", "generate": {"samples": 1000}}
    return {"data": {"train": [{**task, "weight": round(1 - share, 6)}, {**generated, "weight": share}]}}


def settings(task: dict[str, str], files: DemoFiles) -> list[Setting]:
    """The grid: every method at a few strengths around what the prototype in STACK_NOTES suggested."""
    none = Setting("none", "-")
    grid = [none]
    grid += [
        Setting("replay", f"{int(s * 100)}%", replay_overrides(task, files, s), general_data=True)
        for s in (0.1, 0.2, 0.3)
    ]
    grid += [
        Setting("kl", f"w={w:g}", {"regularization": {"kl": {"weight": w}}}) for w in (0.25, 0.5, 1.0, 2.0)
    ]
    grid += [
        Setting("l2sp", f"w={w:g}", {"regularization": {"l2sp": {"weight": w}}}) for w in (0.003, 0.01, 0.03)
    ]
    grid += [
        Setting("ewc", f"w={w:g}", {"regularization": {"ewc": {"weight": w, "sets": [SELECT]}}})
        for w in (1e3, 1e4, 1e5, 1e6)
    ]
    grid += [
        Setting("lora", f"r=16 lr={lr:g}", {"training": {"lr": lr}}, backend="qlora") for lr in (2e-3, 4e-3)
    ]
    grid += [
        Setting(
            "replay+kl",
            f"{int(s * 100)}% w={w:g}",
            {**replay_overrides(task, files, s), "regularization": {"kl": {"weight": w}}},
            general_data=True,
        )
        for s, w in ((0.1, 0.5), (0.2, 0.5))
    ]
    grid += [
        Setting(
            "kl+ewc",
            f"w={w:g} w={e:g}",
            {"regularization": {"kl": {"weight": w}, "ewc": {"weight": e, "sets": [SELECT]}}},
        )
        for w, e in ((0.5, 1e4), (0.25, 3e4), (0.25, 1e5))
    ]
    grid += [
        Setting("self-replay", f"{int(s * 100)}%", self_replay_overrides(task, s)) for s in (0.1, 0.2, 0.3)
    ]
    grid += [
        Setting(
            "self-replay+kl",
            f"{int(s * 100)}% w={w:g}",
            {**self_replay_overrides(task, s), "regularization": {"kl": {"weight": w}}},
        )
        for s, w in ((0.2, 0.25),)
    ]
    grid += [Setting("wise-ft", f"a={a:g}", alpha=a, source=none) for a in (0.3, 0.5, 0.7)]
    kl = next(s for s in grid if s.key == "kl:w=0.25")
    grid += [Setting("kl+wise-ft", f"w=0.25 a={a:g}", alpha=a, source=kl) for a in (0.5, 0.7)]
    return grid


class Bench:
    """Runs fine-tunes on the demo base, remembering results in ``root/results.json``."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root, self.console = root, console
        self.files = write_datasets(root / "data")
        self.base, self.base_info = ensure_base(
            DEFAULT,
            self.files,
            root,
            Path(os.environ.get("KEELTUNE_CACHE", "~/.cache/keeltune")).expanduser(),
            console,
        )
        self.task = {"name": "stdlib-qa", "path": str(self.files.task_train), "format": "instruction"}
        self.results_file = root / "results.json"
        self.results: dict[str, dict[str, Any]] = (
            json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        )

    def run(self, setting: Setting, seed: int) -> dict[str, Any]:
        key = f"{setting.key}@{seed}"
        if key in self.results:
            return self.results[key]
        started = time.perf_counter()
        if setting.alpha is None:
            self.console.print(f"[bold]{key}[/]: fine-tuning ({setting.backend})")
            result = self._fine_tune(setting, seed)
        else:
            self.console.print(f"[bold]{key}[/]: interpolating {setting.source.key} toward the base")
            result = self._interpolate(setting, seed)
        result["seconds"] = round(time.perf_counter() - started, 1)
        self._record(key, result)
        self.console.print(
            f"  task loss {result['task_loss']:.4f}, forgetting {result['forgetting'][SELECT]:+.1f}% / "
            f"{result['forgetting'][REPORT]:+.1f}% ({result['seconds']:.0f} s)"
        )
        return result

    def _record(self, key: str, result: dict[str, Any]) -> None:
        self.results[key] = result
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.results_file)

    def _fine_tune(self, setting: Setting, seed: int) -> dict[str, Any]:
        """Train; keep the run's final model, config and metrics (interpolation starts from them), not its
        checkpoints."""
        name = run_name(setting, seed)
        shutil.rmtree(self.root / name, ignore_errors=True)
        overrides = {
            "training": {"seed": seed, "checkpoint": {"every_steps": DEFAULT.finetune.steps}},
            "logging": {"wandb": {"mode": "disabled"}},
        }
        config = phase_config(
            name,
            self.root,
            self.base,
            DEFAULT.finetune,
            DEFAULT,
            self.task,
            self.files,
            setting.backend,
            overrides=merge_tree(overrides, setting.overrides),
            retention_test=True,
        )
        summary = train(config)
        shutil.rmtree(summary.run_dir / "checkpoints", ignore_errors=True)
        last = summary.last_eval
        return {
            "task_loss": last["val/loss"],
            "forgetting": {s: last[f"retention/{s}/forgetting_pct"] for s in (SELECT, REPORT)},
            "ppl": {s: last[f"retention/{s}/ppl"] for s in (SELECT, REPORT)},
            "base_ppl": {s: summary.first_eval[f"retention/{s}/ppl"] for s in (SELECT, REPORT)},
            "curve": series(read_metrics(summary.run_dir), f"retention/{REPORT}/forgetting_pct"),
        }

    def _interpolate(self, setting: Setting, seed: int) -> dict[str, Any]:
        """The source run's final model with ``alpha`` of its change kept, evaluated like the trainer does."""
        source_dir = self.root / run_name(setting.source, seed)
        if not (source_dir / "final" / "model.safetensors").is_file():  # its folder went: train it again
            self._fine_tune(setting.source, seed)
        out = self.root / f"{run_name(setting, seed)}-model"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source_dir / "final", out)
        interpolate_toward_base(out, self.base, setting.alpha)
        target = EvalTarget(
            config=load_config(source_dir / "config.yaml"),
            run_dir=None,
            checkpoint=None,
            model_dir=out,
            baseline=json.loads((source_dir / "baseline.json").read_text()),
        )
        got = evaluate_target(target)
        shutil.rmtree(out, ignore_errors=True)
        source = self.results.get(f"{setting.source.key}@{seed}")
        return {
            "task_loss": got["val/loss"],
            "forgetting": {s: got[f"retention/{s}/forgetting_pct"] for s in (SELECT, REPORT)},
            "ppl": {s: got[f"retention/{s}/ppl"] for s in (SELECT, REPORT)},
            "base_ppl": dict(source["base_ppl"]) if source else {},
            "curve": [[DEFAULT.finetune.steps], [got[f"retention/{REPORT}/forgetting_pct"]]],
        }


def compare(result: dict[str, Any], none: dict[str, Any], split: str) -> tuple[float, float]:
    """(percent of the forgetting removed, percent task-loss cost) against the unregularized run."""
    removed = 100 * (1 - result["forgetting"][split] / none["forgetting"][split])
    cost = 100 * (result["task_loss"] / none["task_loss"] - 1)
    return removed, cost


def choose(grid: list[Setting], results: dict[str, dict[str, Any]], seed: int) -> dict[str, Setting]:
    """Per method, the setting chosen on the selection split of ``seed``'s runs."""
    none = results[f"none:-@{seed}"]
    chosen: dict[str, Setting] = {}
    for method in dict.fromkeys(s.method for s in grid):
        scored = [(compare(results[f"{s.key}@{seed}"], none, SELECT), s) for s in grid if s.method == method]
        within = [(r, s) for (r, c), s in scored if c <= s.budget_pct]
        chosen[method] = (
            max(within, key=lambda x: x[0])[1] if within else min(scored, key=lambda x: x[0][1])[1]
        )
    return chosen


def plot(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], seed: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        steps, values = results[f"{row['setting'].key}@{seed}"]["curve"]
        curves.plot(steps, values, marker="o", label=f"{row['setting'].method} {row['setting'].label}")
    curves.set_xlabel("fine-tuning step")
    curves.set_ylabel(f"forgetting on {REPORT} (%, ppl rise)")
    curves.set_title(f"Forgetting curves (seed {seed}, chosen settings)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    for row in rows:
        scatter.errorbar(
            row["cost"], row["removed"], xerr=row["cost_spread"], yerr=row["removed_spread"], fmt="o"
        )
        scatter.annotate(
            row["setting"].method, (row["cost"], row["removed"]), textcoords="offset points", xytext=(5, 5)
        )
    scatter.axhline(85, color="tab:green", ls="--", lw=1)
    scatter.axhline(70, color="tab:orange", ls="--", lw=1)
    scatter.axvline(2, color="tab:green", ls=":", lw=1)
    scatter.axvline(3, color="tab:orange", ls=":", lw=1)
    scatter.set_xlabel("task-loss cost (%)")
    scatter.set_ylabel("forgetting removed (%)")
    scatter.set_title(f"Removed vs cost on {REPORT} (mean of seeds, range as bars)")
    scatter.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/keeltune-forgetting"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--plot", type=Path, default=Path("docs/forgetting.png"))
    parser.add_argument("--methods", nargs="+", help="only these methods (and the unregularized baseline)")
    args = parser.parse_args()
    console = Console(width=200)  # tables on one line each, for docs
    started = time.perf_counter()
    bench = Bench(args.root.resolve(), console)
    grid = settings(bench.task, bench.files)
    if args.methods:
        unknown = set(args.methods) - {s.method for s in grid}
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}; known: {sorted({s.method for s in grid})}")
        grid = [
            s for s in grid if s.method in {"none", *args.methods} and (s.source is None or s.source in grid)
        ]
    first, *others = args.seeds
    for setting in grid:
        bench.run(setting, first)
    chosen = choose(grid, bench.results, first)
    for seed in others:
        bench.run(grid[0], seed)
        for setting in chosen.values():
            bench.run(setting, seed)

    console.print(f"\nselection on {SELECT}, seed {first} (every setting):")
    console.print("| method | setting | task loss | forgetting | removed | cost |")
    console.print("|---|---|---|---|---|---|")
    none0 = bench.results[f"none:-@{first}"]
    for setting in grid:
        result = bench.results[f"{setting.key}@{first}"]
        removed, cost = compare(result, none0, SELECT)
        mark = " (chosen)" if chosen[setting.method] == setting else ""
        console.print(
            f"| {setting.method} | {setting.label}{mark} | {result['task_loss']:.4f} | "
            f"{result['forgetting'][SELECT]:+.1f}% | {removed:.0f}% | {cost:+.2f}% |"
        )

    rows = []
    for setting in chosen.values():
        per_seed = []
        for seed in args.seeds:
            result, none = bench.results[f"{setting.key}@{seed}"], bench.results[f"none:-@{seed}"]
            per_seed.append((result, *compare(result, none, REPORT)))
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        removed, cost = [p[1] for p in per_seed], [p[2] for p in per_seed]
        rows.append(
            {
                "setting": setting,
                "task_loss": mean([p[0]["task_loss"] for p in per_seed]),
                "ppl": mean([p[0]["ppl"][REPORT] for p in per_seed]),
                "forgetting": mean([p[0]["forgetting"][REPORT] for p in per_seed]),
                "removed": mean(removed),
                "cost": mean(cost),
                "removed_spread": (max(removed) - min(removed)) / 2,
                "cost_spread": (max(cost) - min(cost)) / 2,
            }
        )
    base_ppl = mean([bench.results[f"none:-@{s}"]["base_ppl"][REPORT] for s in args.seeds])
    console.print(f"\nreported on {REPORT} (base ppl {base_ppl:.1f}), mean of seeds {args.seeds}:")
    console.print(
        "| method | setting | task val loss | retention ppl | forgetting | removed | task-loss cost |"
    )
    console.print("|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["setting"]
        console.print(
            f"| {s.method} | {s.label} | {row['task_loss']:.4f} | {row['ppl']:.1f} | {row['forgetting']:+.1f}% | "
            + ("–" if s.method == "none" else f"{row['removed']:.0f}% (±{row['removed_spread']:.0f})")
            + " | "
            + ("–" if s.method == "none" else f"{row['cost']:+.2f}% (±{row['cost_spread']:.2f})")
            + " |"
        )
    best = [r for r in rows if r["cost"] <= 2.0 and r["setting"].method != "none"]
    free = [
        r
        for r in rows
        if r["cost"] <= 3.0 and not r["setting"].general_data and r["setting"].method != "none"
    ]
    for goal, candidates, target in (
        ("any method, cost <= 2%", best, 85),
        ("no general data, cost <= 3%", free, 70),
    ):
        top = max(candidates, key=lambda r: r["removed"], default=None)
        verdict = (
            "none within the cost"
            if top is None
            else (
                f"{top['setting'].method} {top['setting'].label}: {top['removed']:.0f}% removed at {top['cost']:+.2f}% "
                + ("(goal met)" if top["removed"] >= target else f"(goal {target}% missed)")
            )
        )
        console.print(f"goal >= {target}% removed, {goal}: {verdict}")
    plot(rows, bench.results, first, args.plot)
    console.print(f"plot: {args.plot}")
    runs = len(bench.results)
    console.print(
        f"{runs} fine-tunes on {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"this invocation {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
