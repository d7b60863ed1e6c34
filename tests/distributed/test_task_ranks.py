"""Task evaluation and bias probes are the same on 1, 2 and 3 ranks for every backend: the items are sorted
globally and dealt to the ranks as whole batches (7 items in batches of 2: 4 batches, which neither 2 nor 3
ranks share evenly; 5 + 7 probe items with 2 and 3 requests each)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import base_config, write_config, write_jsonl

BACKENDS = ("ddp", "qlora", "zero3")
BIAS = {
    "probes": [
        {"kind": "pairs", "axes": ["gender"], "max_items_per_axis": 5},
        {"kind": "templates", "axes": ["age"], "max_items_per_axis": 7},
    ],
    "bootstrap_iters": 20,
}


def _tasks(assets: dict[str, Path], root: Path) -> list[dict]:
    loglikelihood = write_jsonl(
        root / "ll.jsonl",
        [json.loads(line) for line in assets["retention"].read_text().splitlines()][:5]
        + [{"text": "a short line"}, {"text": "def f(x): return x"}],
    )
    return [
        {"name": "cloze", "path": str(assets["cloze"]), "kind": "multiple_choice"},
        {
            "name": "qa",
            "path": str(assets["qa"]),
            "kind": "generate",
            "format": "instruction",
            "metrics": ["exact_match", "f1", "chrf"],
            "generation": {"max_new_tokens": 8, "stop": ["###"]},
        },
        {
            "name": "qa_sampled",  # sampling is seeded per batch: the same draws on any world size
            "path": str(assets["qa"]),
            "kind": "generate",
            "format": "instruction",
            "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "stop": []},
        },
        {"name": "text", "path": str(loglikelihood), "kind": "loglikelihood"},
    ]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def test_task_results_are_identical_on_one_two_and_three_ranks_for_every_backend(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    tasks = _tasks(assets, tmp_path)
    configs = {}
    for backend in BACKENDS:
        sharding = {"backend": backend}
        if backend == "qlora":
            sharding["qlora"] = {"rank": 4, "dropout": 0.0}
        config = base_config(
            assets,
            tmp_path / "runs",
            eval={"tasks": tasks, "task_batch_size": 2, "bias": BIAS},
            training={"global_batch_size": 12, "micro_batch_size": 2},  # a batch 1, 2 and 3 ranks can make
            sharding=sharding,
        )
        configs[backend] = str(write_config(tmp_path / f"{backend}.yaml", config))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"configs": configs, "out": str(tmp_path)}))
    probe = Path(__file__).with_name("task_probe.py")
    for world in (1, 2, 3):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
             str(probe), str(job)],
            capture_output=True, text=True, timeout=400, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
    for backend in BACKENDS:
        got = {w: json.loads((tmp_path / f"{backend}-{w}.json").read_text()) for w in (1, 2, 3)}
        one = got[1]
        for world in (2, 3):
            other = got[world]
            for probe, rows in one["bias"]["lls"].items():
                assert len(rows) == {"pairs": 5, "templates": 7}[probe]
                theirs = other["bias"]["lls"][probe]
                for mine, their in zip(rows, theirs, strict=True):
                    assert all(_close(a, b) for a, b in zip(mine, their, strict=True)), (
                        backend,
                        world,
                        probe,
                    )
            assert one["bias"]["metrics"].keys() == other["bias"]["metrics"].keys()
            for key, value in one["bias"]["metrics"].items():
                assert _close(value, other["bias"]["metrics"][key]), (backend, world, key)
            for task in (t for t in one if t != "bias"):
                items, others = one[task]["items"], other[task]["items"]
                assert len(items) == len(others) == (5 if task.startswith("qa") else 7)
                for mine, theirs in zip(items, others, strict=True):
                    for key, value in mine.items():
                        if isinstance(value, float):
                            assert _close(value, theirs[key]), (backend, world, task, key, value, theirs[key])
                        elif key == "loglikelihoods":
                            assert all(_close(a, b) for a, b in zip(value, theirs[key], strict=True))
                        else:  # generations, choices, gold, token counts: bit-identical
                            assert value == theirs[key], (backend, world, task, key, value, theirs[key])
                for key, value in one[task]["metrics"].items():
                    assert _close(value, other[task]["metrics"][key]), (backend, world, task, key)
        # the tasks did run: generations exist, the sampled ones differ from the greedy ones
        greedy = [i["generation"] for i in one["qa"]["items"]]
        sampled = [i["generation"] for i in one["qa_sampled"]["items"]]
        assert any(greedy) and greedy != sampled, (backend, greedy, sampled)
        assert 0 <= one["cloze"]["metrics"]["task/cloze/acc"] <= 1
        assert one["bias"]["metrics"]["bias/pairs/gender/likelihood_gap_amplification"] == 0.0
        assert 0 <= one["bias"]["metrics"]["bias/pairs/gender/pct_stereotype"] <= 1
