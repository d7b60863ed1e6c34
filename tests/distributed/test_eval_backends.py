"""``keeltune eval`` on a QLoRA checkpoint: exported with the adapters merged to a temporary folder first.

(ZeRO-3 takes the same path through ``export_checkpoint``; a 1-rank ZeRO-3 run on CPU first builds DeepSpeed's
ops, minutes on a shared 2-core machine, so it is not repeated here.)"""

from __future__ import annotations

import json

from tests.conftest import SharedRun, keeltune, read_metrics
from tests.distributed.conftest import QLORA_STEPS as STEPS


def test_eval_of_a_qlora_checkpoint_equals_what_the_trainer_logged(qlora_run: SharedRun) -> None:
    # QLoRA trains on a 4-bit base; the merged model adds the adapters to its dequantized weights: the same
    # function up to float rounding (seen: 3e-8 on a loss, 3e-6 on a forgetting %). The session's 1-rank QLoRA
    # run (rank 4, no dropout, evaluated at steps 0 and 4): eval only reads it (the export goes to a temporary
    # folder, its sets are prepared already)
    run_dir = qlora_run.run_dir
    done = keeltune("eval", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout)
    logged = next(r for r in read_metrics(run_dir) if r["step"] == STEPS and "val/loss" in r)
    for key in ("val/loss", "retention/general/loss", "val/bpb", "retention/general/bpb"):
        assert abs(got[key] - logged[key]) <= 1e-6, (key, got[key], logged[key])
    # the same 1e-6 on the loss: forgetting_pct = 100 * (ppl / baseline ppl - 1) = 100 * (exp(loss - baseline
    # loss) - 1), so a loss within 1e-6 moves it by 100 * 1e-6 * ppl / baseline ppl, about 1e-4
    forgetting = "retention/general/forgetting_pct"
    assert abs(got[forgetting] - logged[forgetting]) <= 1e-4, (got[forgetting], logged[forgetting])
