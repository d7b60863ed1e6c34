"""Deduplication's plan (``data_pipeline/dedup.py``): time and memory at two data sizes, the whole LSH index
in memory (the baseline) against banded passes of ``--block`` documents, which must find the same duplicates.

Synthetic documents of 60 to 120 words from a 20,000-word vocabulary; 5% are exact copies of an earlier
document (other case and spacing), 10% copies of an earlier document with 1 to 3 words replaced (word 5-gram
similarity about 0.6 to 0.92: those above the threshold, 0.8, are near copies).
Each plan runs in a fresh process; its memory is the peak of its anonymous resident memory (``RssAnon``,
sampled every 2 ms) above what the process held before the plan (the signatures wait in a memory-mapped
file, whose pages the kernel may drop at any time: ``VmHWM``, which counts them, is printed too).

    python bench/dedup.py [--sizes 20000 80000] [--block 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def write_documents(path: Path, count: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(20_000)]
    texts: list[str] = []
    made = {"exact": 0, "near": 0}
    for _ in range(count):
        roll = rng.random()
        if texts and roll < 0.05:
            texts.append("  " + rng.choice(texts).upper().replace(" ", "\n "))
            made["exact"] += 1
        elif texts and roll < 0.15:
            words = rng.choice(texts).split()
            for position in rng.sample(range(len(words)), rng.randint(1, 3)):
                words[position] = rng.choice(vocabulary)
            texts.append(" ".join(words))
            made["near"] += 1
        else:
            texts.append(" ".join(rng.choices(vocabulary, k=rng.randint(60, 120))))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return made


def _status(field: str) -> int:
    """A field of /proc/self/status in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(data: Path, root: Path, block: int) -> None:
    """One plan in this process; prints seconds, memory and the plan's digest as JSON."""
    import datasketch  # noqa: F401  (imported before the baseline: a fixed cost, not the plan's)

    from keeltune.config import DataConfig, DedupConfig, SourceConfig
    from keeltune.data_pipeline.dedup import REMOVED_FILE, compute_plan

    config = DataConfig(
        train=[SourceConfig(name="docs", path=str(data))], dedup=DedupConfig(max_index_docs=block)
    )
    before = _status("RssAnon")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    plan = compute_plan(config, root)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _status("RssAnon"))
    entry = plan.report["sources"]["docs"]
    print(json.dumps({
        "seconds": seconds, "anon_mib": (peak[0] - before) / 1024, "hwm_mib": _status("VmHWM") / 1024,
        "passes": plan.report["passes"], "exact": entry["exact_duplicates"], "near": entry["near_duplicates"],
        "plan_sha256": hashlib.sha256((root / REMOVED_FILE).read_bytes()).hexdigest(),
    }))  # fmt: skip


def run_child(data: Path, root: Path, block: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(data), str(root), str(block)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--block", type=int, default=10_000, help="documents per LSH pass (banded)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes:
            data = Path(work) / f"docs-{size}.jsonl"
            made = write_documents(data, size)
            memory = run_child(data, Path(work) / f"memory-{size}", size)
            banded = run_child(data, Path(work) / f"banded-{size}", args.block)
            assert banded["plan_sha256"] == memory["plan_sha256"], "banded passes found other duplicates"
            results[size] = (memory, banded)
            print(f"{size:,} documents ({made['exact']} exact, {made['near']} near copies made; found "
                  f"{memory['exact']} exact, {memory['near']} near): same plan in 1 pass and in "
                  f"{banded['passes']} passes of {args.block:,}")  # fmt: skip
            for label, found in (("in memory (baseline)", memory), (f"banded ({args.block:,})", banded)):
                print(f"  {label:24s} {found['seconds']:6.1f} s  anonymous +{found['anon_mib']:7.1f} MiB "
                      f"({found['anon_mib'] * 1024 * 1024 / size:6.0f} B/doc)  VmHWM {found['hwm_mib']:7.1f} MiB")  # fmt: skip
            print(f"  banded / in memory: time {banded['seconds'] / memory['seconds']:.2f}x, "
                  f"memory {banded['anon_mib'] / memory['anon_mib']:.2f}x")  # fmt: skip
    if len(args.sizes) == 2:
        small, large = args.sizes
        growth = large / small
        for label, index in (("in memory", 0), ("banded", 1)):
            a, b = results[small][index], results[large][index]
            print(f"{label}: {growth:g}x the documents -> time {b['seconds'] / a['seconds']:.2f}x, "
                  f"memory {b['anon_mib'] / a['anon_mib']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
