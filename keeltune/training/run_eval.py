"""``keeltune eval``: the trainer's held-out evaluation, on a run's checkpoint or on any Hugging Face folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keeltune.atomic import write_json_atomically
from keeltune.config import Config, ConfigError, backend_spec, load_config
from keeltune.data_pipeline.contamination import contamination_report
from keeltune.data_pipeline.prepare import prepare_sets, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv, exit_rank, rank_of_job, run_job_on_ranks
from keeltune.eval.bias.probes import bias_results, item_rows, load_probe_sets
from keeltune.eval.bias.score import score_probe_sets
from keeltune.eval.evaluate import evaluate_sets, forgetting
from keeltune.eval.names import held_out_names, task_change
from keeltune.eval.scoring import check_tasks
from keeltune.eval.tasks import HFTaskModel, run_task
from keeltune.run_folder import BASELINE_FILE, BIAS_DIR, CONFIG_FILE, LM_EVAL_DIR
from keeltune.sharding.backends import export_checkpoint
from keeltune.sharding.model import autocast_dtype, load_causal_lm, load_tokenizer
from keeltune.training.build import build_tasks
from keeltune.training.manifest import checkpoint_to_read
from keeltune.training.metrics import MetricsLogger

log = logging.getLogger("keeltune")


@dataclass(frozen=True)
class EvalTarget:
    """What to evaluate: a config naming the held-out sets, and where the model comes from."""

    config: Config
    run_dir: Path | None  # the run folder, None for a plain model folder
    checkpoint: Path | None  # the run's checkpoint, None for a plain model folder
    model_dir: Path | None  # the plain model folder
    baseline: dict[str, float]

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return str(self.model_dir)
        return f"{self.run_dir} at step {int(self.checkpoint.name.removeprefix('step_'))}"


def resolve_target(path: Path, *, step: int | None = None, config_file: Path | None = None) -> EvalTarget:
    """A run folder (its latest checkpoint, or ``step``) or a model folder evaluated on ``config_file``'s sets."""
    if (path / CONFIG_FILE).is_file():
        if config_file is not None:
            raise ConfigError(
                f"--config: {path} is a run folder, evaluated on the sets of its own {CONFIG_FILE}"
            )
        config = load_config(path / CONFIG_FILE).with_extended_base()
        checkpoint, notes = checkpoint_to_read(
            path, step, checksums=config.training.checkpoint.verify == "checksum"
        )
        for note in notes:
            log.warning("%s", note)
        return EvalTarget(config, path, checkpoint, None, _baseline(path))
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path}: neither a run folder ({CONFIG_FILE}) nor a Hugging Face model (config.json)"
        )
    if step is not None:
        raise ConfigError("--checkpoint: only for a run folder")
    if config_file is None:
        raise ConfigError(
            f"{path} is a model folder: give --config CONFIG, whose data sets it is evaluated on"
        )
    config = load_config(config_file).with_extended_base()
    return EvalTarget(config, None, None, path, _baseline(config.run_dir))


def _baseline(run_dir: Path) -> dict[str, float]:
    file = run_dir / BASELINE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def held_out_folders(config: Config, tokenizer: Any) -> dict[str, Path]:
    """The prepared folders of the trainer's held-out sets (``val``, ``retention/<name>``), prepared first when
    they are not (next to, never over, sets prepared with another tokenizer)."""
    data = config.stage_view(-1).data  # a staged run's held-out sets are its last stage's
    prepared = prepare_sets(data, config.run_dir, tokenizer, refresh=False, held_out_only=True)
    names = held_out_names(data)
    return {names[key]: folder for key, folder, _ in prepared}


@contextlib.contextmanager
def model_folder(target: EvalTarget) -> Iterator[Path]:
    """A Hugging Face folder of the target: a checkpoint is exported to a temporary one (QLoRA: merged)."""
    if target.checkpoint is None:
        yield target.model_dir
        return
    merge = backend_spec(target.config).adapters  # the full model exists only merged
    with tempfile.TemporaryDirectory(prefix="keeltune-eval-") as tmp:
        yield export_checkpoint(target.config, target.checkpoint, Path(tmp), merge=merge)[-1]


def select_tasks(config: Config, names: list[str] | None) -> Config:
    """``config`` with only the ``eval.tasks`` named (all when ``names`` is None); unknown names are refused."""
    if names is None:
        return config
    known = [task.name for task in config.eval.tasks]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} are not tasks of this config (eval.tasks: {known or 'none'})")
    return dataclasses.replace(
        config, eval=dataclasses.replace(config.eval, tasks=[t for t in config.eval.tasks if t.name in names])
    )


def evaluate_target(
    target: EvalTarget, *, max_samples: int | None = None, nproc: int = 1, sets: bool = True
) -> dict[str, float]:
    """Loss and perplexity of every held-out set (when ``sets``) and every task of the target's config, with
    forgetting against the baseline. The sets are prepared and a checkpoint exported once, here; with
    ``nproc`` > 1, local ranks started by torch's launcher then share the work (exact sums over ranks: the
    same numbers as one process)."""
    config = target.config
    tokenizer_path = str(target.model_dir) if target.model_dir else config.model.tokenizer_path
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{tokenizer_path}: no usable tokenizer ({err})") from None
    check_tasks(config)
    if config.eval.contamination.exclude:
        contamination_report(config)  # once, here: the ranks read it to leave flagged items out
    folders = held_out_folders(config, tokenizer) if sets else {}
    if not folders and not config.eval.tasks:
        raise ConfigError("nothing to evaluate: add data.validation, data.retention or eval.tasks")
    limit = max_samples if max_samples is not None else config.eval.max_samples
    with model_folder(target) as model_dir:
        if nproc == 1:
            results = evaluate_folder(model_dir, tokenizer_path, folders, config, limit, ParallelEnv())
        else:
            results = _evaluate_on_ranks(model_dir, tokenizer_path, folders, config, limit, nproc)
    return {
        **results,
        **forgetting(results, target.baseline),
        **task_change(results, target.baseline, config.eval.tasks),
    }


def evaluate_folder(
    model_dir: Path,
    tokenizer_path: str,
    folders: dict[str, Path],
    config: Config,
    max_samples: int | None,
    parallel: ParallelEnv,
) -> dict[str, float]:
    """This rank's share of every set and task through the model in ``model_dir``; sums are all-reduced."""
    tokenizer = load_tokenizer(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    verify = config.data.verify_checksums if parallel.is_main else "never"
    model = HFTaskModel(
        load_causal_lm(str(model_dir)).to(parallel.device).eval(),
        autocast_dtype(config.training.precision, parallel.device),
    )
    sets = {
        name: PackedDataset(folder, fingerprint=fingerprint, verify_checksums=verify)
        for name, folder in folders.items()
    }
    results = evaluate_sets(
        model.logits, sets, parallel, micro_batch_size=config.eval.micro_batch_size, max_samples=max_samples
    )
    for prepared in build_tasks(config, tokenizer):
        outcome = run_task(
            model,
            prepared,
            tokenizer,
            parallel,
            batch_size=config.eval.task_batch_size,
            bootstrap_iters=config.eval.bootstrap_iters,
        )
        results.update(outcome.metrics)
    return results


def lm_eval_target(
    target: EvalTarget, tasks: list[str], *, include_path: Path | None, limit: int | None = None
) -> tuple[dict[str, float], Path | None]:
    """lm-evaluation-harness on the target's model (a checkpoint is exported first: ZeRO-3 and QLoRA runs are
    evaluated on their merged export), in this one process. For a run, the results land in
    ``<run>/lm_eval/step_<N>.json``, in metrics.jsonl and in the run's W&B run at the checkpoint's step."""
    from keeltune.eval.harness import flat_metrics, run_lm_eval

    config = target.config
    with model_folder(target) as model_dir:
        tokenizer_path = str(target.model_dir) if target.model_dir else config.model.tokenizer_path
        results = run_lm_eval(
            model_dir,
            tokenizer_path,
            tasks,
            include_path=include_path,
            batch_size=config.eval.task_batch_size,
            limit=limit,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
    metrics = flat_metrics(results)
    if target.run_dir is None or target.checkpoint is None:
        return metrics, None
    step = int(target.checkpoint.name.removeprefix("step_"))
    out = target.run_dir / LM_EVAL_DIR / f"step_{step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out, {"tasks": tasks, "step": step, "results": results.get("results", {})})
    logger = MetricsLogger(target.run_dir, config.logging.wandb, enabled=True, run_config=config.to_dict())
    try:
        logger.log(step, metrics)
    finally:
        logger.close()
    return metrics, out


def bias_target(target: EvalTarget, *, nproc: int = 1) -> tuple[dict[str, float], Path | None]:
    """The config's bias probes on the target's model and on its base (``model.path``), each loaded the same
    way (a checkpoint exported first), with every metric's amplification and its paired bootstrap interval.
    For a run, the results and each item's log-likelihoods land in ``<run>/bias/step_<N>.json``."""
    config = target.config
    if not config.eval.bias.probes:
        raise ConfigError(
            "--bias: the config has no eval.bias.probes; add e.g. eval.bias.probes: [{kind: pairs}, {kind: "
            "templates}] (keeltune's built-in probes) to the config"
        )
    probes = load_probe_sets(config.eval.bias)
    tokenizer = str(target.model_dir) if target.model_dir else config.model.tokenizer_path
    with model_folder(target) as model_dir:
        models = {
            "model": (str(model_dir), tokenizer),
            "base": (config.model.path, config.model.tokenizer_path),
        }
        job = {"bias": True, "config": None, "models": models}
        if nproc == 1:
            lls = _bias_lls(models, config, ParallelEnv())
        else:
            with tempfile.TemporaryDirectory(prefix="keeltune-bias-") as tmp:
                (Path(tmp) / CONFIG_FILE).write_text(config.to_yaml())
                job["config"] = str(Path(tmp) / CONFIG_FILE)
                lls = run_job_on_ranks(nproc, "keeltune.training.run_eval", job, "keeltune eval --bias")
    results: dict[str, float] = {}
    for probe in probes:
        results.update(
            bias_results(probe, lls["model"][probe.name], lls["base"][probe.name], config.eval.bias)
        )
    if target.run_dir is None or target.checkpoint is None:
        return results, None
    step = int(target.checkpoint.name.removeprefix("step_"))
    out = target.run_dir / BIAS_DIR / f"step_{step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    items = {
        probe.name: {side: item_rows(probe, found[probe.name]) for side, found in lls.items()}
        for probe in probes
    }
    write_json_atomically(out, {"step": step, "base": config.model.path, "results": results, "items": items})
    return results, out


def _bias_lls(
    models: dict[str, tuple[str, str]], config: Config, parallel: ParallelEnv
) -> dict[str, dict[str, list[list[float]]]]:
    """Each model's log-likelihoods of every probe item (side -> probe -> lls), this rank's share all-gathered."""
    probes = load_probe_sets(config.eval.bias)
    found = {}
    for side, (model_dir, tokenizer_path) in models.items():
        model = HFTaskModel(
            load_causal_lm(model_dir).to(parallel.device).eval(),
            autocast_dtype(config.training.precision, parallel.device),
        )
        found[side] = score_probe_sets(
            model,
            probes,
            load_tokenizer(tokenizer_path),
            parallel,
            batch_size=config.eval.task_batch_size,
            max_length=config.data.seq_len,
        )
        del model
    return found


def _evaluate_on_ranks(
    model_dir: Path,
    tokenizer_path: str,
    folders: dict[str, Path],
    config: Config,
    max_samples: int | None,
    nproc: int,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="keeltune-eval-ranks-") as tmp:
        (Path(tmp) / CONFIG_FILE).write_text(config.to_yaml())
        job = {
            "config": str(Path(tmp) / CONFIG_FILE),
            "model_dir": str(model_dir),
            "tokenizer": tokenizer_path,
            "folders": {name: str(folder) for name, folder in folders.items()},
            "max_samples": max_samples,
        }
        return run_job_on_ranks(nproc, "keeltune.training.run_eval", job, "keeltune eval")


def _evaluate_job(job: dict[str, Any], parallel: ParallelEnv) -> dict[str, Any]:
    if job.get("bias"):
        models = {side: tuple(pair) for side, pair in job["models"].items()}
        return _bias_lls(models, load_config(job["config"]).with_extended_base(), parallel)
    folders = {name: Path(folder) for name, folder in job["folders"].items()}
    return evaluate_folder(
        Path(job["model_dir"]),
        job["tokenizer"],
        folders,
        load_config(job["config"]).with_extended_base(),
        job["max_samples"],
        parallel,
    )


def main(argv: list[str] | None = None) -> int:
    """One evaluation rank under torch's launcher (``keeltune eval --nproc N`` starts them)."""
    return rank_of_job(argv, _evaluate_job)


if __name__ == "__main__":
    exit_rank(main())
