"""``keeltune eval``: the trainer's held-out evaluation, on a run's checkpoint or on any Hugging Face folder."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keeltune.config import Config, ConfigError, load_config
from keeltune.data_pipeline.prepare import (
    DataError,
    prepare_source,
    read_index,
    staleness,
    tokenizer_fingerprint,
)
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.eval.evaluate import evaluate, forgetting
from keeltune.sharding.backends import export_checkpoint
from keeltune.sharding.model import autocast_dtype, load_causal_lm, load_tokenizer
from keeltune.training.run_files import BASELINE_FILE, CONFIG_FILE, complete_checkpoints


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
        config = load_config(path / CONFIG_FILE)
        found = {int(p.name.removeprefix("step_")): p for p in complete_checkpoints(path)}
        if not found:
            raise ConfigError(f"{path}: no complete checkpoint to evaluate")
        step = max(found) if step is None else step
        if step not in found:
            raise ConfigError(f"--checkpoint {step}: not in {path}; complete checkpoints: {sorted(found)}")
        return EvalTarget(config, path, found[step], None, _baseline(path))
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
    config = load_config(config_file)
    return EvalTarget(config, None, None, path, _baseline(config.run_dir))


def _baseline(run_dir: Path) -> dict[str, float]:
    file = run_dir / BASELINE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def held_out_sets(config: Config, tokenizer: Any) -> dict[str, PackedDataset]:
    """The trainer's held-out sets (``val``, ``retention/<name>``), prepared first when they are not.

    Sets prepared with another tokenizer stay untouched; this tokenizer's go next to them."""
    data, fingerprint = config.data, tokenizer_fingerprint(tokenizer)
    sets = {}
    for key, source, folder in data.prepared_sets(config.run_dir):
        if key.startswith("data.train."):
            continue
        index = read_index(folder)
        if index is not None and index.get("tokenizer_fingerprint") != fingerprint:
            folder = folder.with_name(f"{folder.name}-tokenizer-{fingerprint[:12]}")
        problem = staleness(folder, source, tokenizer, data.seq_len, data.long_documents)
        if problem == "not prepared":
            prepare_source(
                source,
                folder,
                tokenizer=tokenizer,
                seq_len=data.seq_len,
                long_documents=data.long_documents,
                shard_samples=data.shard_samples,
                workers=data.prepare_workers,
            )
        elif problem:
            raise DataError(
                f"{key} ({source.name}): {folder} is stale ({problem}); run keeltune prepare CONFIG"
            )
        name = "val" if key == "data.validation" else f"retention/{source.name}"
        sets[name] = PackedDataset(folder, fingerprint=fingerprint, verify_checksums=data.verify_checksums)
    return sets


@contextlib.contextmanager
def model_folder(target: EvalTarget) -> Iterator[Path]:
    """A Hugging Face folder of the target: a checkpoint is exported to a temporary one (QLoRA: merged)."""
    if target.checkpoint is None:
        yield target.model_dir
        return
    merge = target.config.sharding.backend == "qlora"
    with tempfile.TemporaryDirectory(prefix="keeltune-eval-") as tmp:
        yield export_checkpoint(target.config, target.checkpoint, Path(tmp), merge=merge)[-1]


def evaluate_target(target: EvalTarget, *, max_samples: int | None = None) -> dict[str, float]:
    """Loss and perplexity of every held-out set (one process), with forgetting against the baseline."""
    config = target.config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer_path = str(target.model_dir) if target.model_dir else config.model.tokenizer_path
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{tokenizer_path}: no usable tokenizer ({err})") from None
    sets = held_out_sets(config, tokenizer)
    if not sets:
        raise ConfigError("the config has no held-out set: add data.validation or data.retention")
    amp_dtype = autocast_dtype(config.training.precision, device)
    results: dict[str, float] = {}
    with model_folder(target) as folder:
        model = load_causal_lm(str(folder)).to(device).eval()

        def logits(input_ids: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return model(input_ids=input_ids, use_cache=False).logits.float()

        for name, dataset in sets.items():
            result = evaluate(
                logits,
                dataset,
                rank=0,
                world_size=1,
                all_reduce_sum=lambda tensor: tensor,
                micro_batch_size=config.eval.micro_batch_size,
                device=device,
                max_samples=max_samples if max_samples is not None else config.eval.max_samples,
            )
            results[f"{name}/loss"] = result.loss
            results[f"{name}/ppl"] = result.ppl
    return {**results, **forgetting(results, target.baseline)}
