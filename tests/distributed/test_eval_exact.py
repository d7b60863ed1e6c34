"""Held-out perplexity and bits per byte are the same whatever the number of ranks, to the last bit: the set's micro-batches are
dealt to the ranks whole and their sums added in batch order, on a set whose size neither 2 nor 3 divides
(every rank also runs the same number of forward passes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SharedRun

SCRIPT = """
import json, sys
from pathlib import Path
import torch
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.eval.evaluate import evaluate
from keeltune.sharding.model import load_causal_lm
from keeltune.distributed import ParallelEnv, exit_rank
torch.set_num_threads(1)
parallel = ParallelEnv.from_environment()
model = load_causal_lm(sys.argv[1]).eval()
dataset = PackedDataset(Path(sys.argv[2]))
result = evaluate(lambda ids: model(input_ids=ids, use_cache=False).logits, dataset, parallel, micro_batch_size=2,
                  max_samples=int(sys.argv[3]))
if parallel.is_main:
    print("EVAL " + json.dumps({"loss": result.loss, "tokens": result.tokens, "ppl": result.ppl, "bpb": result.bpb,
                                "bytes": result.target_bytes}), flush=True)
parallel.close()
exit_rank(0)
"""


def test_retention_perplexity_and_bpb_are_the_same_on_one_two_and_three_ranks(
    assets: dict, ddp_run: SharedRun, tmp_path: Path
) -> None:
    # the retention set the session's ddp run prepared (read-only here)
    folder = ddp_run.run_dir / "data" / "retention-general"
    size = json.loads((folder / "index.json").read_text())["num_samples"]
    samples = next(n for n in range(size, 0, -1) if n % 2 and n % 3)  # neither 2 nor 3 ranks divide it
    assert samples >= 5
    script = tmp_path / "eval.py"
    script.write_text(SCRIPT)
    results = {}
    for ranks in (1, 2, 3):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={ranks}",
                str(script),
                str(assets["model"]),
                str(folder),
                str(samples),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[ranks] = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("EVAL"))[5:])
    assert results[1]["tokens"] == results[2]["tokens"] == results[3]["tokens"] > 0
    assert results[1]["bytes"] == results[2]["bytes"] == results[3]["bytes"] > results[1]["tokens"]
    for ranks in (2, 3):  # whole micro-batches dealt to ranks, sums added in batch order: the same bits
        assert results[ranks]["loss"] == results[1]["loss"], results
        assert results[ranks]["bpb"] == results[1]["bpb"], results
