"""``keeltune sweep status`` and ``keeltune sweep report``: the trials as a table, the Pareto front of the
feasible finished trials (a trial meeting every constraint that no other feasible trial dominates: as good in
every objective and better in one; equal trials are both on it), its plot, parameter importances, and the
front's configs as YAML ready for ``keeltune train`` or ``launch``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from keeltune.config.sweep import SweepConfig
from keeltune.launcher import submit
from keeltune.run_folder import CONFIG_FILE, PRUNE_FILE
from keeltune.sweep.study import CONSTRAINTS_ATTR, FAILURE_ATTR, STEP_ATTR
from keeltune.sweep.trials import trial_dir, trial_name

REPORT_DIR = "report"
FRONT_DIR = "front"  # in REPORT_DIR: one config per trial on the front
PLOT_FILE = "pareto_front.png"


@dataclass
class TrialRow:
    """One trial as status and report show it."""

    number: int
    state: str  # complete, pruned, failed, running
    job: str  # the latest job: id and state ("12 RUNNING"), "" when none
    attempts: int
    params: dict[str, Any]
    values: list[float] | None
    violations: list[float]
    step: int | None
    note: str  # why it failed or was pruned
    on_front: bool = False

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.violations)


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    as_good = all(s * x <= s * y for s, x, y in zip(signs, a, b, strict=True))
    return as_good and any(s * x < s * y for s, x, y in zip(signs, a, b, strict=True))


def pareto_front(rows: list[TrialRow], directions: list[str]) -> list[TrialRow]:
    """The feasible complete trials no other feasible complete trial dominates (ties all stay)."""
    candidates = [r for r in rows if r.state == "complete" and r.values is not None and r.feasible]
    return [
        r
        for r in candidates
        if not any(dominates(o.values, r.values, directions) for o in candidates if o is not r)
    ]


def trial_rows(sweep: SweepConfig, study: optuna.Study, *, job_states: bool = True) -> list[TrialRow]:
    """Every trial of the study with its job and outcome; the front marked."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        folder = trial_dir(sweep, trial.number)
        records = submit.read_records(folder)
        job = ""
        if records:
            job = records[-1].job_id
            if job_states and trial.state == TrialState.RUNNING:
                job += " " + submit.job_state(records[-1])["state"]
        note = trial.user_attrs.get(FAILURE_ATTR, "")
        if trial.state == TrialState.PRUNED and (folder / PRUNE_FILE).is_file():
            note = yaml.safe_load((folder / PRUNE_FILE).read_text()).get("reason", "")
        rows.append(
            TrialRow(
                number=trial.number,
                state={"COMPLETE": "complete", "FAIL": "failed"}.get(
                    trial.state.name, trial.state.name.lower()
                ),
                job=job,
                attempts=len(records),
                params=dict(trial.params),
                values=list(trial.values) if trial.state == TrialState.COMPLETE else None,
                violations=list(trial.user_attrs.get(CONSTRAINTS_ATTR, [])),
                step=trial.user_attrs.get(STEP_ATTR),
                note=note,
            )
        )
    for row in pareto_front(rows, sweep.directions):
        row.on_front = True
    return rows


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def status_table(sweep: SweepConfig, rows: list[TrialRow]) -> tuple[list[str], list[list[str]]]:
    """Columns and cells of ``keeltune sweep status``."""
    columns = ["trial", "state", "job", *sweep.space, *(o.metric for o in sweep.objectives), "front"]
    cells = []
    for row in rows:
        objectives = [_number(v) for v in row.values] if row.values else [""] * len(sweep.objectives)
        front = "*" if row.on_front else ("infeasible" if row.values and not row.feasible else "")
        state = row.state + (f" ({row.attempts} attempts)" if row.attempts > 1 else "")
        cells.append(
            [
                trial_name(row.number),
                state,
                row.job,
                *(_number(row.params[k]) if k in row.params else "-" for k in sweep.space),
                *objectives,
                front,
            ]
        )
    return columns, cells


def importances(sweep: SweepConfig, study: optuna.Study) -> dict[str, dict[str, float]]:
    """Per objective, each parameter's importance (Optuna's fANOVA); empty with fewer than two complete
    trials or a single parameter value."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    found = {}
    for i, objective in enumerate(sweep.objectives):
        try:
            found[objective.metric] = optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i]
            )
        except (RuntimeError, ValueError, ImportError) as err:  # same parameters everywhere; no scikit-learn
            logging.getLogger("keeltune").info("importances of %s: %s", objective.metric, err)
    return found


def plot_front(sweep: SweepConfig, rows: list[TrialRow], path: Path) -> None:
    """The first two objectives: every complete trial a point (infeasible ones crossed), the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_metric = sweep.objectives[0].metric
    y_metric = sweep.objectives[1].metric if len(sweep.objectives) > 1 else None
    done = [r for r in rows if r.values is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for feasible, marker, label in ((True, "o", "trial"), (False, "x", "trial breaking a constraint")):
        chosen = [r for r in done if r.feasible == feasible and not r.on_front]
        if chosen:
            ax.scatter(
                [r.values[0] for r in chosen],
                [r.values[1] if y_metric else r.number for r in chosen],
                marker=marker,
                color="0.55",
                label=label,
            )
    front = sorted((r for r in done if r.on_front), key=lambda r: (r.values[0], r.number))
    if front:
        xs = [r.values[0] for r in front]
        ys = [r.values[1] if y_metric else r.number for r in front]
        ax.plot(
            xs, ys, "o-" if y_metric else "o", color="tab:red", label="Pareto front" if y_metric else "best"
        )
    labels: dict[tuple[float, float], list[str]] = {}  # equal points share one label ("2, 3")
    for r in done:
        labels.setdefault((r.values[0], r.values[1] if y_metric else r.number), []).append(str(r.number))
    for point, numbers in labels.items():
        ax.annotate(", ".join(numbers), point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{x_metric} ({sweep.objectives[0].direction})")
    ax.set_ylabel(f"{y_metric} ({sweep.objectives[1].direction})" if y_metric else "trial")
    ax.set_title(f"sweep {sweep.name}: {len(done)} finished trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_front_configs(sweep: SweepConfig, rows: list[TrialRow], out: Path) -> list[Path]:
    """Each front trial's resolved config, renamed ``<sweep>-trial-NNNN`` under ``runs``, for train/launch."""
    folder = out / FRONT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        if not row.on_front:
            continue
        config = yaml.safe_load((trial_dir(sweep, row.number) / CONFIG_FILE).read_text())
        config["run"] = {"name": f"{sweep.name}-{trial_name(row.number)}", "root": "runs"}
        path = folder / f"{trial_name(row.number)}.yaml"
        header = (
            f"# sweep {sweep.name}, {trial_name(row.number)} on the Pareto front: "
            + ", ".join(f"{o.metric} {v:.6g}" for o, v in zip(sweep.objectives, row.values, strict=True))
            + "\n"
        )
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written


def markdown(sweep: SweepConfig, rows: list[TrialRow], found: dict[str, dict[str, float]]) -> str:
    columns, cells = status_table(sweep, rows)
    lines = [f"# Sweep {sweep.name}", ""]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ".")
    lines.append("")
    if sweep.constraints:
        lines += [
            "Constraints: " + "; ".join(sweep.constraints) + " (a trial breaking one is not on the front).",
            "",
        ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    notes = [f"- {trial_name(r.number)}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "## Failed and pruned trials", "", *notes]
    if found:
        lines += ["", "## Parameter importances (fANOVA)", ""]
        for metric, values in found.items():
            lines.append(f"- {metric}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    lines += ["", f"![Pareto front]({PLOT_FILE})", ""]
    return "\n".join(lines)


def write_report(sweep: SweepConfig, study: optuna.Study, out: Path) -> tuple[Path, str]:
    """report.md, pareto_front.png and front/*.yaml in ``out``, and the summary in W&B; returns report.md and
    where the W&B summary went ("" when the trials do not log to W&B)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(sweep, study, job_states=False)
    plot_front(sweep, rows, out / PLOT_FILE)
    write_front_configs(sweep, rows, out)
    path = out / "report.md"
    path.write_text(markdown(sweep, rows, importances(sweep, study)))
    return path, log_summary(sweep, rows, out)


def log_summary(sweep: SweepConfig, rows: list[TrialRow], out: Path) -> str:
    """The sweep's own W&B run in its trials' group (``<name>-summary``, the same run at every report): every
    trial as a table with the front marked, and the front's plot. W&B settings are the trials' own."""
    from keeltune.training.metrics import resolve_wandb_mode

    configs = [trial_dir(sweep, r.number) / CONFIG_FILE for r in rows]
    found = next((c for c in configs if c.is_file()), None)
    if found is None:
        return ""
    settings = yaml.safe_load(found.read_text())["logging"]["wandb"]
    mode, _ = resolve_wandb_mode(settings["mode"])
    if mode == "disabled":
        return ""
    import wandb

    run = wandb.init(
        project=settings["project"],
        entity=settings["entity"] or None,
        group=sweep.name,
        name=f"{sweep.name}-summary",
        id=re.sub(r"[^A-Za-z0-9_-]", "-", f"{sweep.name}-summary"),
        resume="allow",
        job_type="sweep-summary",
        mode=mode,
        dir=str(out),
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False),
    )
    columns, cells = status_table(sweep, rows)
    run.log(
        {
            "sweep/trials": wandb.Table(columns=columns, data=cells),
            "sweep/pareto_front": wandb.Image(str(out / PLOT_FILE)),
        }
    )
    run.summary["sweep/front"] = [trial_name(r.number) for r in rows if r.on_front]
    where = str(Path(run.dir).parent) if mode == "offline" else run.url
    run.finish()
    return where
