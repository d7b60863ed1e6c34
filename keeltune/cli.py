"""``keeltune <verb>``: a thin entry point; the work is done in the library."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keeltune.config import Config
    from keeltune.launcher.submit import JobRecord


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr=3e-4 (repeatable)",
    )


def _add_resource_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, help="override slurm.nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, help="override slurm.gpus_per_node (0: CPU ranks, see --ntasks-per-node)"
    )
    parser.add_argument("--ntasks-per-node", type=int, help="override slurm.ntasks_per_node (CPU ranks)")
    for option in ("partition", "time", "account", "qos"):
        parser.add_argument(f"--{option}", help=f"override slurm.{option}")


def _load_with_resources(args: argparse.Namespace):
    """The config with the command line's Slurm resources applied, checked for its world size, paths and
    evaluation tasks."""
    from keeltune.config import check_paths, check_world_size, load_config
    from keeltune.eval.bias.probes import check_probes
    from keeltune.eval.scoring import check_tasks

    overrides = list(args.overrides)
    for key in ("nodes", "gpus_per_node", "ntasks_per_node", "partition", "time", "account", "qos"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"slurm.{key}={value}")
    config = load_config(args.config, overrides)
    check_world_size(config, config.slurm.world_size)
    check_paths(config)
    check_tasks(config)  # task files and user metrics, before the job waits in a queue
    check_probes(config)  # bias probe files too
    return config


def build_parser() -> argparse.ArgumentParser:
    from keeltune.config import BACKENDS, DEFAULT_BACKEND

    parser = argparse.ArgumentParser(prog="keeltune", description="Fine-tune LLMs without forgetting.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    config = verbs.add_parser("config", help="validate a config and print it fully resolved")
    _add_config_args(config)
    config.add_argument("--nproc", type=int, default=1, help="check the batch sizes for this many ranks")

    prepare = verbs.add_parser(
        "prepare", help="tokenize, pack and shard the config's data sets (those not prepared or stale)"
    )
    _add_config_args(prepare)

    train = verbs.add_parser("train", help="train on this machine (resumes when the run has a checkpoint)")
    _add_config_args(train)
    train.add_argument(
        "--nproc", type=int, default=1, help="local processes (ranks), started with torch's launcher"
    )

    sbatch = verbs.add_parser(
        "sbatch", help="write a standalone sbatch script that trains this config on Slurm"
    )
    _add_config_args(sbatch)
    sbatch.add_argument("-o", "--output", type=Path, required=True, help="where to write the script")
    _add_resource_args(sbatch)

    launch = verbs.add_parser(
        "launch", help="validate, then submit the run to Slurm through submitit (or run it here with --local)"
    )
    _add_config_args(launch)
    _add_resource_args(launch)
    launch.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and a memory estimate"
    )
    launch.add_argument(
        "--local", action="store_true", help="run the same job on this machine, without Slurm"
    )
    launch.add_argument("--wait", action="store_true", help="wait for the job to end and return its status")

    status = verbs.add_parser("status", help="the state of a launched run (job, progress, W&B)")
    status.add_argument("run", type=Path, help="run folder")
    logs = verbs.add_parser("logs", help="print a rank's log of a launched run")
    logs.add_argument("run", type=Path, help="run folder")
    logs.add_argument("--rank", type=int, default=0, help="which rank (default 0)")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new lines until the job ends"
    )
    cancel = verbs.add_parser("cancel", help="cancel the latest job of a launched run")
    cancel.add_argument("run", type=Path, help="run folder")

    export = verbs.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face folder (safetensors, config, tokenizer)"
    )
    export.add_argument("run", type=Path, help="run folder (holds config.yaml and checkpoints/)")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--checkpoint", type=int, help="step to export (default: the latest checkpoint)")
    export.add_argument(
        "--merge", action="store_true", help="QLoRA: also write the base with the adapters merged in"
    )
    export.add_argument(
        "--interpolate",
        type=float,
        metavar="ALPHA",
        help="keep ALPHA of the fine-tuning change: base + ALPHA * (tuned - base), against forgetting (WiSE-FT)",
    )

    evaluation = verbs.add_parser(
        "eval",
        help="the trainer's evaluation (held-out loss and ppl, eval.tasks) on a checkpoint or a model, or "
        "lm-evaluation-harness tasks",
    )
    evaluation.add_argument("target", type=Path, help="run folder, or a Hugging Face model folder")
    evaluation.add_argument(
        "--checkpoint", type=int, metavar="STEP", help="run folder: the step (default: the latest)"
    )
    evaluation.add_argument(
        "--config", type=Path, help="model folder: the YAML config whose held-out sets it is evaluated on"
    )
    evaluation.add_argument(
        "--max-samples", type=int, help="per set (default: the config's eval.max_samples)"
    )
    evaluation.add_argument("--json", action="store_true", help="print the numbers as JSON")
    evaluation.add_argument(
        "--tasks", help="only these eval.tasks of the config, comma-separated (the held-out sets are skipped)"
    )
    evaluation.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="run lm-evaluation-harness tasks (comma-separated) on the model instead",
    )
    evaluation.add_argument(
        "--include-path", type=Path, help="--lm-eval: a folder of local task YAMLs (data on disk, offline)"
    )
    evaluation.add_argument("--limit", type=int, help="--lm-eval: at most this many items per task")
    evaluation.add_argument(
        "--nproc", type=int, default=1, help="local ranks sharing the samples, started with torch's launcher"
    )
    evaluation.add_argument(
        "--bias",
        action="store_true",
        help="score the config's eval.bias probes on the model and on its base: bias amplification with "
        "bootstrap intervals (a run: written to RUN/bias/step_N.json)",
    )

    sweep = verbs.add_parser(
        "sweep",
        help="search hyperparameters with Optuna, each trial a keeltune run on Slurm (or --local); restartable. "
        "Also: keeltune sweep status NAME, keeltune sweep report NAME",
    )
    sweep.add_argument(
        "target", metavar="SWEEP.yaml|status|report", help="a sweep file to run, or status/report"
    )
    sweep.add_argument("name", nargs="?", metavar="NAME", help="status/report: the sweep's name or folder")
    sweep.add_argument("--local", action="store_true", help="run the trials on this machine, without Slurm")
    sweep.add_argument(
        "--root", type=Path, default=Path("sweeps"), help="status/report: where sweeps are (default: sweeps)"
    )
    sweep.add_argument("--out", type=Path, help="report: folder to write (default: SWEEP_FOLDER/report)")

    report = verbs.add_parser("report", help="plots and a markdown summary of a run (from its metrics.jsonl)")
    report.add_argument("run", type=Path, help="run folder")
    report.add_argument("--out", type=Path, help="folder to write (default: RUN/report)")

    _add_review_parser(verbs)

    demo = verbs.add_parser("demo", help="pretrain a tiny base on Python's docs, then fine-tune it, offline")
    demo.add_argument("--smoke", action="store_true", help="a tiny version for tests (seconds, not minutes)")
    demo.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        default=DEFAULT_BACKEND,
        help="how the fine-tune runs: "
        + "; ".join(f"{name}: {spec.summary}" for name, spec in BACKENDS.items())
        + f" (default {DEFAULT_BACKEND})",
    )
    demo.add_argument(
        "--root", type=Path, default=Path("runs"), help="where the demo's runs go (default: runs)"
    )
    demo.add_argument(
        "--cache", type=Path, default=None, help="base-model cache (default: ~/.cache/keeltune)"
    )
    demo.add_argument(
        "--no-mitigation",
        action="store_true",
        help="only the unregularized fine-tune (default: also one with replay, side by side)",
    )
    return parser


def _add_review_parser(verbs: Any) -> None:
    review = verbs.add_parser(
        "review", help="blind side-by-side human review of a run's answers in a web page"
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="generate the models' answers to held-out prompts and pair them"
    )
    create.add_argument("run", type=Path, help="run folder (its final model, else its newest checkpoint)")
    create.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="base|RUN|MODEL",
        help="a model to compare with (repeat for several; default: base, the run's base model)",
    )
    create.add_argument(
        "--prompts",
        help="a generate task of the run's eval.tasks, or a JSONL file (default: the first generate task, else "
        "data.validation)",
    )
    create.add_argument(
        "--format",
        choices=("text", "instruction", "chat", "sharegpt"),
        help="the --prompts file's format (default: data.validation's)",
    )
    create.add_argument("--n", type=int, default=100, help="prompts drawn from the set (default 100)")
    create.add_argument("--name", default="review", help="the review's name (default: review)")
    create.add_argument(
        "--seed",
        type=int,
        help="prompt draw, item order and sides (default: a random one, recorded in the hidden key; a seed "
        "reviewers know would let them work out the sides)",
    )
    create.add_argument("--max-new-tokens", type=int, help="answer length (default: the task's, else 128)")
    create.add_argument("--nproc", type=int, default=1, help="local ranks sharing the generation")
    create.add_argument(
        "--slurm",
        action="store_true",
        help="generate in a Slurm job (one node, the run's slurm resources; --nproc ranks there) and wait",
    )
    serve = actions.add_parser("serve", help="serve the review page (127.0.0.1 unless --host)")
    serve.add_argument("run", type=Path, help="run folder")
    serve.add_argument("--name", default="review", help="the review's name (default: review)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: reach it through SSH)"
    )
    results = actions.add_parser("results", help="win rates, agreement and scores from the votes")
    results.add_argument("run", type=Path, help="run folder")
    results.add_argument("--name", default="review", help="the review's name (default: review)")
    results.add_argument("--json", action="store_true", help="print the results as JSON")


def cmd_config(args: argparse.Namespace) -> int:
    from keeltune.config import backend_spec, check_world_size, load_config

    config = load_config(args.config, args.overrides)
    accumulation = check_world_size(config, args.nproc)
    print(config.to_yaml(), end="")
    print(f"# {args.nproc} rank(s): gradient accumulation {accumulation}")
    if config.stages:
        steps = ", ".join(f"{s.name} {s.training.max_steps}" for s in config.stages)
        print(f"# stages (steps): {steps}; {config.total_steps} in all")
    describe = backend_spec(config).describe
    for line in describe(config, args.nproc) if describe else []:
        print(line)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from keeltune.config import check_paths, load_config
    from keeltune.data_pipeline.contamination import contamination_report, summary_lines
    from keeltune.data_pipeline.low_data import warn_low_data
    from keeltune.data_pipeline.prepare import prepare_sets
    from keeltune.eval.bias.probes import check_probes
    from keeltune.eval.scoring import check_tasks
    from keeltune.sharding.model import load_tokenizer
    from keeltune.training.vocabulary import ensure_extended_tokenizer

    config = load_config(args.config, args.overrides)
    check_paths(config)
    for name, count in check_tasks(config).items():
        print(f"eval task {name}: {count} items")
    for name, counts in check_probes(config).items():
        print(f"bias probe {name}: " + ", ".join(f"{axis} {n} items" for axis, n in counts.items()))
    console = Console(stderr=True)
    logger = logging.getLogger("keeltune")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))
    vocabulary = ensure_extended_tokenizer(
        config
    )  # model.extend_vocabulary: what the data are tokenized with
    if vocabulary is not None:
        per_document = vocabulary["tokens_per_document"]
        print(
            f"domain vocabulary: {len(vocabulary['tokens'])} new tokens in {config.extended_base}; tokens per "
            f"domain document {per_document['before']:.1f} -> {per_document['after']:.1f}"
        )
    config = config.with_extended_base()
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    for index, view in enumerate(config.stage_views()):
        prefix = f"stages.{index}." if config.stages else ""
        with Progress(*columns, console=console, transient=True) as progress:
            results = prepare_sets(
                view.data, config.run_dir, tokenizer, refresh=True, progress=progress,
                dedup_over=config.whole_run_view().data,
            )  # fmt: skip
        for key, folder, outcome in results:
            print(f"{prefix}{key}: {outcome} ({folder})")
        warn_low_data(view)  # how many epochs the stage's steps imply over each train source
    report = contamination_report(config)  # eval items and held-out records found in the training data
    for line in summary_lines(report) if report else []:
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from keeltune.config import check_paths, check_world_size, load_config
    from keeltune.data_pipeline.vocabulary import check_extended_vocabulary
    from keeltune.eval.bias.probes import check_probes
    from keeltune.eval.scoring import check_tasks
    from keeltune.launcher.local import run_local
    from keeltune.launcher.run_dir import prepare_run_dir

    config = load_config(args.config, args.overrides)
    check_world_size(config, args.nproc)
    check_paths(config)
    check_tasks(config)
    check_probes(config)
    check_extended_vocabulary(config)
    run_dir, checkpoint = prepare_run_dir(config, args.nproc)
    where = f"resuming from {checkpoint.name}" if checkpoint else "new run"
    print(f"run folder: {run_dir} ({where}, {args.nproc} rank(s))", file=sys.stderr)
    return run_local(run_dir, args.nproc)


def cmd_sbatch(args: argparse.Namespace) -> int:
    from keeltune.launcher.run_dir import prepare_run_dir
    from keeltune.launcher.sbatch import render_sbatch

    config = _load_with_resources(args)
    run_dir, _ = prepare_run_dir(config, config.slurm.world_size)
    args.output.write_text(render_sbatch(config, run_dir))
    args.output.chmod(0o755)
    print(f"wrote {args.output}: {config.slurm.nodes} node(s) x {_ranks_text(config)}, run folder {run_dir}")
    print(f"submit with: sbatch {args.output}")
    return 0


def _ranks_text(config: Config) -> str:
    slurm = config.slurm
    if slurm.gpus_per_node:
        return f"{slurm.gpus_per_node} GPU(s), one rank each"
    return f"{slurm.ranks_per_node} CPU rank(s)"


def cmd_launch(args: argparse.Namespace) -> int:
    from keeltune.config.plan import estimate_gpu_memory
    from keeltune.data_pipeline.prepare import check_prepared_for_launch
    from keeltune.data_pipeline.vocabulary import check_extended_vocabulary
    from keeltune.launcher import submit
    from keeltune.launcher.run_dir import prepare_run_dir
    from keeltune.run_folder import RANK_LOG, WANDB_DIR, logs_dir

    config = _load_with_resources(args)
    ranks = config.slurm.world_size
    check_extended_vocabulary(config)
    extended = config.with_extended_base()
    for index, view in enumerate(extended.stage_views()):  # before the job waits in a queue
        prefix = f"stages.{index}." if config.stages else ""
        for key, _, folder in view.data.prepared_sets(config.run_dir):
            if not Path(
                extended.model.tokenizer_path
            ).is_dir():  # the domain vocabulary is learned in the job
                print(f"data {prefix}{key}: to prepare in the job, with the domain vocabulary")
                continue
            print(f"data {prefix}{key}: {check_prepared_for_launch(folder, extended.model.tokenizer_path)}")
    if args.dry_run:
        memory = estimate_gpu_memory(config, ranks)
        print(submit.dry_run_script(config, config.run_dir.resolve()), end="")
        parts = ", ".join(f"{k} {v:.1f}" for k, v in memory.items() if k != "total")
        device = "GPU" if config.slurm.gpus_per_node else "rank (CPU ranks: host memory)"
        print(
            f"# estimated memory per {device} ({config.sharding.backend}, {ranks} rank(s)): {memory['total']:.1f} GiB ({parts})"
        )
        if config.slurm.gpus_per_node and memory["total"] > 0.9 * config.slurm.gpu_memory_gb:
            print(
                f"# WARNING: that is more than 90% of slurm.gpu_memory_gb={config.slurm.gpu_memory_gb:g}: it will "
                "likely not fit; use more GPUs (zero3 or fsdp2), sharding.zero3.offload_optimizer: cpu, "
                "model.gradient_checkpointing: true or a smaller micro_batch_size"
            )
        return 0
    run_dir, checkpoint = prepare_run_dir(config, ranks)
    run_id = submit.wandb_run_id(run_dir)
    record, job = submit.submit(config, run_dir, local=args.local)
    where = f"resuming from {checkpoint.name}" if checkpoint else "new run"
    print(
        f"submitted job {record.job_id} ({record.cluster}, {config.slurm.nodes} node(s) x {_ranks_text(config)}), {where}"
    )
    print(f"run folder   {run_dir}")
    rank_logs = logs_dir(run_dir) / RANK_LOG.format(rank="<R>")
    print(f"logs         {rank_logs}  (keeltune logs {run_dir} --rank R --follow)")
    print(f"job output   {record.folder}/")
    wandb = config.logging.wandb
    if wandb.mode == "disabled":
        print("W&B          disabled")
    else:
        entity = wandb.entity or "<your entity>"
        print(
            f"W&B          run {run_id} in project {wandb.project} (mode {wandb.mode}): online "
            f"https://wandb.ai/{entity}/{wandb.project}/runs/{run_id}, offline {run_dir / WANDB_DIR}"
        )
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as err:  # submitit re-raises the job's failure
        print(f"job {record.job_id} failed: {str(err)[-2000:]}", file=sys.stderr)
        for line in submit.dead_ranks(record):
            print(line, file=sys.stderr)
        return 1
    print(f"job {record.job_id} finished")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from keeltune.config import ConfigError, load_config
    from keeltune.launcher import submit
    from keeltune.run_folder import CONFIG_FILE, latest_checkpoint
    from keeltune.training.manifest import damaged_checkpoints

    config_file = args.run / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{args.run}: not a run folder (no {CONFIG_FILE})")
    config = load_config(config_file)
    jobs = submit.read_records(args.run)
    if jobs:
        _print_job(jobs[-1], args.run)
    else:
        print("job          none launched (a run of keeltune train, or not started yet)")
    print(f"progress     {submit.progress(args.run, config.total_steps)}")
    checkpoint = latest_checkpoint(args.run)
    print(f"checkpoint   {checkpoint.name if checkpoint else 'none yet'}")
    for note in damaged_checkpoints(args.run):
        print(
            f"damaged      {note['checkpoint']}, moved aside to {Path(note['path']).name} "
            f"({'; '.join(note['problems'])}); the run falls back to the newest intact checkpoint"
        )
    print(f"launches     {len(jobs)}")
    return 0


def _print_job(record: JobRecord, run_dir: Path) -> None:
    """The job's state, then how its ranks ended: each rank's own record, else what srun saw of them."""
    from keeltune.launcher import submit
    from keeltune.launcher.rank_records import explain, read_records

    state = submit.job_state(record)
    print(
        f"job          {record.job_id} ({record.cluster}{', sbatch script' if record.launcher == 'sbatch' else ''}): "
        f"{state['state']}"
        + (
            f", {state['reason']}"
            if state["state"] == "PENDING" and state["reason"] not in ("", "None")
            else ""
        )
        + (f", elapsed {state['elapsed']}" if state["elapsed"] else "")
        + (f", on {state['nodes']}" if state["nodes"] not in ("", "None assigned") else "")
    )
    ended = explain(
        read_records(run_dir),
        job=record.job_id if record.cluster == "slurm" else "",
        world_size=record.ranks,
        since=record.submitted,
    )
    for label, text in ended:
        print(f"{label:<12} {text}")
    if not ended:
        for line in submit.dead_ranks(record):
            print(f"failure      {line}")


def cmd_logs(args: argparse.Namespace) -> int:
    import time

    from keeltune.config import ConfigError
    from keeltune.launcher import submit

    record = submit.latest_record(args.run)
    if not 0 <= args.rank < record.ranks:
        raise ConfigError(
            f"--rank {args.rank}: this run has {record.ranks} rank(s), 0 to {record.ranks - 1} "
            f"({record.nodes} node(s) x {record.tasks_per_node})"
        )
    path = submit.rank_logs(args.run, args.rank)
    offset = 0
    while True:
        if path.is_file():
            with open(path, errors="replace") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            print(chunk, end="", flush=True)
        if not args.follow or submit.job_state(record)["state"] not in (
            "RUNNING",
            "PENDING",
            "REQUEUED",
            "UNKNOWN",
            "",
        ):
            break
        time.sleep(1.0)
    if not path.is_file():
        outputs = submit.task_output(record, args.rank)
        if not outputs:
            print(f"no log for rank {args.rank} yet ({path})", file=sys.stderr)
            return 1
        for output in outputs:
            print(output.read_text(errors="replace"), end="")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from keeltune.launcher import submit

    record = submit.latest_record(args.run)
    state = submit.job_state(record)["state"]
    if state in submit.ENDED_STATES:
        print(
            f"job {record.job_id} ({record.cluster}) already ended ({state}): nothing to cancel",
            file=sys.stderr,
        )
        return 1
    submit.cancel(record)
    print(
        f"cancelled job {record.job_id} ({record.cluster}); its ranks checkpoint at the next step boundary. "
        "Resume later with keeltune launch (same config)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from keeltune.config import ConfigError, backend_spec, load_config
    from keeltune.data_pipeline.formats import save_tokenizer
    from keeltune.run_folder import CONFIG_FILE, follow_umask
    from keeltune.sharding.backends import export_checkpoint
    from keeltune.sharding.model import load_tokenizer
    from keeltune.training.manifest import checkpoint_to_read

    config_file = args.run / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(
            f"{args.run}: not a run folder (no {CONFIG_FILE}); give the folder `keeltune train` made"
        )
    config = load_config(config_file).with_extended_base()
    checkpoint, notes = checkpoint_to_read(
        args.run, args.checkpoint, checksums=config.training.checkpoint.verify == "checksum"
    )
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    step = int(checkpoint.name.removeprefix("step_"))
    if args.interpolate is not None and backend_spec(config).adapters and not args.merge:
        raise ConfigError(
            f"--interpolate: a {config.sharding.backend} run's full weights exist only merged; add --merge"
        )
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    for folder in export_checkpoint(config, checkpoint, args.out, merge=args.merge):
        save_tokenizer(tokenizer, folder, config.stage_view(-1).data)  # a staged run: its last stage's
        follow_umask(folder)
        note = ""
        if args.interpolate is not None and (folder / "config.json").is_file():  # not the adapter folder
            from keeltune.sharding.interpolate import interpolate_toward_base

            count = interpolate_toward_base(folder, Path(config.model.path), args.interpolate)
            note = f", {count} tensors interpolated toward the base with alpha {args.interpolate:g}"
        print(f"wrote {folder} (step {step}{note})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from keeltune.config import ConfigError
    from keeltune.eval.names import BPB, CHANGE, FORGETTING, FORGETTING_BPB, LOSS, PPL, STDERR, TASK, metric
    from keeltune.training.run_eval import evaluate_target, lm_eval_target, resolve_target, select_tasks

    target = resolve_target(args.target, step=args.checkpoint, config_file=args.config)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    if args.lm_eval:
        names = [name for name in args.lm_eval.split(",") if name]
        results, saved = lm_eval_target(target, names, include_path=args.include_path, limit=args.limit)
        print(
            json.dumps(results, indent=1)
            if args.json
            else "\n".join(f"{k}: {v:.4g}" for k, v in results.items())
        )
        if saved is not None:
            print(f"lm-eval results written to {saved} and the run's metrics.jsonl", file=sys.stderr)
        return 0
    if args.bias:
        return _print_bias(target, args)
    names = [name for name in args.tasks.split(",") if name] if args.tasks else None
    target = dataclasses.replace(target, config=select_tasks(target.config, names))
    results = evaluate_target(target, max_samples=args.max_samples, nproc=args.nproc, sets=names is None)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    console = Console()
    held_out = [
        key.rsplit("/", 1)[0] for key in results if key.endswith("/" + LOSS) and not key.startswith(TASK)
    ]
    if held_out:
        table = Table(title=f"keeltune eval: {target.label}")
        table.add_column("set", min_width=max(map(len, held_out)))
        for column in ("loss", "perplexity", "bits/byte", "forgetting vs baseline: ppl / bits per byte"):
            table.add_column(column, justify="right")
        for name in held_out:
            rises = [results.get(metric(name, stat)) for stat in (FORGETTING, FORGETTING_BPB)]
            table.add_row(
                name,
                f"{results[metric(name, LOSS)]:.4f}",
                f"{results[metric(name, PPL)]:.3f}",
                f"{results[metric(name, BPB)]:.4f}",
                " / ".join("–" if rise is None else f"{rise:+.2f}%" for rise in rises)
                if rises != [None, None]
                else "",
            )
        console.print(table)
    scores = [k for k in results if k.startswith(TASK + "/") and not k.endswith((STDERR, CHANGE))]
    if scores:
        table = Table(title=f"tasks: {target.label}")
        for column in ("metric", "value", "stderr", "change since step 0"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key in scores:
            stderr, change = results.get(key + STDERR), results.get(key + CHANGE)
            table.add_row(
                key,
                f"{results[key]:.4f}",
                "" if stderr is None else f"±{stderr:.4f}",
                "" if change is None else f"{change:+.4f}",
            )
        console.print(table)
    return 0


def _print_bias(target: Any, args: argparse.Namespace) -> int:
    """``keeltune eval --bias``: a table of every probe, axis and metric (or JSON)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from keeltune.training.run_eval import bias_target

    results, saved = bias_target(target, nproc=args.nproc)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        table = Table(title=f"bias: {target.label} against its base {target.config.model.path}")
        for column in ("probe", "axis", "metric", "base", "model", "amplification", "interval"):
            table.add_column(column, justify="left" if column in ("probe", "axis", "metric") else "right")
        for key, value in results.items():
            amplification = results.get(key + "_amplification")
            if amplification is None:
                continue
            _, probe, axis, name = key.split("/")
            low, high = results.get(key + "_amplification_lo"), results.get(key + "_amplification_hi")
            interval = "" if low is None or high is None else f"[{low:+.4f}, {high:+.4f}]"
            table.add_row(
                probe,
                axis,
                name,
                f"{value - amplification:.4f}",
                f"{value:.4f}",
                f"{amplification:+.4f}",
                interval,
            )
        Console(width=None if sys.stdout.isatty() else 160).print(table)
    if saved is not None:
        print(f"bias results written to {saved}", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from keeltune.config import ConfigError, check_paths
    from keeltune.config.loader import load_sweep
    from keeltune.eval.bias.probes import check_probes
    from keeltune.eval.scoring import check_tasks
    from keeltune.sweep.driver import Driver, check_restart
    from keeltune.sweep.trials import check_sweep

    if args.target in ("status", "report"):
        if args.name is None:
            raise ConfigError(f"keeltune sweep {args.target} NAME: name the sweep (its name or folder)")
        return _sweep_status(args, args.target, args.name)
    if args.name is not None:
        raise ConfigError(
            f"keeltune sweep SWEEP.yaml: one sweep file; {args.name!r} is one argument too many"
        )
    sweep = load_sweep(args.target)
    base = check_sweep(sweep, Path(args.target))  # every key and metric, before any job is submitted
    check_paths(base)
    check_tasks(base)
    check_probes(base)
    check_restart(sweep)
    counts = Driver(sweep, local=args.local, say=lambda line: print(line, flush=True)).run()
    return 0 if counts["COMPLETE"] or counts["PRUNED"] else 1


def _sweep_status(args: argparse.Namespace, action: str, name: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from keeltune.config import ConfigError
    from keeltune.config.loader import load_sweep
    from keeltune.sweep.driver import SWEEP_FILE, DriverLock
    from keeltune.sweep.report import REPORT_DIR, status_table, trial_rows, write_report
    from keeltune.sweep.study import open_studies

    folder = next((f for f in (Path(name), args.root / name) if (f / SWEEP_FILE).is_file()), None)
    if folder is None:
        raise ConfigError(
            f"{name}: no sweep folder there or in {args.root} (no {SWEEP_FILE}); give its folder"
        )
    sweep = load_sweep(folder / SWEEP_FILE)
    study, _ = open_studies(sweep, create=False)
    if action == "report":
        path, wandb = write_report(sweep, study, args.out or folder / REPORT_DIR)
        print(f"wrote {path}, its plot and the front's configs in {path.parent}")
        if wandb:
            print(f"W&B summary run: {wandb}")
        return 0
    columns, cells = status_table(sweep, trial_rows(sweep, study))
    table = Table(title=f"sweep {sweep.name} ({folder})")
    for column in columns:
        table.add_column(column)
    for row in cells:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    print(f"driver: {DriverLock(folder, sweep.poll_s).describe()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from keeltune.training.report import write_report

    report = write_report(args.run, args.out)
    print(f"wrote {report} and its plots in {report.parent}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from keeltune.review.store import ReviewError

    action = {"create": _review_create, "serve": _review_serve, "results": _review_results}[args.action]
    try:
        return action(args)
    except ReviewError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _review_create(args: argparse.Namespace) -> int:
    from keeltune.review.store import new_review_folder, write_review

    folder = new_review_folder(args.run, args.name)  # refused before any generation
    options = {
        "against": [str(Path(a).resolve()) if a != "base" else a for a in args.against],
        "prompts": str(Path(args.prompts).resolve()) if args.prompts and Path(args.prompts).is_file() else args.prompts,
        "fmt": args.format, "n": args.n, "max_new_tokens": args.max_new_tokens,
        "seed": args.seed if args.seed is not None else secrets.randbelow(2**31),
        "nproc": args.nproc,
    }  # fmt: skip
    from keeltune.training.review_answers import check_review, review_items

    if args.slurm:
        check_review(args.run, **options)  # before the job waits in the queue
        return _review_on_slurm(args, folder, options)
    items, key = review_items(args.run, **options)
    review = write_review(folder, items, key)
    print(
        f"review {args.name}: {len(items)} items ({key['prompts']['count']} prompts, models: "
        f"{', '.join(review.models)}) in {folder}\nserve it: keeltune review serve {shlex.quote(str(args.run))} "
        f"--name {shlex.quote(args.name)}"
    )
    return 0


def _review_on_slurm(args: argparse.Namespace, folder: Path, options: dict[str, Any]) -> int:
    from keeltune.launcher.review_job import submit_review
    from keeltune.review.store import load_review

    job = submit_review(args.run, args.name, options)
    print(
        f"submitted job {job.job_id}: generating the answers of review {args.name} (waiting for it)",
        flush=True,
    )
    try:
        job.result()
    except Exception as err:  # submitit's failure, with the job's traceback
        print(f"error: job {job.job_id} failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        print(f"its output: {job.paths.stdout} and {job.paths.stderr}", file=sys.stderr)
        return 1
    review = load_review(args.run, args.name)
    print(
        f"review {args.name}: {len(review.items)} items (models: {', '.join(review.models)}) in {folder}\n"
        f"serve it: keeltune review serve {shlex.quote(str(args.run))} --name {shlex.quote(args.name)}"
    )
    return 0


def _review_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    from keeltune.review.server import ReviewServer, tunnel_hint
    from keeltune.review.store import load_review, review_token

    review = load_review(args.run, args.name)
    server = ReviewServer(review, host=args.host, port=args.port, token=review_token(review.folder))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    voted = len(server.votes.votes)
    print(
        f"review {args.name}: {len(review.items)} items, {voted} votes so far\n"
        f"open: {server.url}\n"
        f"from your machine, first: {tunnel_hint(server.port)}\n"
        "stop with Ctrl-C (every vote is on disk as soon as the page shows the next item)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _review_results(args: argparse.Namespace) -> int:
    import json

    from keeltune.review.results import plot_results, results_markdown, results_rows, review_results
    from keeltune.review.store import RESULTS_DIR, load_review, read_votes

    review = load_review(args.run, args.name)
    votes = read_votes(review.folder)
    items = review.keyed_items()
    results = review_results(review.models, items, votes, seed=review.key["seed"])
    out = review.folder / RESULTS_DIR
    out.mkdir(exist_ok=True)
    markdown = results_markdown(results, name=args.name)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results.to_dict(), indent=1))
    plot_results(results, out / "results.png")
    _log_review_table(args.run, args.name, results_rows(items, votes, review.models))
    print(json.dumps(results.to_dict(), indent=1) if args.json else markdown)
    print(f"written: {out}/results.md, results.png, results.json", file=sys.stderr)
    return 0


def _log_review_table(run_dir: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """The items with their votes as a W&B Table in the run's W&B run (when the run logs to W&B)."""
    from keeltune.config import load_config
    from keeltune.run_folder import CONFIG_FILE, complete_checkpoints
    from keeltune.training.metrics import MetricsLogger

    config = load_config(run_dir / CONFIG_FILE)
    if config.logging.wandb.mode == "disabled" or not rows:
        return
    checkpoints = complete_checkpoints(run_dir)
    step = int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else 0
    logger = MetricsLogger(run_dir, config.logging.wandb, enabled=True, run_config=config.to_dict())
    try:
        logger.table(step, f"review/{name}", rows)
    finally:
        logger.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from keeltune.demo.run import run_demo

    run_demo(
        root=args.root,
        smoke=args.smoke,
        cache=args.cache,
        backend=args.backend,
        mitigation=not args.no_mitigation,
    )
    return 0


COMMANDS = {
    "config": cmd_config,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sbatch": cmd_sbatch,
    "launch": cmd_launch,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "export": cmd_export,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "review": cmd_review,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    from keeltune.config import ConfigError
    from keeltune.data_pipeline.prepare import DataError
    from keeltune.eval.bias.items import ProbeError
    from keeltune.training.manifest import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ConfigError, DataError, CheckpointError, ProbeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
