"""The loop's pieces that come straight from the config: seeds and the opened datasets."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from keeltune.config import Config
from keeltune.data_pipeline.contamination import contamination_report, excluded_items
from keeltune.data_pipeline.low_data import warn_low_data
from keeltune.data_pipeline.prepare import prepare_sets, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv
from keeltune.eval.names import held_out_names
from keeltune.eval.tasks import PreparedTask, prepare_task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(
    config: Config, tokenizer: Any, parallel: ParallelEnv, *, stage: int = 0
) -> tuple[list[PackedDataset], dict[str, PackedDataset]]:
    """Rank 0 prepares the stage's sets not prepared yet (and refuses stale ones), warns when the stage's steps
    imply many epochs over a small train source, runs the contamination check (against every stage's training
    data) unless its report is current, and checks shard checksums; every rank then opens the shards (and may
    read the report). Returns the train sources and the held-out sets (``val``,
    ``retention/<name>``)."""
    view = config.stage_view(stage)
    data = view.data
    if parallel.is_main:
        prepare_sets(data, config.run_dir, tokenizer, refresh=False, dedup_over=config.whole_run_view().data)
        warn_low_data(view)
        contamination_report(config)  # written before the barrier: no other rank computes or writes it
    parallel.barrier()
    fingerprint = tokenizer_fingerprint(tokenizer)
    verify = data.verify_checksums if parallel.is_main else "never"
    opened = {
        key: PackedDataset(folder, fingerprint=fingerprint, verify_checksums=verify)
        for key, _, folder in data.prepared_sets(config.run_dir)
    }
    parallel.barrier()
    train = [opened[f"data.train.{i}"] for i in range(len(data.train))]
    held_out = {name: opened[key] for key, name in held_out_names(data).items()}
    return train, held_out


def build_tasks(config: Config, tokenizer: Any) -> list[PreparedTask]:
    """Every ``eval.tasks`` entry read and tokenized (each rank reads the small task files itself), without
    the items the contamination check flagged when ``eval.contamination.exclude`` is on."""
    excluded = excluded_items(config)
    return [
        prepare_task(
            task, tokenizer, max_length=config.data.seq_len, excluded=excluded.get(task.name, frozenset())
        )
        for task in config.eval.tasks
    ]
