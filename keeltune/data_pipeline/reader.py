"""Read prepared samples: memory-mapped, deterministically shuffled, partitioned by rank, resumable in O(1).

The training order is one global stream of sample ids (epoch by epoch, each epoch a permutation seeded by
``(seed, epoch)``). Optimizer step ``s`` consumes stream positions ``[s*G, (s+1)*G)`` for global batch ``G``;
rank ``r`` of ``W`` takes the ``r``-th contiguous ``G/W`` of them. So the whole state is one integer
(samples consumed), and a run resumed on another number of ranks continues with the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from keeltune.data_pipeline.prepare import FORMAT_VERSION, INDEX_FILE, DataError


class PackedDataset:
    """One or more prepared folders, read through memory maps; sample ``i`` is (ids, loss_mask)."""

    def __init__(self, folders: list[Path]) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.indexes: list[dict[str, Any]] = []
        for folder in folders:
            index = json.loads((folder / INDEX_FILE).read_text())
            if index.get("format_version") != FORMAT_VERSION:
                raise DataError(
                    f"{folder}: prepared with format version {index.get('format_version')}, this keeltune "
                    f"reads {FORMAT_VERSION}; delete the folder to prepare it again"
                )
            ids = np.load(folder / "tokens.npy", mmap_mode="r")
            mask = np.load(folder / "loss_mask.npy", mmap_mode="r")
            if ids.shape != mask.shape or ids.shape[0] != index["num_samples"]:
                raise DataError(f"{folder}: token and mask arrays do not match the index; prepare it again")
            self.parts.append((ids, mask))
            self.indexes.append(index)
        self.offsets = np.cumsum([0] + [p[0].shape[0] for p in self.parts])
        widths = {p[0].shape[1] for p in self.parts}
        if len(widths) != 1:
            raise DataError(f"prepared folders {folders} have different sequence lengths {sorted(widths)}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack the given samples: (ids int64 [n, seq_len+1], mask uint8 [n, seq_len+1])."""
        ids, masks = [], []
        for sample in sample_ids:
            part = int(np.searchsorted(self.offsets, sample, side="right") - 1)
            local = int(sample - self.offsets[part])
            ids.append(self.parts[part][0][local])
            masks.append(self.parts[part][1][local])
        return np.stack(ids).astype(np.int64), np.stack(masks)


class TrainStream:
    """This rank's samples, step by step, in the global deterministic order."""

    def __init__(
        self, dataset: PackedDataset, *, global_batch: int, rank: int, world_size: int, seed: int
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.dataset = dataset
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = 0
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._epoch = epoch
        return self._order

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sample ids at stream positions [start, start + count)."""
        n = len(self.dataset)
        out = np.empty(count, dtype=np.int64)
        for i, position in enumerate(range(start, start + count)):
            out[i] = self._permutation(position // n)[position % n]
        return out

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's share of the next global batch: (sample ids, token ids, loss mask)."""
        share = self.global_batch // self.world_size
        sample_ids = self.positions(self.consumed_samples + self.rank * share, share)
        self.consumed_samples += self.global_batch
        ids, mask = self.dataset.get(sample_ids)
        return sample_ids, ids, mask

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"data order seed changed ({state['seed']} -> {self.seed}); cannot resume exactly"
            )
        self.consumed_samples = int(state["consumed_samples"])


def eval_shard(dataset: PackedDataset, rank: int, world_size: int, max_samples: int | None) -> np.ndarray:
    """The sample ids this rank evaluates (strided, so every sample is counted once over all ranks)."""
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    return np.arange(rank, total, world_size, dtype=np.int64)
