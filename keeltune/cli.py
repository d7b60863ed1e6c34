"""``keeltune <verb>``: a thin entry point; the work is done in the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def build_parser() -> argparse.ArgumentParser:
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
    sbatch.add_argument("--nodes", type=int, help="override slurm.nodes")
    sbatch.add_argument("--gpus-per-node", type=int, help="override slurm.gpus_per_node")
    for option in ("partition", "time", "account", "qos"):
        sbatch.add_argument(f"--{option}", help=f"override slurm.{option}")

    export = verbs.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face folder (safetensors, config, tokenizer)"
    )
    export.add_argument("run", type=Path, help="run folder (holds config.yaml and checkpoints/)")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--checkpoint", type=int, help="step to export (default: the latest checkpoint)")
    export.add_argument(
        "--merge", action="store_true", help="QLoRA: also write the base with the adapters merged in"
    )

    demo = verbs.add_parser("demo", help="pretrain a tiny base on Python's docs, then fine-tune it, offline")
    demo.add_argument("--smoke", action="store_true", help="a tiny version for tests (seconds, not minutes)")
    demo.add_argument(
        "--backend",
        choices=("ddp", "zero3", "qlora"),
        default="ddp",
        help="how the fine-tune runs: ddp (default), zero3 (DeepSpeed ZeRO-3) or qlora (4-bit base + LoRA)",
    )
    demo.add_argument(
        "--root", type=Path, default=Path("runs"), help="where the demo's runs go (default: runs)"
    )
    demo.add_argument(
        "--cache", type=Path, default=None, help="base-model cache (default: ~/.cache/keeltune)"
    )
    return parser


def cmd_config(args: argparse.Namespace) -> int:
    from keeltune.config import check_world_size, load_config

    config = load_config(args.config, args.overrides)
    accumulation = check_world_size(config, args.nproc)
    print(config.to_yaml(), end="")
    print(f"# {args.nproc} rank(s): gradient accumulation {accumulation}")
    if config.sharding.backend == "zero3":
        _print_deepspeed_config(config, args.nproc)
    return 0


def _print_deepspeed_config(config, nproc: int) -> None:
    """The DeepSpeed JSON keeltune generates, as comments (the output stays valid YAML)."""
    import json

    from keeltune.config import ConfigError
    from keeltune.sharding.plan import deepspeed_config, model_hidden_size

    try:
        hidden = model_hidden_size(config.model.path)
    except ConfigError as err:
        print(f"# DeepSpeed config: not shown, its sizes come from the model's config.json ({err})")
        return
    bf16 = config.training.precision in ("bf16", "auto")
    generated = deepspeed_config(config, nproc, bf16=bf16, hidden_size=hidden)
    note = (
        " (precision auto: bf16 on GPUs with bf16, fp32 elsewhere)"
        if config.training.precision == "auto"
        else ""
    )
    print(f"# DeepSpeed config generated for {nproc} rank(s){note}:")
    print("\n".join(f"#   {line}" for line in json.dumps(generated, indent=2).splitlines()))


def cmd_prepare(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from keeltune.config import check_paths, load_config
    from keeltune.data_pipeline.prepare import prepare_sets
    from keeltune.sharding.model import load_tokenizer

    config = load_config(args.config, args.overrides)
    check_paths(config)
    console = Console(stderr=True)
    logger = logging.getLogger("keeltune")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        results = prepare_sets(config.data, config.run_dir, tokenizer, refresh=True, progress=progress)
    for key, folder, outcome in results:
        print(f"{key}: {outcome} ({folder})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from keeltune.config import check_paths, check_world_size, load_config
    from keeltune.launcher.local import run_local
    from keeltune.launcher.run_dir import prepare_run_dir

    config = load_config(args.config, args.overrides)
    check_world_size(config, args.nproc)
    check_paths(config)
    run_dir, checkpoint = prepare_run_dir(config)
    where = f"resuming from {checkpoint.name}" if checkpoint else "new run"
    print(f"run folder: {run_dir} ({where}, {args.nproc} rank(s))", file=sys.stderr)
    return run_local(run_dir, args.nproc)


def cmd_sbatch(args: argparse.Namespace) -> int:
    from keeltune.config import check_paths, check_world_size, load_config
    from keeltune.launcher.run_dir import prepare_run_dir
    from keeltune.launcher.sbatch import render_sbatch

    overrides = list(args.overrides)
    for key in ("nodes", "gpus_per_node", "partition", "time", "account", "qos"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"slurm.{key}={value}")
    config = load_config(args.config, overrides)
    check_world_size(config, config.slurm.nodes * config.slurm.gpus_per_node)
    check_paths(config)
    run_dir, _ = prepare_run_dir(config)
    args.output.write_text(render_sbatch(config, run_dir))
    args.output.chmod(0o755)
    print(
        f"wrote {args.output}: {config.slurm.nodes} node(s) x {config.slurm.gpus_per_node} GPU(s), run folder {run_dir}"
    )
    print(f"submit with: sbatch {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from keeltune.config import ConfigError, load_config
    from keeltune.sharding.backends import export_checkpoint
    from keeltune.sharding.model import load_tokenizer
    from keeltune.training.run_files import CONFIG_FILE, complete_checkpoints

    config_file = args.run / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(
            f"{args.run}: not a run folder (no {CONFIG_FILE}); give the folder `keeltune train` made"
        )
    config = load_config(config_file)
    found = {int(path.name.removeprefix("step_")): path for path in complete_checkpoints(args.run)}
    if not found:
        raise ConfigError(f"{args.run}: no complete checkpoint to export")
    step = max(found) if args.checkpoint is None else args.checkpoint
    if step not in found:
        raise ConfigError(f"--checkpoint {step}: not in {args.run}; complete checkpoints: {sorted(found)}")
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    for folder in export_checkpoint(config, found[step], args.out, merge=args.merge):
        tokenizer.save_pretrained(folder)
        print(f"wrote {folder} (step {step})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from keeltune.demo.run import run_demo

    run_demo(root=args.root, smoke=args.smoke, cache=args.cache, backend=args.backend)
    return 0


COMMANDS = {
    "config": cmd_config,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sbatch": cmd_sbatch,
    "export": cmd_export,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    from keeltune.config import ConfigError
    from keeltune.data_pipeline.prepare import DataError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
