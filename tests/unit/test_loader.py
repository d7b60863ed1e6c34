"""DataLoader worker processes give the training loop exactly the batches the in-process reader gives."""

from __future__ import annotations

from pathlib import Path

import torch

from keeltune.data_pipeline.reader import TrainStream
from keeltune.training.loader import StepLoader
from tests.unit.test_reader import SEQ, make_prepared


def _steps(tmp_path: Path, workers: int, start: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sources = [
        make_prepared(tmp_path / f"w{workers}-a", "a", 40),
        make_prepared(tmp_path / f"w{workers}-b", "b", 23),
    ]
    stream = TrainStream(sources, global_batch=12, rank=1, world_size=2, seed=5, mixing=[3, 1])
    stream.load_state_dict({"consumed_samples": start, "seed": 5})
    loader = StepLoader(stream, micro_batch=2, workers=workers)
    try:
        steps = [loader.next_step() for _ in range(count)]
    finally:
        loader.close()
    assert stream.consumed_samples == start + 12 * count  # the checkpointed position is the main process's
    return steps


def test_two_workers_read_ahead_the_same_batches_in_the_same_order(tmp_path: Path) -> None:
    in_process = _steps(tmp_path, 0, start=36, count=6)
    with_workers = _steps(tmp_path, 2, start=36, count=6)
    assert len(in_process) == len(with_workers) == 6
    for (ids, mask), (ids_w, mask_w) in zip(in_process, with_workers, strict=True):
        # this rank's half of the global batch of 12; a sample: seq_len + 1 tokens (inputs, targets shifted)
        assert ids.shape == mask.shape == (12 // 2, SEQ + 1), (ids.shape, mask.shape)
        assert torch.equal(ids, ids_w) and torch.equal(mask, mask_w)
    assert not torch.equal(in_process[0][0], in_process[1][0])
