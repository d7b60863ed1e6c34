"""lm-evaluation-harness on a model folder, in this process and offline: local task YAMLs (``dataset_path:
json`` with ``dataset_kwargs: {data_files: ...}``) read from an include folder, the model handed to lm-eval's
``HFLM`` as a loaded object (accelerate's rank detection is wrong on CPU). lm-eval, torch and transformers
are imported only when a run starts."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from keeltune.config import ConfigError

METRIC_PREFIX = "lm_eval"
_NOT_METRICS = {"alias", "samples", "name", "sample_len", "sample_count"}


def _load(model_dir: Path, tokenizer_path: str, device: str) -> tuple[Any, Any]:
    """The model (float32, safetensors, on ``device``, eval mode) and its tokenizer, from local files only:
    the options of ``keeltune.sharding.model.load_causal_lm``/``load_tokenizer`` (``eval`` may not import
    ``sharding``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer at {tokenizer_path} has no EOS token")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    return model.to(device).eval(), tokenizer


def _task_manager(include_path: Path | None, tasks: list[str]) -> Any:
    """lm-eval's task index: only ``include_path``'s tasks when given (the built-in ones download their data
    from the hub, and indexing them takes seconds), else the built-in ones; every name in ``tasks`` checked."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(
            f"lm-eval include path {include_path} is not a folder (a folder of task YAML files is expected)"
        )
    if not tasks:
        raise ConfigError("lm-eval: no task named; give at least one task name")
    if include_path is None:
        manager = TaskManager()
        where = "lm-eval's built-in tasks"
    else:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        where = f"the include path {include_path}"
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        offered = manager.all_tasks if include_path is not None else []
        listing = f" (it offers: {', '.join(offered) or 'no task'})" if include_path is not None else ""
        raise ConfigError(f"lm-eval: unknown task(s) {', '.join(unknown)}: not in {where}{listing}")
    return manager


def run_lm_eval(
    model_dir: Path,
    tokenizer_path: str,
    tasks: list[str],
    *,
    include_path: Path | None,
    batch_size: int = 8,
    limit: int | None = None,
    log_samples: bool = False,
    device: str = "cpu",
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the model in ``model_dir`` (tokenizer at ``tokenizer_path``) for
    ``tasks`` (names from ``include_path``'s YAMLs; None: lm-eval's built-in tasks) and return its results
    dict (``results``, ``configs``, ... and with ``log_samples`` the per-item ``samples``). No chat template,
    lm-eval's default; works with ``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1``."""
    manager = _task_manager(include_path, tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = _load(model_dir, tokenizer_path, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=log_samples
    )
    if results is None:  # lm-eval returns results on its rank 0 only; a model object is always rank 0
        raise RuntimeError("lm-eval returned no results")
    return results


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def flat_metrics(results: dict) -> dict[str, float]:
    """Every number of ``results["results"]`` (tasks and groups) as ``lm_eval/<task>/<metric>``: lm-eval's
    ``acc,none`` and ``acc_stderr,none`` become ``acc`` and ``acc_stderr`` (another filter than ``none`` is
    kept: ``exact_match,strict-match`` -> ``exact_match,strict-match``); aliases, sample counts and non-numbers
    (``"N/A"`` standard errors) are left out."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.removesuffix(",none")
            if name in _NOT_METRICS:
                continue
            number = _number(value)
            if number is not None:
                flat[f"{METRIC_PREFIX}/{task}/{name}"] = number
    return flat
