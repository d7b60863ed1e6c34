"""Sweep benchmark: does a model-based sampler find a better task-vs-forgetting trade-off than random search
with the same budget, and what does the driver cost per trial?

On the demo's fine-tune (the pretrained tiny base, standard-library Q&A, 100 steps of 16x256) every trial mixes
general text into the training stream (replay: weight 0.05-0.5 against the task's 1, a 5-33% share), adds KL to
the base (weight 0.01-2, log) and picks the learning rate (1e-4 to 3e-3, log). Objectives: task validation loss
and forgetting on the selection split (``python-docs``), both minimized. Each sampler gets the same budget of
trials, run by the real ``keeltune sweep --local`` (one trial at a time: each uses both cores).

    hypervolume: the area dominated by the trials' points up to the reference point, fixed in advance:
                 (the base's task loss, 1.1 x the unregularized fine-tune's forgetting), both from this command

The unregularized fine-tune (no replay, no KL, the demo's learning rate) is run first, in the same command.
Also reported: whether the front reaches bench/forgetting.py's hand-picked best (replay 20%: 95% of the
forgetting removed at +1.5% task loss, on ``python-docs-test``), and the driver's overhead per trial (its
submission to the trial's first step, and the gap between a trial's end and the next submission) against a
bare ``keeltune launch --local`` of the same config.
Studies are journal files under ROOT/sweeps and finished fine-tunes stay there: an interrupted run continues.

    python bench/sweep.py [--root /tmp/keeltune-sweep-bench] [--trials 12] [--samplers tpe random]
                          [--plot docs/sweep.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from keeltune.demo.recipe import DEFAULT
from keeltune.demo.run import ensure_base, phase_config, write_datasets

REPO = Path(__file__).resolve().parents[1]
SELECT, REPORT = "python-docs", "python-docs-test"
HAND_PICKED = (95.0, 1.5)  # bench/forgetting.py: replay 20% removes 95% of the forgetting at +1.5% task loss


def keeltune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "keeltune.cli", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"keeltune {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def write_base(root: Path, console: Console) -> Path:
    """The base config: the demo's fine-tune with both retention splits, replay and KL in place (the sweep
    sets their strengths), W&B off, checkpoints only at the end."""
    files = write_datasets(root / "data")
    cache = Path(os.environ.get("KEELTUNE_CACHE", "~/.cache/keeltune")).expanduser()
    base, _ = ensure_base(DEFAULT, files, root, cache, console)
    task = {"name": "stdlib-qa", "path": str(files.task_train), "format": "instruction", "weight": 1.0}
    general = {
        "name": "python-docs-replay",
        "path": str(files.general_train),
        "format": "text",
        "weight": 0.25,
    }
    steps = DEFAULT.finetune.steps
    config = phase_config(
        "base",
        root / "runs",
        base,
        DEFAULT.finetune,
        DEFAULT,
        task,
        files,
        overrides={
            "regularization": {"kl": {"weight": 0.25}},
            "data": {
                "train": [task, general],
                "prepared_dir": str(root / "prepared"),
            },  # shared: one trial at a time
            "training": {"checkpoint": {"every_steps": steps, "keep_last": 1}},
            "logging": {"wandb": {"mode": "disabled"}},
        },
        retention_test=True,
    )
    path = root / "base.yaml"
    path.write_text(config.to_yaml())
    return path


def write_sweep(root: Path, sampler: str, trials: int) -> Path:
    sweep = {
        "base": "base.yaml",
        "name": sampler,
        "root": str(root / "sweeps"),
        "space": {
            "data.train.1.weight": {"choices": [0.05, 0.1, 0.25, 0.5]},
            "regularization.kl.weight": {"low": 0.01, "high": 2.0, "log": True},
            "training.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        },
        "objectives": [
            {"metric": "val/loss", "direction": "minimize"},
            {"metric": f"retention/{SELECT}/forgetting_pct", "direction": "minimize"},
        ],
        "sampler": {"name": sampler, "seed": 0, "n_startup_trials": 4},
        "budget": {"trials": trials},
        "parallel": 1,
        "poll_s": 2,
    }
    path = root / f"sweep-{sampler}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def last_eval(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(the step-0 eval, the last eval) of a run folder, records of each step merged."""
    merged: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record)
    evals = [s for s, r in merged.items() if "val/loss" in r]
    return merged[min(evals)], merged[max(evals)]


def first_step_delay(run_dir: Path) -> float:
    """Seconds from the job's submission (jobs.json) to its first logged training step."""
    submitted = json.loads((run_dir / "jobs.json").read_text())[0]["submitted"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            return record["time"] - submitted
    raise ValueError(f"{run_dir}: no training step")


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area (both objectives minimized) dominated by ``points`` and bounded by ``reference``."""
    inside = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, best_y = 0.0, reference[1]
    for x, y in inside:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def trial_points(folder: Path) -> list[dict[str, Any]]:
    """Every finished trial of a sweep folder, in trial order: params, objectives and both splits."""
    found = []
    for trial in sorted(folder.glob("trial-*")):
        if not (trial / "final" / "config.json").is_file():
            continue
        config = yaml.safe_load((trial / "config.yaml").read_text())
        _, last = last_eval(trial)
        weight = config["data"]["train"][1]["weight"]
        found.append(
            {
                "trial": trial.name,
                "replay_share": weight / (1 + weight),
                "kl": config["regularization"]["kl"]["weight"],
                "lr": config["training"]["lr"],
                "task_loss": last["val/loss"],
                "forgetting": {s: last[f"retention/{s}/forgetting_pct"] for s in (SELECT, REPORT)},
                "first_step_s": first_step_delay(trial),
                "submitted": json.loads((trial / "jobs.json").read_text())[0]["submitted"],
                "ended": last["time"],
            }
        )
    return found


def plot(results: dict[str, Any], reference: tuple[float, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for (sampler, found), color in zip(
        results["samplers"].items(), ("tab:red", "tab:blue", "tab:green"), strict=False
    ):
        points = [(p["task_loss"], p["forgetting"][SELECT]) for p in found["trials"]]
        left.scatter(*zip(*points, strict=True), color=color, label=f"{sampler} trials", s=18)
        curve = [hypervolume(points[: n + 1], reference) for n in range(len(points))]
        right.plot(range(1, len(curve) + 1), curve, "o-", color=color, label=sampler)
    none = results["none"]
    left.scatter(
        [none["task_loss"]], [none["forgetting"][SELECT]], marker="x", color="k", label="unregularized"
    )
    left.axvline(reference[0], color="0.6", ls=":")
    left.axhline(reference[1], color="0.6", ls=":", label="reference point")
    left.set_xlabel("task val loss")
    left.set_ylabel(f"forgetting on {SELECT} (%)")
    left.legend(fontsize=8)
    right.set_xlabel("trials")
    right.set_ylabel("hypervolume")
    right.legend(fontsize=8)
    fig.suptitle("keeltune sweep: replay share x KL weight x learning rate, same budget per sampler")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/keeltune-sweep-bench"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    console = Console()
    base = write_base(root, console)

    none_dir = root / "runs" / "none"
    if not (none_dir / "final" / "config.json").is_file():  # the unregularized fine-tune: no replay, no KL
        console.print("[bold]unregularized fine-tune[/] (the reference point's forgetting)")
        plain = yaml.safe_load(base.read_text())
        plain["data"]["train"] = plain["data"]["train"][:1]
        plain["regularization"]["kl"]["weight"] = 0.0
        plain["run"]["name"] = "none"
        (root / "none.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
        keeltune("launch", str(root / "none.yaml"), "--local", "--wait", cwd=root)
    start, end = last_eval(none_dir)
    none = {
        "task_loss": end["val/loss"],
        "forgetting": {s: end[f"retention/{s}/forgetting_pct"] for s in (SELECT, REPORT)},
        "first_step_s": first_step_delay(none_dir),
    }
    reference = (start["val/loss"], 1.1 * none["forgetting"][SELECT])
    console.print(f"reference point: task loss {reference[0]:.4f} (the base), forgetting {reference[1]:.1f}%")

    results: dict[str, Any] = {"none": none, "reference": reference, "samplers": {}}
    for sampler in args.samplers:
        console.print(f"[bold]sweep {sampler}[/]: {args.trials} trials")
        keeltune("sweep", str(write_sweep(root, sampler, args.trials)), "--local", cwd=root)
        found = trial_points(root / "sweeps" / sampler)
        points = [(p["task_loss"], p["forgetting"][SELECT]) for p in found]
        gaps = [b["submitted"] - a["ended"] for a, b in zip(found, found[1:], strict=False)]
        reaches = [
            p["trial"]
            for p in found
            if 100 * (1 - p["forgetting"][REPORT] / none["forgetting"][REPORT]) >= HAND_PICKED[0]
            and 100 * (p["task_loss"] / none["task_loss"] - 1) <= HAND_PICKED[1]
        ]
        results["samplers"][sampler] = {
            "trials": found,
            "hypervolume": hypervolume(points, reference),
            "first_step_s": statistics.median(p["first_step_s"] for p in found),
            "gap_s": statistics.median(gaps) if gaps else None,
            "reaches_hand_picked": reaches,
        }
    results["machine"] = f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    (root / "summary.json").write_text(json.dumps(results, indent=1))

    console.print(f"\nunregularized: task loss {none['task_loss']:.4f}, forgetting {none['forgetting'][SELECT]:+.1f}% "
                  f"({SELECT}) / {none['forgetting'][REPORT]:+.1f}% ({REPORT})")  # fmt: skip
    for sampler, found in results["samplers"].items():
        console.print(f"[bold]{sampler}[/]: hypervolume {found['hypervolume']:.2f}")
        for p in found["trials"]:
            removed = 100 * (1 - p["forgetting"][REPORT] / none["forgetting"][REPORT])
            cost = 100 * (p["task_loss"] / none["task_loss"] - 1)
            console.print(
                f"  {p['trial']}: replay {100 * p['replay_share']:.0f}%, kl {p['kl']:.3g}, lr {p['lr']:.2g} -> "
                f"task {p['task_loss']:.4f}, forgetting {p['forgetting'][SELECT]:+.1f}% / "
                f"{p['forgetting'][REPORT]:+.1f}% (removed {removed:.0f}% at {cost:+.2f}% on {REPORT})"
            )
        console.print(
            f"  reaches the hand-picked best (>= 95% removed at <= +1.5%): {found['reaches_hand_picked'] or 'no'}"
        )
    names = list(results["samplers"])
    if len(names) >= 2:
        a, b = (results["samplers"][n]["hypervolume"] for n in names[:2])
        console.print(f"hypervolume ratio {names[0]} / {names[1]}: {a / b:.3f}")
    for sampler, found in results["samplers"].items():
        console.print(
            f"driver ({sampler}): submission -> first step median {found['first_step_s']:.1f} s against a bare "
            f"keeltune launch --local {none['first_step_s']:.1f} s (ratio {found['first_step_s'] / none['first_step_s']:.2f}); "
            f"a trial's end -> the next submission median {found['gap_s'] or 0:.1f} s (poll_s 2)"
        )
    if args.plot:
        plot(results, reference, args.plot)
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
