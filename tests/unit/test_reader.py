"""The streaming reader: O(1)-memory global shuffle, exactly-once resume on another number of ranks, mixing,
rank x worker partition, and held-out shards."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from keeltune.data_pipeline.formats import Document
from keeltune.data_pipeline.prepare import FORMAT_VERSION, ShardWriter
from keeltune.data_pipeline.reader import (
    FeistelPermutation,
    MixingSchedule,
    PackedDataset,
    TrainStream,
)

SEQ = 4


def make_prepared(folder: Path, name: str, count: int, shard_samples: int = 7) -> PackedDataset:
    """``count`` samples whose tokens all equal the sample's id, in shards of ``shard_samples``."""
    folder.mkdir(parents=True)
    writer = ShardWriter(
        folder,
        seq_len=SEQ,
        shard_samples=shard_samples,
        dtype=np.dtype(np.uint32),
        pad_id=0,
        token_bytes=np.ones(count + 1, dtype=np.uint32),  # one byte per token
    )
    for i in range(count):
        writer.add(Document([i] * SEQ, [1] * SEQ))
    writer.finish()
    index = {"format_version": FORMAT_VERSION, "name": name, "recipe": {"seq_len": SEQ}, "dtype": "uint32"}
    (folder / "index.json").write_text(json.dumps({**index, "shards": writer.shards}))
    return PackedDataset(folder)


def streams(
    sources, world: int, *, batch: int = 6, seed: int = 5, mixing=None, state=None
) -> list[TrainStream]:
    out = [
        TrainStream(sources, global_batch=batch, rank=r, world_size=world, seed=seed, mixing=mixing)
        for r in range(world)
    ]
    for stream in out:
        if state is not None:
            stream.load_state_dict(state)
    return out


def run_steps(ranks: list[TrainStream], steps: int) -> list[int]:
    """Global sample ids in stream order; checks each id against the tokens actually read."""
    seen = []
    for _ in range(steps):
        for stream in ranks:
            ids, tokens, mask = stream.next_batch()
            local = ids - stream.offsets[np.searchsorted(stream.offsets, ids, side="right") - 1]
            assert (tokens[:, 0] == local).all() and mask[:, :-1].all()
            seen.extend(ids.tolist())
    return seen


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n: int) -> None:
    order = FeistelPermutation(n, 0, "src", 0)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert (order == FeistelPermutation(n, 0, "src", 0)(np.arange(n))).all()  # deterministic
    if n >= 17:
        assert (order != np.arange(n)).mean() > 0.8  # shuffled
        assert (order != FeistelPermutation(n, 0, "src", 1)(np.arange(n))).mean() > 0.8  # another epoch


def test_permutation_memory_does_not_grow_with_the_dataset() -> None:
    peaks = []
    for n in (10**3, 10**6, 10**12):
        tracemalloc.start()
        permutation = FeistelPermutation(n, 1, "src", 3)
        values = permutation(np.arange(n - 1000, n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(set(values.tolist())) == 1000 and values.max() < n
    assert max(peaks) < 256 * 1024 and max(peaks) < 3 * min(peaks)  # a few arrays of 1000 values, whatever n


def test_killed_two_rank_run_resumed_on_two_then_three_ranks_sees_every_sample_once(tmp_path: Path) -> None:
    dataset = make_prepared(tmp_path / "a", "a", 60)
    uninterrupted = run_steps(streams([dataset], 1), 10)
    assert sorted(uninterrupted) == list(range(60)) and uninterrupted != list(range(60))
    first = streams([dataset], 2)
    seen = run_steps(first, 4)
    checkpoint = first[0].state_dict()
    run_steps(first, 1)  # trained past the checkpoint, then killed: this step is lost and redone
    second = streams([dataset], 2, state=checkpoint)
    seen += run_steps(second, 3)
    third = streams([dataset], 3, state=second[1].state_dict())
    seen += run_steps(third, 3)
    assert sorted(seen) == list(range(60))  # the epoch, each sample exactly once
    assert seen == uninterrupted  # and in the same global order as without interruptions
    assert run_steps(third, 10)[:60] != uninterrupted  # the next epoch is another permutation


def test_mixing_is_exact_and_each_source_pass_is_exactly_once(tmp_path: Path) -> None:
    task, replay = make_prepared(tmp_path / "t", "task", 40), make_prepared(tmp_path / "r", "replay", 7)
    mixed = streams([task, replay], 2, mixing=[4, 1], batch=12)
    seen = run_steps(mixed, 10)
    resumed = streams([task, replay], 3, mixing=[4, 1], batch=12, state=mixed[0].state_dict())
    seen += run_steps(resumed, 10)
    is_task = np.asarray(seen) < 40
    assert is_task.sum() == 192 and len(seen) == 240  # exactly 80% over whole periods
    running = np.cumsum(is_task) - 0.8 * np.arange(1, len(seen) + 1)
    assert np.abs(running).max() < 1.0  # and within one sample of 80% at every position
    assert resumed[0].fractions() == {"task": 0.8, "replay": 0.2}
    task_order = [s for s in seen if s < 40]
    replay_order = [s - 40 for s in seen if s >= 40]
    for order, size in ((task_order, 40), (replay_order, 7)):
        passes = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        assert len(passes) >= 4 and all(sorted(p) == list(range(size)) for p in passes)
        assert len({tuple(p) for p in passes}) == len(passes)  # every pass reshuffled


def test_mixing_schedule_counts_match_assignment_at_any_position() -> None:
    schedule = MixingSchedule([3, 5, 2])
    sources, counts = schedule.assign(np.arange(1000))
    for position in (0, 1, 7, 10, 333, 999):
        expected = [int((sources[:position] == s).sum()) for s in range(3)]
        assert schedule.consumed(position).tolist() == expected
    for source in range(3):
        assert counts[sources == source].tolist() == list(range(int((sources == source).sum())))


def test_rank_and_worker_parts_are_disjoint_and_rebuild_the_batch_order(tmp_path: Path) -> None:
    dataset = make_prepared(tmp_path / "a", "a", 50)
    reference = run_steps(streams([dataset], 1, batch=12), 3)
    ranks = streams([dataset], 3, batch=12)
    taken = []  # per rank: 3 steps x 2 micro-batches of 2, taken from 2 workers in turn (as a DataLoader does)
    for stream in ranks:
        workers = [stream.worker_batches(k, 2, micro_batch=2) for k in range(2)]
        taken.append([next(workers[i % 2])[0].tolist() for i in range(6)])
        assert not set(sum(taken[-1][0::2], [])) & set(sum(taken[-1][1::2], []))  # the workers' parts
    rebuilt = [s for step in range(3) for part in taken for s in part[2 * step] + part[2 * step + 1]]
    assert rebuilt == reference and ranks[0].consumed_samples == 0  # workers do not move the stream


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    a, b = make_prepared(tmp_path / "a", "a", 20), make_prepared(tmp_path / "b", "a", 21)
    state = streams([a], 1)[0].state_dict()
    with pytest.raises(
        ValueError, match=r"training data changed since the checkpoint \(sources: \{'a': 20\}"
    ):
        streams([b], 1, state=state)
    with pytest.raises(ValueError, match="seed changed"):
        streams([a], 1, seed=6, state=state)
    streams([a], 1, state={"consumed_samples": 12, "seed": 5})  # a checkpoint of the first data format
