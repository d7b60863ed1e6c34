"""Data pipeline benchmarks, each printed as a ratio against a named baseline measured in the same command.

1. reader throughput: tokens/s a consumer loop gets from keeltune's reader (shuffled, rank 0 of 1) vs
   ``datasets`` streaming (JSON lines and Parquet) of the same pre-tokenized ids, same batch size;
2. resume latency: building the stream and reading the first batch at sample 1,000,000 vs at sample 0;
3. memory: the reader's anonymous (non-file-backed) memory after reading through 100 MB vs 2 GB of shards
   (sparse synthetic shard files, one fresh process each);
4. prepare throughput: tokens/s of ``prepare_source`` (all cores) vs one ``tokenizers`` ``encode_batch`` call.

    python bench/data_pipeline.py [--samples 20000] [--seq 512 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keeltune.config import SourceConfig
from keeltune.data_pipeline.prepare import FORMAT_VERSION, INDEX_FILE, prepare_source, shard_name
from keeltune.data_pipeline.reader import PackedDataset, TrainStream

SEQ = 512
BATCH = 32


def write_synthetic(
    folder: Path, samples: int, seq_len: int, shard_samples: int, sparse: bool = False
) -> Path:
    """A prepared folder of random (or, sparse, all-zero) tokens, written directly in the shard format."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for number, start in enumerate(range(0, samples, shard_samples)):
        rows = min(shard_samples, samples - start)
        path = folder / shard_name(number)
        size = rows * (seq_len + 1) * 3 + rows * 4  # uint16 tokens + uint8 mask + uint32 target bytes
        if sparse:
            with open(path, "wb") as handle:
                handle.truncate(size)
        else:
            tokens = rng.integers(0, 32000, (rows, seq_len + 1), dtype=np.uint16)
            mask = np.ones((rows, seq_len + 1), np.uint8)
            target_bytes = np.full(rows, 4 * seq_len, np.uint32)  # about 4 bytes a token
            path.write_bytes(tokens.tobytes() + mask.tobytes() + target_bytes.tobytes())
        shards.append({"file": path.name, "samples": rows, "bytes": size, "sha256": ""})
    index = {
        "format_version": FORMAT_VERSION,
        "name": folder.name,
        "recipe": {"seq_len": seq_len},
        "dtype": "uint16",
        "shards": shards,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def bench_reader(work: Path, samples: int, seq_len: int) -> None:
    work = work / f"reader-{seq_len}"
    folder = write_synthetic(work, samples, seq_len, 256)  # 79 shards: nearly every sample from another one
    dataset = PackedDataset(folder)
    tokens = dataset.get(np.arange(samples))[0]
    rows = [{"input_ids": row.tolist()} for row in tokens[: samples // 4]]
    (work / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    pq.write_table(pa.Table.from_pylist(rows), work / "ids.parquet")

    def keeltune_reader() -> tuple[int, float]:
        stream = TrainStream([dataset], global_batch=BATCH, rank=0, world_size=1, seed=0)
        started = time.perf_counter()
        done = 0
        for _ in range(samples // BATCH):
            _, ids, _ = stream.next_batch()
            done += ids.size
        return done, time.perf_counter() - started

    def hf_streaming(kind: str, path: Path) -> tuple[int, float]:
        started = time.perf_counter()
        stream = load_dataset(kind, data_files=[str(path)], split="train", streaming=True)
        done, batch = 0, []
        for record in stream:
            batch.append(record["input_ids"])
            if len(batch) == BATCH:
                done += np.asarray(batch, dtype=np.int64).size
                batch = []
        return done, time.perf_counter() - started

    ours = _best(keeltune_reader)
    print(f"reader: keeltune {ours:,.0f} tokens/s ({samples} samples of {seq_len + 1} tokens, shuffled)")
    for kind, path in (("json", work / "ids.jsonl"), ("parquet", work / "ids.parquet")):
        theirs = _best(lambda kind=kind, path=path: hf_streaming(kind, path))
        print(f"  datasets streaming {kind}: {theirs:,.0f} tokens/s -> ratio {ours / theirs:.1f}x")


def _best(run, repeats: int = 3) -> float:
    return max(done / seconds for done, seconds in (run() for _ in range(repeats)))


def bench_resume(work: Path) -> None:
    folder = write_synthetic(work / "resume", 2_000_000, 8, 262_144)

    def resume_at(position: int) -> float:
        started = time.perf_counter()
        stream = TrainStream([PackedDataset(folder)], global_batch=BATCH, rank=0, world_size=1, seed=0)
        stream.load_state_dict({"consumed_samples": position, "seed": 0})
        stream.next_batch()
        return time.perf_counter() - started

    times = {p: statistics.median(resume_at(p) for _ in range(7)) for p in (0, 1_000_000, 1_999_968)}
    print(
        f"resume: at sample 0 {times[0] * 1e3:.2f} ms, at 1,000,000 {times[1_000_000] * 1e3:.2f} ms "
        f"(ratio {times[1_000_000] / times[0]:.2f}x), at 1,999,968 {times[1_999_968] * 1e3:.2f} ms"
    )


MEMORY_PROBE = """
import sys, numpy as np
from pathlib import Path
from keeltune.data_pipeline.reader import PackedDataset, TrainStream
def anon_kb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1])
dataset = PackedDataset(Path(sys.argv[1]))
stream = TrainStream([dataset], global_batch=32, rank=0, world_size=1, seed=0)
stream.next_batch()
before = anon_kb()
for _ in range(3000):
    stream.next_batch()
print(before, anon_kb())
"""


def bench_memory(work: Path) -> None:
    results = {}
    for label, size in (("100 MB", 100 * 2**20), ("2 GB", 2 * 2**30)):
        samples = size // ((SEQ + 1) * 3)
        folder = write_synthetic(work / f"memory-{label.replace(' ', '')}", samples, SEQ, 8192, sparse=True)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(folder)], capture_output=True, text=True, check=True
        )
        before, after = map(int, out.stdout.split())
        results[label] = after
        print(f"memory: {label} of shards ({samples:,} samples): anonymous RSS {after / 1024:.1f} MiB "
              f"(+{(after - before) / 1024:.2f} MiB over 3000 batches of {BATCH})")  # fmt: skip
    print(f"  ratio 2 GB / 100 MB: {results['2 GB'] / results['100 MB']:.3f}x")


def bench_prepare(work: Path) -> None:
    from pydoc_data.topics import topics

    from keeltune.demo.tokenizer import train_tokenizer

    texts = [topics[name] for name in sorted(topics)] * 4
    tokenizer = train_tokenizer(texts[:200], 4096, work / "tokenizer")
    source = work / "text.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = SourceConfig(name="text", path=str(source))
    started = time.perf_counter()
    index = prepare_source(config, work / "prepared", tokenizer=tokenizer, seq_len=SEQ)
    ours = index["num_tokens"] / (time.perf_counter() - started)
    started = time.perf_counter()  # after prepare: its workers fork before the tokenizer's threads start
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    baseline = sum(len(e.ids) for e in encoded) / (time.perf_counter() - started)
    print(f"prepare: keeltune {ours:,.0f} tokens/s ({index['num_tokens']:,} tokens, read + tokenize + pack + "
          f"write + sha256, {os.cpu_count()} workers)")  # fmt: skip
    print(f"  tokenizers encode_batch, one process: {baseline:,.0f} tokens/s -> ratio {ours / baseline:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="reader benchmark samples")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="reader sequence lengths")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seq_len in args.seq:
            bench_reader(work, args.samples, seq_len)
        bench_resume(work)
        bench_memory(work)
        bench_prepare(work)


if __name__ == "__main__":
    main()
