"""``keeltune report``: plots and a markdown summary of a run, read from its metrics.jsonl (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keeltune.config import ConfigError, load_config
from keeltune.eval.names import (
    BPB,
    CHANGE,
    FORGETTING,
    FORGETTING_BPB,
    PPL,
    STDERR,
    TASK,
    VAL_LOSS,
    metric,
    retention_metrics,
    retention_set,
)
from keeltune.run_folder import BASELINE_FILE, CONFIG_FILE, METRICS_FILE, REPORT_DIR, REPORT_FILE


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's metrics.jsonl, in order."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE} yet; give a run folder `keeltune train` has written")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold ``key``."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def retention_sets(records: list[dict[str, Any]]) -> list[str]:
    """Names of the retention sets logged, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(retention_metrics(record, PPL)))
    return list(names)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    records: list[dict[str, Any]],
    out: Path,
    *,
    task_title: str = "Task",
    retention_title: str = "Retention (lower is better)",
) -> Path | None:
    """Task loss (train and validation) and retention perplexity over steps, side by side; None without evals."""
    retention = retention_sets(records)
    if not any(VAL_LOSS in r for r in records) and not retention:
        return None
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*series(records, "train/loss"), alpha=0.4, label="train")
    left.plot(*series(records, VAL_LOSS), "o-", label="task validation")
    left.set(xlabel="step", ylabel="loss", title=task_title)
    left.legend()
    for name in retention:
        right.plot(*series(records, metric(retention_set(name), PPL)), "o-", label=name)
    right.set(xlabel="step", ylabel="perplexity", title=retention_title)
    if retention:
        right.legend()
    return _save(plt, figure, out)


def plot_comparison(
    runs: dict[str, list[dict[str, Any]]],
    out: Path,
    *,
    task_title: str = "Task validation loss",
    retention_title: str = "Retention perplexity (lower is better)",
) -> Path:
    """Several runs side by side: task validation loss (left) and the first retention set's perplexity (right)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        left.plot(*series(records, VAL_LOSS), "o-", label=label)
        for name in retention_sets(records)[:1]:
            right.plot(*series(records, metric(retention_set(name), PPL)), "o-", label=f"{label} ({name})")
    left.set(xlabel="step", ylabel="loss", title=task_title)
    right.set(xlabel="step", ylabel="perplexity", title=retention_title)
    left.legend()
    right.legend()
    return _save(plt, figure, out)


def _save(plt: Any, figure: Any, out: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for axis in figure.axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _plot_one(records: list[dict[str, Any]], key: str, out: Path, ylabel: str, title: str) -> Path | None:
    steps, values = series(records, key)
    if not steps:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(steps, values)
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    return _save(plt, figure, out)


def plot_forgetting(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Task validation loss (left axis) against each retention set's forgetting % (right axis)."""
    names = [n for n in retention_sets(records) if series(records, metric(retention_set(n), FORGETTING))[0]]
    if not names:
        return None
    plt = _pyplot()
    figure, task_axis = plt.subplots(figsize=(7, 4))
    task_axis.plot(*series(records, VAL_LOSS), "o-", color="C0", label="task validation loss")
    task_axis.set(xlabel="step", ylabel="task validation loss", title="Learning vs forgetting")
    forgetting_axis = task_axis.twinx()
    for index, name in enumerate(names, start=1):
        steps, values = series(records, metric(retention_set(name), FORGETTING))
        forgetting_axis.plot(steps, values, "s--", color=f"C{index}", label=f"forgetting: {name}")
    forgetting_axis.set_ylabel("retention forgetting % (ppl vs step 0)")
    handles = [h for axis in (task_axis, forgetting_axis) for h in axis.get_legend_handles_labels()[0]]
    forgetting_axis.legend(handles=handles, loc="best")  # drawn above both axes
    return _save(plt, figure, out)


def task_scores(records: list[dict[str, Any]]) -> list[str]:
    """The ``task/<task>/<metric>`` names logged (not their stderr or change), in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        names.update(
            dict.fromkeys(k for k in record if k.startswith(TASK + "/") and not k.endswith((STDERR, CHANGE)))
        )
    return list(names)


def plot_tasks(records: list[dict[str, Any]], retention_tasks: set[str], out: Path) -> Path | None:
    """Every task metric over steps with its ±1 standard error band, the task's own metrics on the left and
    the retention tasks' on the right (one figure: learning against forgetting in the metrics' own units)."""
    names = task_scores(records)
    if not names:
        return None
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        axis = right if name.split("/")[1] in retention_tasks else left
        steps, values = series(records, name)
        errors = dict(zip(*series(records, name + STDERR), strict=True))
        line = axis.plot(steps, values, "o-", label=name.removeprefix(TASK + "/"))[0]
        if errors:
            low = [v - errors.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
            high = [v + errors.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    left.set(xlabel="step", ylabel="metric", title="Task metrics (band: ±1 stderr)")
    right.set(xlabel="step", ylabel="metric", title="Retention task metrics (band: ±1 stderr)")
    for axis in (left, right):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _save(plt, figure, out)


AMPLIFICATION = "_amplification"


def bias_metrics(records: list[dict[str, Any]]) -> list[str]:
    """The ``bias/<probe>/<axis>/<metric>`` names logged with an amplification, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        names.update(
            dict.fromkeys(k.removesuffix(AMPLIFICATION) for k in record if k.endswith(AMPLIFICATION))
        )
    return list(names)


def plot_bias(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Each probe's first metric: its amplification over the base on every axis over steps, the bootstrap
    interval as a band; one panel per probe."""
    first: dict[str, list[str]] = {}
    for name in bias_metrics(records):
        probe, stat = name.split("/")[1], name.split("/")[3]
        if first.setdefault(probe, [stat])[0] == stat:
            first[probe].append(name)
    if not first:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(first), figsize=(5.5 * len(first), 4), squeeze=False)
    for axis, (probe, (stat, *names)) in zip(axes[0], first.items(), strict=True):
        for name in names:
            steps, values = series(records, name + AMPLIFICATION)
            line = axis.plot(steps, values, "o-", label=name.split("/")[2])[0]
            low = dict(zip(*series(records, name + AMPLIFICATION + "_lo"), strict=True))
            high = dict(zip(*series(records, name + AMPLIFICATION + "_hi"), strict=True))
            if low and high:
                band = [s for s in steps if s in low and s in high]
                axis.fill_between(
                    band, [low[s] for s in band], [high[s] for s in band], color=line.get_color(), alpha=0.15
                )
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set(xlabel="step", ylabel=f"{stat}: now - base", title=f"Bias amplification: {probe}")
        axis.legend()
    return _save(plt, figure, out)


def bias_lines(records: list[dict[str, Any]]) -> list[str]:
    """A markdown table of every bias metric at the last eval: base, now, amplification and its interval."""
    names = bias_metrics(records)
    if not names:
        return []
    lines = [
        "",
        "## Bias amplification (now - base at step 0; interval: paired bootstrap over the probe items)",
        "",
        "| probe | axis | metric | base | now (step) | amplification | interval |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for name in names:
        steps, amplification = series(records, name + AMPLIFICATION)
        last = next(r for r in reversed(records) if name + AMPLIFICATION in r)
        now = last[name]
        low, high = last.get(name + AMPLIFICATION + "_lo"), last.get(name + AMPLIFICATION + "_hi")
        interval = f"[{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else ""
        marker = " *" if low is not None and high is not None and (low > 0 or high < 0) else ""
        _, probe, axis, stat = name.split("/")
        lines.append(
            f"| {probe} | {axis} | {stat} | {now - amplification[-1]:.4f} | {now:.4f} ({steps[-1]}) | "
            f"{amplification[-1]:+.4f}{marker} | {interval} |"
        )
    lines.append("")
    lines.append("\\* the interval excludes 0")
    return lines


def write_plots(
    records: list[dict[str, Any]], out_dir: Path, retention_tasks: set[str] | None = None
) -> dict[str, Path]:
    """The report's PNGs (title -> file); a plot whose data was not logged is left out."""
    plots = {
        "Training loss": _plot_one(
            records, "train/loss", out_dir / "train_loss.png", "loss", "Training loss"
        ),
        "Learning rate": _plot_one(records, "train/lr", out_dir / "learning_rate.png", "lr", "Learning rate"),
        "Task and retention": plot_curves(records, out_dir / "task_vs_retention.png"),
        "Learning vs forgetting": plot_forgetting(records, out_dir / "forgetting.png"),
        "Task metrics": plot_tasks(records, retention_tasks or set(), out_dir / "task_metrics.png"),
        "Bias amplification": plot_bias(records, out_dir / "bias_amplification.png"),
    }
    return {title: path for title, path in plots.items() if path is not None}


def summary_lines(run_dir: Path, records: list[dict[str, Any]]) -> list[str]:
    """The markdown summary: run, speed, task loss, retention and forgetting, best step."""
    config = load_config(run_dir / CONFIG_FILE)
    steps = max((r["step"] for r in records), default=0)
    lines = [
        f"# Run report: {config.run.name}",
        "",
        f"- backend: {config.sharding.backend}",
        f"- steps: {steps} of {config.total_steps}",
    ]
    if config.stages:
        lines.append(
            "- stages: " + ", ".join(f"{s.name} ({s.training.max_steps} steps)" for s in config.stages)
        )
    speeds = series(records, "train/tokens_per_s")[1]
    if speeds:
        lines.append(f"- throughput: {sum(speeds) / len(speeds):,.0f} tokens/s (mean over logged steps)")
    eval_steps, task_losses = series(records, VAL_LOSS)
    if task_losses:
        lines.append(
            f"- task validation loss: {task_losses[0]:.4f} (step {eval_steps[0]}) -> "
            f"{task_losses[-1]:.4f} (step {eval_steps[-1]})"
        )
        best = min(range(len(task_losses)), key=task_losses.__getitem__)
        lines.append(f"- best step by task validation loss: {eval_steps[best]} ({task_losses[best]:.4f})")
    baseline_file = run_dir / BASELINE_FILE
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else {}
    for name in retention_sets(records):
        key = metric(retention_set(name), PPL)
        ppl_steps, ppls = series(records, key)
        before = baseline.get(key, ppls[0])
        line = f"- retention `{name}` perplexity: {before:.3f} -> {ppls[-1]:.3f} (step {ppl_steps[-1]})"
        forgetting = series(records, metric(retention_set(name), FORGETTING))[1]
        if forgetting:
            line += f", forgetting {forgetting[-1]:+.2f}%"
        bpb_key = metric(retention_set(name), BPB)
        bpbs = series(records, bpb_key)[1]
        if bpbs:
            line += f"; bits per byte {baseline.get(bpb_key, bpbs[0]):.4f} -> {bpbs[-1]:.4f}"
            per_byte = series(records, metric(retention_set(name), FORGETTING_BPB))[1]
            line += f", forgetting {per_byte[-1]:+.2f}%" if per_byte else ""
        lines.append(line)
    for name in task_scores(records):
        steps, values = series(records, name)
        errors = dict(zip(*series(records, name + STDERR), strict=True))
        spread = f" ± {errors[steps[-1]]:.4f}" if steps[-1] in errors else ""
        line = f"- `{name}`: {values[0]:.4f} (step {steps[0]}) -> {values[-1]:.4f}{spread} (step {steps[-1]})"
        change = series(records, name + CHANGE)[1]
        if change:
            line += f", change since step 0 {change[-1]:+.4f}"
        lines.append(line)
    return lines


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Plots and ``report.md`` for the run, in ``out_dir`` (default ``RUN/report``); returns the markdown file."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{run_dir}: not a run folder (no {CONFIG_FILE}); give the folder `keeltune train` made"
        )
    records = read_metrics(run_dir)
    out_dir = out_dir or run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    retention_tasks = {t.name for t in load_config(run_dir / CONFIG_FILE).eval.tasks if t.retention}
    plots = write_plots(records, out_dir, retention_tasks)
    lines = summary_lines(run_dir, records) + bias_lines(records)
    lines += ["", "## Plots"] + [f"\n![{title}]({path.name})" for title, path in plots.items()]
    report = out_dir / REPORT_FILE
    report.write_text("\n".join(lines) + "\n")
    return report
