"""Self-replay: text drawn from the base model before fine-tuning, mixed into training like general data.

Rehearsal without general data: the model's own samples stand in for what it knew. Every rank draws its share
through the backend (ZeRO-3 generates with its partitioned model), seeded by the run's seed and the rank;
rank 0 writes them to ``<run>/base_samples/<name>.jsonl`` atomically, and a resumed run reuses that file.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from keeltune.atomic import atomic_path
from keeltune.config import Config, SourceConfig
from keeltune.data_pipeline.sources import DataError
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import Backend
from keeltune.sharding.model import sample_sequences

log = logging.getLogger("keeltune")


def draw_base_samples(config: Config, backend: Backend, tokenizer: Any, parallel: ParallelEnv) -> None:
    """Draw every ``generate`` train source whose samples file does not exist yet (call before the first
    optimizer step, on every rank)."""
    prepared = {key: folder for key, _, folder in config.data.prepared_sets(config.run_dir)}
    for i, source in enumerate(config.data.train):
        if source.generate is None:
            continue
        file = config.data.generated_file(config.run_dir, source)
        if parallel.broadcast_object(file.is_file()):
            continue
        texts = _draw(source, config, backend, tokenizer, parallel)
        drawn = [t for part in parallel.gather_object(texts) for t in part][: source.generate.samples]
        if not parallel.broadcast_object(bool(drawn)):
            raise DataError(
                f"data.train.{i} ({source.name}): every sample drawn from the base model decoded to empty text "
                "(special tokens only); check model.path's bos/eos/pad tokens or raise generate.temperature"
            )
        if parallel.is_main:
            _write(file, drawn)
            # shards prepared from earlier samples (a run restarted without its samples file) are stale
            shutil.rmtree(prepared[f"data.train.{i}"], ignore_errors=True)
        parallel.barrier()


def sample_seed(seed: int, rank: int) -> int:
    """The random seed a rank draws its samples with."""
    return seed * 1_000_003 + rank


def decode_samples(tokenizer: Any, drawn: torch.Tensor) -> list[str]:
    """Rows of (prompt token, continuation) as text, without special tokens; empty ones dropped."""
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in drawn[:, 1:].tolist()]
    return [text for text in texts if text.strip()]


def _draw(
    source: SourceConfig, config: Config, backend: Backend, tokenizer: Any, parallel: ParallelEnv
) -> list[str]:
    """This rank's samples, decoded; empty ones (special tokens only) are dropped."""
    options = source.generate
    assert options is not None
    # the same count on every rank: ZeRO-3 ranks generate in lockstep
    per_rank = math.ceil(options.samples / parallel.world_size)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new_tokens = options.max_new_tokens or config.data.seq_len - 1
    if parallel.is_main:
        log.info(
            "%s: drawing %d samples of up to %d tokens from the base model (temperature %g) on %d rank(s)",
            source.name, per_rank * parallel.world_size, new_tokens, options.temperature, parallel.world_size,
        )  # fmt: skip
    started = last_report = time.perf_counter()
    texts: list[str] = []
    devices = [parallel.device.index or 0] if parallel.device.type == "cuda" else []
    backend.train(False)
    with torch.random.fork_rng(devices=devices):  # training's random state is left as it was
        torch.manual_seed(sample_seed(config.training.seed, parallel.rank))
        for done in range(0, per_rank, options.batch_size):
            rows = min(options.batch_size, per_rank - done)
            prompt = torch.full((rows, 1), start_id, dtype=torch.long, device=parallel.device)
            drawn = sample_sequences(
                backend.generate,
                prompt,
                max_new_tokens=new_tokens,
                temperature=options.temperature,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )
            texts += decode_samples(tokenizer, drawn)
            if parallel.is_main and time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                log.info("%s: %d of %d samples drawn on this rank", source.name, done + rows, per_rank)
    backend.train(True)
    if parallel.is_main:
        log.info("%s: %d samples drawn in %.1f s", source.name, len(texts), time.perf_counter() - started)
    return texts


def _write(file: Path, texts: list[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    log.info("wrote %d base-model samples to %s", len(texts), file)
