"""Stream prepared shards: memory-mapped, globally shuffled in O(1) memory, mixed, partitioned, resumable in O(1).

The training order is one global stream of positions. A mixing schedule gives each position a source and that
source's running count ``c``; the sample is ``perm(c mod N)`` of the source's pass ``c // N``, where ``perm`` is a
Feistel-network bijection of ``[0, N)`` keyed by (seed, source, pass). So within each pass of each source every
sample comes exactly once, nothing is stored per sample, and position ``p``'s sample is computed directly.

Optimizer step ``s`` consumes positions ``[s*G, (s+1)*G)`` for global batch ``G``; rank ``r`` of ``W`` takes the
``r``-th contiguous ``G/W``, and DataLoader worker ``k`` of ``K`` every ``K``-th micro-batch of that. The state
is one integer (samples consumed), so a resume is O(1) and may use another number of ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from keeltune.atomic import write_json_atomically
from keeltune.data_pipeline.prepare import check_index, file_digest, read_index
from keeltune.data_pipeline.sources import DataError

FEISTEL_ROUNDS = 4
POSITION_BLOCK = 4096  # positions whose samples are computed in one vectorised call


class PackedDataset:
    """One prepared folder; sample ``i`` is (ids, loss_mask), read lazily through memory maps of its shards,
    and its target bytes (``target_bytes``, for evaluation in bits per byte: training never reads them)."""

    def __init__(
        self, folder: Path, *, fingerprint: str | None = None, verify_checksums: str = "never"
    ) -> None:
        """Open ``folder`` after cheap checks (version, tokenizer, shard sizes); ``verify_checksums`` "always"
        hashes every shard, "once" only those not verified before or changed since (by size and mtime)."""
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise DataError(f"{self.folder}: not prepared (no index.json); run keeltune prepare CONFIG")
        check_index(self.folder, index, fingerprint)
        self.index = index
        self.name: str = index["name"]
        self.width = index["recipe"]["seq_len"] + 1
        self.dtype = np.dtype(index["dtype"])
        verified = _read_verified(self.folder) if verify_checksums == "once" else {}
        for shard in index["shards"]:
            path = self.folder / shard["file"]
            stat = path.stat() if path.is_file() else None
            if stat is None or stat.st_size != shard["bytes"]:
                state = (
                    "missing"
                    if stat is None
                    else f"{stat.st_size} bytes instead of {shard['bytes']} (truncated?)"
                )
                raise DataError(f"{path}: shard {state}; run keeltune prepare again")
            if verify_checksums != "never" and verified.get(shard["file"]) != [
                stat.st_size,
                stat.st_mtime_ns,
            ]:
                if file_digest(path) != shard["sha256"]:
                    raise DataError(
                        f"{path}: checksum mismatch (the shard is corrupted); run keeltune prepare again"
                    )
                verified[shard["file"]] = [stat.st_size, stat.st_mtime_ns]
        if verify_checksums != "never":
            _write_verified(self.folder, verified)
        self.offsets = np.cumsum([0] + [s["samples"] for s in index["shards"]])
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_target_bytes(self) -> int:
        """UTF-8 bytes of text behind all the set's target tokens."""
        return int(self.index["num_target_bytes"])

    def _shard(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, loss mask, target bytes) of a shard, memory-mapped: nothing is read until indexed."""
        if number not in self._maps:
            shard = self.index["shards"][number]
            data = np.memmap(self.folder / shard["file"], dtype=np.uint8, mode="r").view(np.ndarray)
            rows = shard["samples"]
            split = rows * self.width * self.dtype.itemsize
            tokens = data[:split].view(self.dtype).reshape(rows, self.width)
            mask = data[split : split + rows * self.width].reshape(rows, self.width)
            target_bytes = data[split + rows * self.width :].view(np.uint32)
            self._maps[number] = (tokens, mask, target_bytes)
        return self._maps[number]

    def get(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack the given samples: (ids int64 [n, seq_len+1], mask uint8 [n, seq_len+1])."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        shards = np.searchsorted(self.offsets, sample_ids, side="right") - 1
        ids = np.empty((len(sample_ids), self.width), dtype=np.int64)
        mask = np.empty((len(sample_ids), self.width), dtype=np.uint8)
        # row by row: as fast as one gather per shard when a batch touches few shards, and several times
        # faster when (as with many shards) every sample comes from another one
        locals_ = (sample_ids - self.offsets[shards]).tolist()
        for row, (number, local) in enumerate(zip(shards.tolist(), locals_, strict=True)):
            tokens, losses, _ = self._shard(number)
            ids[row], mask[row] = tokens[local], losses[local]
        return ids, mask

    def target_bytes(self, sample_ids: np.ndarray) -> np.ndarray:
        """The target bytes of the given samples (int64 ``[n]``): the UTF-8 bytes of text their target tokens
        stand for."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        shards = np.searchsorted(self.offsets, sample_ids, side="right") - 1
        out = np.empty(len(sample_ids), dtype=np.int64)
        for number in np.unique(shards).tolist():
            rows = np.flatnonzero(shards == number)
            out[rows] = self._shard(number)[2][sample_ids[rows] - self.offsets[number]]
        return out


VERIFIED_FILE = (
    ".verified.json"  # shards whose sha256 matched, by (size, mtime): a resume does not hash again
)


def _read_verified(folder: Path) -> dict[str, list[int]]:
    try:
        return json.loads((folder / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_verified(folder: Path, verified: dict[str, list[int]]) -> None:
    with contextlib.suppress(OSError):  # a read-only shared folder: verify again next time
        write_json_atomically(folder / VERIFIED_FILE, verified)


class FeistelPermutation:
    """A pseudo-random bijection of ``[0, n)`` in O(1) memory: a Feistel network over ``[0, 2^bits)``, the
    smallest power of two ``>= n`` (unbalanced halves when ``bits`` is odd), with cycle walking: values that
    land outside ``[0, n)`` are encrypted again, which stays a bijection and takes under 2 rounds on average.

    Chosen over a block shuffle because every sample can land anywhere (a truly global shuffle) while nothing
    grows with ``n``. Round function: multiply-shift hashing with per-round odd multipliers from the key.
    """

    def __init__(self, n: int, *key: int | str) -> None:
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        self.n = n
        bits = max(1, (n - 1).bit_length())
        self.widths = (bits - bits // 2, bits // 2)  # (high, low) bits; they swap after every round
        digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=16 * FEISTEL_ROUNDS).digest()
        words = [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(2 * FEISTEL_ROUNDS)]
        self.rounds = [
            (np.uint64(words[2 * i]), np.uint64(words[2 * i + 1] | 1)) for i in range(FEISTEL_ROUNDS)
        ]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        high, low = self.widths
        for salt, multiplier in self.rounds:
            upper, lower = x >> np.uint64(low), x & np.uint64((1 << low) - 1)
            mixed = ((lower ^ salt) * multiplier) >> np.uint64(64 - high) if high else np.uint64(0)
            x = (lower << np.uint64(high)) | (upper ^ mixed)  # mixed: the product's top `high` bits
            high, low = low, high
        return x

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        values = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = values >= self.n
        while outside.any():
            values = np.where(outside, self._encrypt(values), values)
            outside = values >= self.n
        return values.astype(np.int64)


class MixingSchedule:
    """Assigns stream positions to sources: integer shares per period, interleaved by smooth weighted
    round-robin. Exact: after every period each source has exactly its share; in between, within one sample.
    """

    def __init__(self, counts: list[int]) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.period = int(self.counts.sum())
        table = np.empty(self.period, dtype=np.int64)
        current = np.zeros(len(counts), dtype=np.int64)
        for position in range(self.period):
            current += self.counts
            table[position] = int(np.argmax(current))
            current[table[position]] -= self.period
        self.table = table
        self.before = np.zeros((self.period + 1, len(counts)), dtype=np.int64)  # counts before each offset
        np.add.at(self.before[1:], (np.arange(self.period), table), 1)
        self.before = np.cumsum(self.before, axis=0)

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, how many earlier positions that source had) for each position."""
        cycles, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        sources = self.table[offsets]
        return sources, cycles * self.counts[sources] + self.before[offsets, sources]

    def consumed(self, position: int) -> np.ndarray:
        """Samples each source contributed to positions ``[0, position)``."""
        cycles, offset = divmod(position, self.period)
        return cycles * self.counts + self.before[offset]


class TrainStream:
    """This rank's samples, step by step, in the global deterministic order over the mixed sources."""

    def __init__(
        self,
        sources: list[PackedDataset],
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        mixing: list[int] | None = None,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.sources = sources
        self.schedule = MixingSchedule(mixing or [1] * len(sources))
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.sizes = [len(s) for s in sources]
        self.offsets = np.cumsum([0] + self.sizes)  # global sample id = offset of its source + local id
        self.consumed_samples = 0
        self._permutations: dict[tuple[int, int], FeistelPermutation] = {}
        self._block = (0, np.empty(0, dtype=np.int64))  # sample ids of a block of positions, computed at once

    def _permutation(self, source: int, epoch: int) -> FeistelPermutation:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[key] = FeistelPermutation(
                self.sizes[source], self.seed, self.sources[source].name, epoch
            )
        return self._permutations[key]

    def positions(self, start: int, count: int) -> np.ndarray:
        """Global sample ids at stream positions ``[start, start + count)``."""
        first, block = self._block
        if not (first <= start and start + count <= first + len(block)):
            self._block = first, block = start, self._compute(start, max(count, POSITION_BLOCK))
        return block[start - first : start - first + count].copy()

    def _compute(self, start: int, count: int) -> np.ndarray:
        sources, counts = self.schedule.assign(np.arange(start, start + count))
        out = np.empty(count, dtype=np.int64)
        for source in np.unique(sources):
            rows = np.flatnonzero(sources == source)
            epochs, within = np.divmod(counts[rows], self.sizes[source])
            for epoch in np.unique(epochs):
                pick = rows[epochs == epoch]
                out[pick] = self.offsets[source] + self._permutation(int(source), int(epoch))(
                    within[epochs == epoch]
                )
        return out

    def read(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss masks of global sample ids, in order."""
        if len(self.sources) == 1:
            return self.sources[0].get(sample_ids)
        sources = np.searchsorted(self.offsets, sample_ids, side="right") - 1
        ids = np.empty((len(sample_ids), self.sources[0].width), dtype=np.int64)
        mask = np.empty_like(ids, dtype=np.uint8)
        for source in np.unique(sources):
            rows = np.flatnonzero(sources == source)
            ids[rows], mask[rows] = self.sources[source].get(sample_ids[rows] - self.offsets[source])
        return ids, mask

    def rank_share(self, consumed: int) -> np.ndarray:
        """Sample ids of this rank's share of the global batch that starts at stream position ``consumed``."""
        share = self.global_batch // self.world_size
        return self.positions(consumed + self.rank * share, share)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's share of the next global batch: (global sample ids, token ids, loss mask)."""
        sample_ids = self.rank_share(self.consumed_samples)
        self.consumed_samples += self.global_batch
        return (sample_ids, *self.read(sample_ids))

    def worker_batches(
        self, worker: int, num_workers: int, micro_batch: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Micro-batches for DataLoader worker ``worker`` of ``num_workers``, from the current position on: each
        takes every ``num_workers``-th micro-batch of this rank's share, so the workers' outputs, taken in turn
        (as a DataLoader does), are exactly ``next_batch``'s order. Does not advance this stream's state."""
        consumed, index = self.consumed_samples, 0
        while True:
            share = self.rank_share(consumed)
            for start in range(0, len(share), micro_batch):
                if index % num_workers == worker:
                    sample_ids = share[start : start + micro_batch]
                    yield (sample_ids, *self.read(sample_ids))
                index += 1
            consumed += self.global_batch

    @property
    def epoch(self) -> float:
        """Passes over the data so far, weighted by the sources' shares of the stream."""
        done = self.schedule.consumed(self.consumed_samples)
        return float(sum(d / n for d, n in zip(done, self.sizes, strict=True)) / len(self.sizes))

    def fractions(self) -> dict[str, float]:
        """The realised share of each source in the samples consumed so far."""
        done = self.schedule.consumed(self.consumed_samples)
        total = max(int(done.sum()), 1)
        return {source.name: int(d) / total for source, d in zip(self.sources, done, strict=True)}

    def state_dict(self) -> dict[str, object]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "sources": {s.name: n for s, n in zip(self.sources, self.sizes, strict=True)},
            "mixing": self.schedule.counts.tolist(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"data order seed changed ({state['seed']} -> {self.seed}); cannot resume exactly"
            )
        for key in ("sources", "mixing"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"the training data changed since the checkpoint ({key}: {state[key]} -> "
                    f"{self.state_dict()[key]}); resuming would not continue at the next sample. Restore the "
                    "data or start a new run"
                )
        self.consumed_samples = int(state["consumed_samples"])
