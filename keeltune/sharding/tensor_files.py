"""Safetensors files read and written one tensor (or one slice) at a time, without mmap.

``safetensors`` itself maps the whole file, and every page it touches stays in the process's resident memory;
here a loader or an export reads exactly the bytes it needs with ``pread`` and writes tensors as they come,
so host memory stays at about one tensor whatever the model's size.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from keeltune.atomic import atomic_path

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class TensorFile:
    """Random access to the tensors of one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", prefix)
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{self.path}: not a safetensors file (bad header: {err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + length

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> list[int]:
        return list(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``start .. start+count`` of the flattened tensor ``name`` (all of it by default)."""
        entry = self._entries[name]
        dtype = _DTYPES[entry["dtype"]]
        numel = math.prod(entry["shape"])
        count = numel - start if count is None else count
        if start < 0 or count < 0 or start + count > numel:
            raise ValueError(f"{self.path}: slice {start}+{count} outside {name} ({numel} elements)")
        itemsize = torch.empty((), dtype=dtype).element_size()
        begin = self._data_start + entry["data_offsets"][0] + start * itemsize
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            data = bytearray(count * itemsize)
            view, done = memoryview(data), 0
            while done < len(data):
                chunk = os.preadv(descriptor, [view[done:]], begin + done)
                if chunk == 0:
                    raise ValueError(f"{self.path}: truncated in tensor {name}")
                done += chunk
        finally:
            os.close(descriptor)
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)

    def tensor(self, name: str) -> torch.Tensor:
        return self.read(name).reshape(self.shape(name))


def write_tensor_file(
    path: Path,
    layout: Iterable[tuple[str, torch.dtype, list[int]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors (name, dtype, shape) are made one by one by ``produce(name)``.

    The header is written first from ``layout``; the file appears at ``path`` only once complete."""
    layout = list(layout)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, dtype, shape in layout:
            tensor = produce(name)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(
                    f"{name}: made {tensor.dtype} {list(tensor.shape)}, declared {dtype} {shape}"
                )
            handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def model_tensor_files(folder: Path) -> dict[str, TensorFile]:
    """Tensor name -> the file holding it, for a Hugging Face folder (one file or an index of shards)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: TensorFile(folder / name) for name in sorted(set(weight_map.values()))}
        return {tensor: files[name] for tensor, name in weight_map.items()}
    if single.is_file():
        handle = TensorFile(single)
        return {name: handle for name in handle.names()}
    raise FileNotFoundError(f"{folder}: no model.safetensors (keeltune loads safetensors weights only)")


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@contextlib.contextmanager
def large_allocations_returned() -> Iterator[None]:
    """While streaming weights, let glibc give every block over 1 MiB straight back to the system.

    Its default threshold adapts upwards as big blocks are freed, after which freed tensors stay in the heap
    and a rank's peak memory grows with every module loaded (measured: +300 MB instead of +23 MB for a
    222 MB model on 2 ranks). Afterwards the threshold is left at glibc's own upper bound (32 MiB)."""
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)
