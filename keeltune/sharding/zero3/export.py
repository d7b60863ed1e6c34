"""A ZeRO-3 checkpoint's layout (every rank's fp32 partition as safetensors, plus the layout) and its export to a
Hugging Face folder without a process group, one tensor at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from keeltune.config import Config
from keeltune.sharding.model import causal_lm_config
from keeltune.sharding.tensor_files import TensorFile, large_allocations_returned, write_tensor_file

LAYOUT_FILE = "zero_layout.json"
BUFFERS_FILE = "zero_buffers.safetensors"


def partition_file(folder: Path, rank: int) -> Path:
    return folder / f"zero_fp32_rank{rank:04d}.safetensors"


def consolidate(partitions: Path, out_file: Path) -> None:
    """Join every rank's fp32 partitions into one safetensors file, one tensor at a time."""
    layout_file = partitions / LAYOUT_FILE
    if not layout_file.is_file():
        raise FileNotFoundError(f"{partitions}: no {LAYOUT_FILE}; is this a checkpoint of a zero3 run?")
    layout = json.loads(layout_file.read_text())
    world = layout["world_size"]
    ranks = []
    for rank in range(world):
        path = partition_file(partitions, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the checkpoint was written by {world} ranks)")
        ranks.append(TensorFile(path))
    buffers = TensorFile(partitions / BUFFERS_FILE) if (partitions / BUFFERS_FILE).is_file() else None
    shapes = {name: shape for name, shape in layout["params"]}
    entries = [(name, torch.float32, shape) for name, shape in layout["params"]]
    if buffers is not None:
        entries += [(name, buffers.dtype(name), buffers.shape(name)) for name in buffers.names()]

    def produce(name: str) -> torch.Tensor:
        if name not in shapes:
            return buffers.tensor(name)
        numel, part = math.prod(shapes[name]), ranks[0].shape(name)[0]
        pieces = [
            files.read(name, 0, min(part, numel - rank * part))
            for rank, files in enumerate(ranks)
            if rank * part < numel
        ]
        return torch.cat(pieces).reshape(shapes[name])

    write_tensor_file(out_file, entries, produce)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """A ZeRO-3 checkpoint as a Hugging Face folder (fp32 weights, streamed; the model config beside them)."""
    out.mkdir(parents=True, exist_ok=True)
    with large_allocations_returned():
        consolidate(checkpoint, out / "model.safetensors")
    causal_lm_config(config.model.path, dropout=config.regularization.dropout).save_pretrained(out)
    return [out]
