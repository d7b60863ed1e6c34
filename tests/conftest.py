"""Shared fixtures: a tiny tokenizer + Llama model and small datasets, built once per session, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # a closed local port: W&B can never reach the internet
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)

REPO = Path(__file__).resolve().parents[1]
_SKIPPED_REAL: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Only GPU tests may skip: a skipped test of a real component fails the run."""
    if report.skipped and "gpu" not in report.keywords:
        _SKIPPED_REAL.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_REAL:
        print(f"\nERROR: {len(_SKIPPED_REAL)} non-GPU test(s) skipped (not allowed): {_SKIPPED_REAL}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _general_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _instructions(start: int, count: int) -> list[dict[str, str]]:
    words = ["list", "dict", "set", "tuple", "str", "int", "float", "bytes"]
    return [
        {
            "instruction": f"What is the type of the value {i} converted with {words[i % len(words)]}?",
            "input": "",
            "output": f"Calling {words[i % len(words)]}({i}) gives a {words[i % len(words)]} built from {i}.",
        }
        for i in range(start, start + count)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama (hidden 64, 2 layers) with a 512-token BPE tokenizer, and four small JSONL sets."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from keeltune.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    texts = _general_texts()
    tokenizer = train_tokenizer(texts, 512, root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    return {
        "root": root,
        "model": root / "model",
        "general": write_jsonl(root / "general.jsonl", [{"text": t} for t in texts[:30]]),
        "retention": write_jsonl(root / "retention.jsonl", [{"text": t} for t in texts[60:66]]),
        "task": write_jsonl(root / "task.jsonl", _instructions(0, 120)),
        "task_val": write_jsonl(root / "task_val.jsonl", _instructions(1000, 20)),
    }


def base_config(assets: dict[str, Path], run_root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small training config over the tiny assets; ``sections`` update it section by section."""
    config: dict[str, Any] = {
        "run": {"name": "test", "root": str(run_root)},
        "model": {"path": str(assets["model"])},
        "data": {
            "seq_len": 64,
            "train": [{"name": "task", "path": str(assets["task"]), "format": "instruction"}],
            "validation": {"name": "task", "path": str(assets["task_val"]), "format": "instruction"},
            "retention": [{"name": "general", "path": str(assets["retention"])}],
        },
        "training": {
            "max_steps": 8,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "checkpoint": {"every_steps": 4, "keep_last": 2},
        },
        "eval": {"every_steps": 4, "micro_batch_size": 8},
        "logging": {"wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def with_base_samples(config: dict[str, Any], name: str, **generate: Any) -> dict[str, Any]:
    """``config`` training on its task source (weight 0.75) and on text drawn from the base model (0.25)."""
    config["data"]["train"] = [
        {**config["data"]["train"][0], "weight": 0.75},
        {"name": name, "generate": generate, "weight": 0.25},
    ]
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def keeltune(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the real CLI in a subprocess; return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "keeltune.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file (W&B's own record format: a 7-byte header, then records in
    32 KiB blocks, each a 7-byte header and a protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, rows = 7, [], []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows
