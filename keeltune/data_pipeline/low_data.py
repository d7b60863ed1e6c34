"""The low-data safeguard: how many passes over each training source the configured steps imply, and a warning
with keeltune's overfitting controls when that is many.

A source's share of the training stream is its mixing weight's (``mixing_counts``); it is read
``training.max_steps x training.global_batch_size x share`` times, over its prepared samples (after
deduplication): a single source gives ``max_steps x global_batch_size / samples`` epochs.
"""

from __future__ import annotations

import logging
import math

from keeltune.config import Config, mixing_counts
from keeltune.data_pipeline.prepare import read_index

EPOCHS_WARNING = 3.0  # more passes than this over a source: a small model memorises it, a large one sooner

log = logging.getLogger("keeltune")


def implied_epochs(config: Config) -> list[tuple[str, str, int, float]]:
    """(config key, source name, prepared samples, epochs) of every train source prepared so far (a source
    drawn from the base model is prepared when training starts)."""
    shares = mixing_counts(config.data.train)
    period = sum(shares)
    read = config.training.max_steps * config.training.global_batch_size
    found = []
    for key, source, folder in config.data.prepared_sets(config.run_dir):
        if not key.startswith("data.train."):
            continue
        i = int(key.rpartition(".")[2])
        index = read_index(folder)
        if index is None or not index.get("num_samples"):
            continue
        samples = index["num_samples"]
        found.append((key, source.name, samples, read * shares[i] / period / samples))
    return found


def overfitting_controls(config: Config) -> list[str]:
    """keeltune's controls against overfitting that the config leaves off, each with its key."""
    reg, data = config.regularization, config.data
    controls = []
    if reg.early_stopping.patience == 0:
        watch = "on val/loss" if data.validation else "needs a data.validation set or an eval task"
        controls.append(f"regularization.early_stopping.patience (e.g. 3; {watch})")
    if reg.neftune_alpha == 0:
        controls.append("regularization.neftune_alpha (noise on the input embeddings, e.g. 5)")
    if reg.dropout is None:
        controls.append("regularization.dropout (e.g. 0.1)")
    if reg.weight_decay == 0:
        controls.append("regularization.weight_decay (e.g. 0.1)")
    if len(data.train) == 1:
        controls.append(
            "replay of general text: a second data.train source with a weight (e.g. weight 80 for the task, "
            "20 for the general text)"
        )
    if reg.kl.weight == 0 and reg.l2sp.weight == 0:
        controls.append(
            "regularization.kl.weight or regularization.l2sp.weight (stay close to the base model)"
        )
    return controls


def warn_low_data(config: Config) -> list[str]:
    """Log a warning for each train source read more than ``EPOCHS_WARNING`` times by the configured steps,
    with the controls to consider; return the warnings."""
    warnings = []
    training = config.training
    for key, name, samples, epochs in implied_epochs(config):
        if epochs <= EPOCHS_WARNING:
            continue
        share = epochs * samples / (training.max_steps * training.global_batch_size)
        fewer = max(1, math.floor(training.max_steps * EPOCHS_WARNING / epochs))
        controls = [f"fewer steps (training.max_steps: {fewer} for {EPOCHS_WARNING:g} epochs)"]
        controls += overfitting_controls(config)
        message = (
            f"{key} ({name}): only {samples} samples (after deduplication) for training.max_steps "
            f"{training.max_steps} x training.global_batch_size {training.global_batch_size}"
            + (f" x its mixing share {share:.0%}" if share < 1 else "")
            + f": about {epochs:.1f} epochs, where the model is likely to memorise its training data "
            f"(overfit). Consider: " + "; ".join(controls)
        )
        log.warning("%s", message)
        warnings.append(message)
    return warnings
