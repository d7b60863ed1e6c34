"""ZeRO-3 export joins every rank's fp32 partitions one tensor at a time: exact, and with bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keeltune.sharding.zero3.export import LAYOUT_FILE, consolidate, partition_file

MEASURE = """
import sys
from pathlib import Path
import psutil
from keeltune.sharding.zero3.export import consolidate
from keeltune.sharding.tensor_files import large_allocations_returned
Path("/proc/self/clear_refs").write_text("5")
before = psutil.Process().memory_info().rss
with large_allocations_returned():
    consolidate(Path(sys.argv[1]), Path(sys.argv[2]))
peak = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
print("GROWTH", peak - before)
"""


def _write_partitions(folder: Path, tensors: dict[str, torch.Tensor], world: int) -> None:
    """Partitions laid out as DeepSpeed does: rank r holds elements [r*p, (r+1)*p) of each flat tensor, the
    last one padded with zeros."""
    folder.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        part = -(-flat.numel() // world)
        padded = torch.cat([flat, torch.zeros(part * world - flat.numel())])
        for rank in range(world):
            shards[rank][name] = padded[rank * part : (rank + 1) * part].clone()
    for rank, shard in enumerate(shards):
        save_file(shard, str(partition_file(folder, rank)))
    layout = {"world_size": world, "params": [[name, list(t.shape)] for name, t in tensors.items()]}
    (folder / LAYOUT_FILE).write_text(json.dumps(layout))


def test_partitions_join_exactly_whatever_the_rank_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(3), "c.scale": torch.randn(())}
    for world in (1, 2, 3, 4):
        folder = tmp_path / f"ranks{world}"
        _write_partitions(folder, tensors, world)
        consolidate(folder, tmp_path / f"out{world}.safetensors")
        joined = load_file(tmp_path / f"out{world}.safetensors")
        assert joined.keys() == tensors.keys()
        assert all(torch.equal(joined[k], v) for k, v in tensors.items())


def test_export_of_a_220_mb_model_stays_within_a_few_tensors_of_memory(tmp_path: Path) -> None:
    """Peak RSS growth while exporting must stay under 0.3x the model (measured 0.18x, about three of its
    largest tensors, each 0.05x): the whole model in memory, what a full-state gather does, would be >= 1.0x."""
    torch.manual_seed(0)
    tensors = {f"layers.{i}.mlp.weight": torch.randn(2816, 1024) for i in range(19)}  # 19 x 11.5 MB
    model_bytes = sum(t.numel() * 4 for t in tensors.values())
    _write_partitions(tmp_path / "ranks", tensors, 2)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "ranks"), str(tmp_path / "model.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    growth = int(done.stdout.split("GROWTH")[1])
    assert growth < 0.3 * model_bytes, (growth, model_bytes)
    joined = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(joined[k], tensors[k]) for k in ("layers.0.mlp.weight", "layers.18.mlp.weight"))
