"""This rank's batches, read ahead by DataLoader worker processes (or in the training process with 0 workers).

Worker ``k`` of ``K`` produces every ``K``-th micro-batch of the rank's share (``TrainStream.worker_batches``);
the DataLoader takes the workers' outputs in turn, so the order is exactly the in-process order, and the
position that checkpoints record stays the main process's count of samples consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from keeltune.data_pipeline.reader import TrainStream


class _WorkerBatches(IterableDataset):
    def __init__(self, stream: TrainStream, micro_batch: int) -> None:
        self.stream = stream
        self.micro_batch = micro_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, ids, mask in self.stream.worker_batches(worker, workers, self.micro_batch):
            yield torch.from_numpy(ids), torch.from_numpy(mask)


class StepLoader:
    """Gives this rank's share of the next global batch as (token ids, loss mask) tensors."""

    def __init__(self, stream: TrainStream, *, micro_batch: int, workers: int) -> None:
        self.stream = stream
        self.micro_batch = micro_batch
        self.workers = workers
        self.micro_per_step = stream.global_batch // stream.world_size // micro_batch
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def next_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.workers == 0:
            _, ids, mask = self.stream.next_batch()
            return torch.from_numpy(ids), torch.from_numpy(mask)
        if self._batches is None:  # started lazily, from the position a resume may have set
            loader = DataLoader(
                _WorkerBatches(self.stream, self.micro_batch), batch_size=None, num_workers=self.workers
            )
            self._batches = iter(loader)
        parts = [next(self._batches) for _ in range(self.micro_per_step)]
        self.stream.consumed_samples += self.stream.global_batch
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def close(self) -> None:
        """Stop the worker processes."""
        self._batches = None
