"""Checks of a loaded Config against the world: the number of ranks and the filesystem (run at train or launch
time, not at load)."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path

from keeltune.config.backends import backend_spec
from keeltune.config.schema import Config, ConfigError


def check_world_size(config: Config, world_size: int) -> int:
    """Fail before any work starts if the global batch cannot be made; return the accumulation steps."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    accumulation = config.training.gradient_accumulation(world_size)
    backend_spec(config).check_ranks(config, world_size)
    return accumulation


def check_paths(config: Config) -> None:
    """Check the files a run reads and the folder it writes (done at train/launch time, not at load)."""
    model = Path(config.model.path)
    if not (model / "config.json").is_file():
        raise ConfigError(
            f"model.path: {model} is not a Hugging Face model folder (no config.json there); "
            "give the folder written by save_pretrained"
        )
    tokenizer = Path(config.model.tokenizer_path)
    if not tokenizer.is_dir():
        raise ConfigError(f"model.tokenizer: {tokenizer} is not a folder with a saved tokenizer")
    files = [(f"eval.bias.probes.{i}.path", p.path) for i, p in enumerate(config.eval.bias.probes) if p.path]
    files += [(f"eval.bias.probes.{i}.anti_path", p.anti_path) for i, p in enumerate(config.eval.bias.probes)]
    for index, view in enumerate(config.stage_views()):
        prefix = f"stages.{index}." if config.stages else ""
        _check_data_paths(view, prefix)
        files += [
            (f"{prefix}data.train.{i}.counterfactual.swaps", s.counterfactual.swaps)
            for i, s in enumerate(view.data.train)
            if s.counterfactual is not None
        ]
        files.append((f"{prefix}regularization.consistency.swaps", view.regularization.consistency.swaps))
    for key, file in files:
        if file and not Path(file).is_file():
            raise ConfigError(f"{key}: {file} is not a file")
    root = Path(config.run.root).absolute()
    existing = root
    while not existing.exists():
        existing = existing.parent
    problem = ""
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as err:
            problem = f"cannot create files in {existing}: {err.strerror}"
    if problem:
        raise ConfigError(
            f"run.root: {config.run.root} is not writable ({problem}); "
            "choose a folder you can write, e.g. --set run.root=$HOME/keeltune-runs"
        )


def _check_data_paths(config: Config, prefix: str) -> None:
    sets = [(f"data.train.{i}", s.path) for i, s in enumerate(config.data.train) if s.generate is None]
    sets += [(f"data.retention.{i}", s.path) for i, s in enumerate(config.data.retention)]
    if config.data.validation:
        sets.append(("data.validation", config.data.validation.path))
    for key, pattern in sets:
        if not glob.glob(pattern):
            raise ConfigError(
                f"{prefix}{key}.path: {pattern} does not exist (a file, a glob matching files, or a folder is "
                "expected)"
            )
