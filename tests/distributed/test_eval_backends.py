"""``keeltune eval`` on a QLoRA checkpoint: exported with the adapters merged to a temporary folder first.

(ZeRO-3 takes the same path through ``export_checkpoint``; a 1-rank ZeRO-3 run on CPU first builds DeepSpeed's
ops, minutes on a shared 2-core machine, so it is not repeated here.)"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import base_config, keeltune, read_metrics, write_config

STEPS = 2


def test_eval_of_a_qlora_checkpoint_equals_what_the_trainer_logged(assets: dict, tmp_path: Path) -> None:
    # QLoRA trains on a 4-bit base; the merged model adds the adapters to its dequantized weights: the same
    # function up to float rounding (seen: 3e-8 on a loss, 3e-6 on a forgetting %)
    sharding = {"backend": "qlora", "qlora": {"rank": 4, "dropout": 0.0}}
    config = base_config(
        assets,
        tmp_path / "runs",
        training={
            "max_steps": STEPS,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": STEPS, "keep_last": 1},
        },
        eval={"every_steps": STEPS, "micro_batch_size": 4},
        data={"prepare_workers": 1},  # tokenize inline: the forked pool hung twice here on a loaded machine
        sharding=sharding,
    )
    trained = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert trained.returncode == 0, trained.stderr[-4000:]
    run_dir = tmp_path / "runs" / "test"
    done = keeltune("eval", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout)
    logged = next(r for r in read_metrics(run_dir) if r["step"] == STEPS and "val/loss" in r)
    for key in ("val/loss", "retention/general/loss"):
        assert abs(got[key] - logged[key]) <= 1e-6, (key, got[key], logged[key])
    # the same 1e-6 on the loss: forgetting_pct = 100 * (ppl / baseline ppl - 1) = 100 * (exp(loss - baseline
    # loss) - 1), so a loss within 1e-6 moves it by 100 * 1e-6 * ppl / baseline ppl, about 1e-4
    forgetting = "retention/general/forgetting_pct"
    assert abs(got[forgetting] - logged[forgetting]) <= 1e-4, (got[forgetting], logged[forgetting])
