"""Shared fixtures: a tiny tokenizer + Llama model and small datasets, and one tiny trained ddp run (with its prepared
sets), built once per session, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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

# ----------------------------------------------------------------------------------------------- run policy
FULL_RUN_ENV = "KEELTUNE_FULL_RUN"  # scripts/test.sh sets it to 1 when called without arguments (CI's run)
CLUSTER_FIXTURES = frozenset({"slurm_cluster"})  # a test that uses one of these needs the real local cluster
CLUSTER_TEST_DIR = REPO / "tests" / "slurm"  # and so does every test in here
# command-line options that pick a subset of the tests: a run given one of them (or test paths) by hand is not
# a full run, unless FULL_RUN_ENV says it is
_SELECTING_OPTIONS = (
    "-k", "-m", "--deselect", "--lf", "--last-failed", "--sw", "--stepwise", "--ignore", "--ignore-glob",
)  # fmt: skip


class RunPolicy:
    """What the test command must not pass silently (registered by ``pytest_configure`` below).

    * A test that uses the local Slurm cluster (a fixture in ``CLUSTER_FIXTURES``, directly or through another
      fixture, or any test in tests/slurm/) without the ``slurm`` marker stops the run before any test runs.
    * Only tests marked ``gpu`` may skip (or xfail), in any run; a skip at collection time (a module skipped
      whole) always counts as a non-GPU skip.
    * In a full run (``KEELTUNE_FULL_RUN=1``, or pytest given no test paths and no selecting option on its
      command line) deselecting any test not marked ``gpu`` fails the run too, whichever way it was deselected
      (``-m``/``-k``/``--deselect`` from the command line, ``PYTEST_ADDOPTS`` or the ini's ``addopts``), and
      so does narrowing it with test paths or ``--ignore`` when ``KEELTUNE_FULL_RUN=1``.

    A run that breaks a rule ends with exit status 1 (unless it already failed otherwise) and a summary
    section naming each test and why."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.full_run = full_run(config)
        self.skipped: list[str] = []
        self.deselected: list[str] = []
        self.narrowed: list[str] = []

    @pytest.hookimpl(tryfirst=True)  # before -m/-k deselect: every collected test is checked
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        unmarked = [
            item.nodeid
            for item in items
            if (
                CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.path.is_relative_to(CLUSTER_TEST_DIR)
            )
            and item.get_closest_marker("slurm") is None
        ]
        if unmarked:
            raise pytest.UsageError(
                f"{len(unmarked)} test(s) use the local Slurm cluster ({', '.join(sorted(CLUSTER_FIXTURES))}, "
                f"or in {CLUSTER_TEST_DIR.relative_to(REPO)}/) "
                "without the `slurm` marker; add `pytestmark = pytest.mark.slurm` to the module (or "
                "@pytest.mark.slurm):\n  " + "\n  ".join(unmarked)
            )

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += [item.nodeid for item in items if item.get_closest_marker("gpu") is None]

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append(f"{report.nodeid or '.'} (skipped at collection: {_skip_reason(report)})")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        report = yield
        if report.skipped and item.get_closest_marker("gpu") is None:
            self.skipped.append(f"{report.nodeid} ({_skip_reason(report)})")
        return report

    def violations(self) -> list[str]:
        found = [f"skipped, not a gpu test: {entry}" for entry in self.skipped]
        if self.full_run:
            found += self.narrowed
            found += [f"deselected in a full run, not a gpu test: {nodeid}" for nodeid in self.deselected]
        return found

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.full_run and os.environ.get(FULL_RUN_ENV) == "1":
            if self.config.args_source == pytest.Config.ArgsSource.ARGS:
                self.narrowed.append(f"a full run given test paths (PYTEST_ADDOPTS?): {self.config.args}")
            for option in ("ignore", "ignore_glob"):
                if self.config.getoption(option, None):
                    self.narrowed.append(f"a full run given --{option.replace('_', '-')}: "
                                         f"{self.config.getoption(option)}")  # fmt: skip

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.violations() and session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        found = self.violations()
        if not found:
            return
        kind = f"full run ({FULL_RUN_ENV}=1 or no test paths/-k/-m)" if self.full_run else "subset run"
        terminalreporter.write_sep("=", f"run policy: {len(found)} violation(s), the run fails", red=True)
        terminalreporter.write_line(f"{kind}; only tests marked `gpu` may be skipped or deselected:")
        if self.deselected and self.full_run:
            option = self.config.option
            terminalreporter.write_line(
                f"deselected by: -m {option.markexpr!r}, -k {option.keyword!r}, "
                f"--deselect {self.config.getoption('deselect', None)!r}, --lf {self.config.getoption('lf', False)!r}"
                " (from the command line, PYTEST_ADDOPTS or the ini's addopts)"
            )
        for line in found:
            terminalreporter.write_line(f"  {line}", red=True)


def full_run(config: pytest.Config) -> bool:
    """Whether this run means to run the whole suite (see RunPolicy)."""
    if os.environ.get(FULL_RUN_ENV) == "1":
        return True
    if config.args_source == pytest.Config.ArgsSource.ARGS:  # test paths given: a subset
        return False
    return not any(
        arg.split("=", 1)[0] in _SELECTING_OPTIONS or (arg[:2] in ("-k", "-m") and not arg.startswith("--"))
        for arg in map(str, config.invocation_params.args)
    )


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail: {report.wasxfail or 'no reason given'}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr).strip().splitlines()[-1] if longrepr else "no reason given"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(RunPolicy(config), "keeltune-run-policy")


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


def _cloze_items(texts: list[str], count: int) -> list[dict[str, Any]]:
    """Multiple-choice cloze items on general text: the true next words among other passages' words (choices of
    different lengths, gold position varied)."""
    items = []
    for i in range(count):
        words = texts[40 + i].split()
        others = [" ".join(texts[50 + i + k].split()[12 : 13 + k]) for k in range(3)]
        choices = others[: i % 4] + [" ".join(words[12:14])] + others[i % 4 :]
        items.append({"text": " ".join(words[:12]), "choices": choices, "gold": i % 4})
    return items


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
        "cloze": write_jsonl(root / "cloze.jsonl", _cloze_items(texts, 7)),
        "qa": write_jsonl(
            root / "qa.jsonl",
            [{"instruction": r["instruction"], "answer": r["output"]} for r in _instructions(2000, 5)],
        ),
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


# ------------------------------------------------------------------------------------------------ shared runs
# A training run costs seconds of CLI start-up and training on the 2-core test machine: runs that several tests
# only read are trained once per session here (tests/distributed/conftest.py has the QLoRA one).


@dataclass(frozen=True)
class SharedRun:
    """A finished run that several tests read: its folder and the config file it was trained from.

    Tests never write into it: its fixture fails at the end of its scope, naming the files, when one did. A
    test that writes (a report, a resume, sets prepared for another tokenizer) works on ``copy(tmp_path)``."""

    run_dir: Path
    config: Path

    def copy(self, dest: Path) -> SharedRun:
        """The run copied to ``dest/runs/<name>``, with ``run.root`` pointing there, both in a new config file and
        in the copy's own ``config.yaml``: ``keeltune`` commands on the copy (eval, report, train, --config) read
        and write the copy's folder, never the shared one."""
        root = (dest / "runs").resolve()
        run_dir = root / self.run_dir.name
        shutil.copytree(self.run_dir, run_dir)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        saved["run"]["root"] = str(root)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        config = yaml.safe_load(self.config.read_text())
        config["run"]["root"] = str(root)
        return SharedRun(run_dir, write_config(dest / f"{run_dir.name}.yaml", config))


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder (None) under ``folder``; not the readers' records of the prepared
    shards whose checksums matched (a cache that ``keeltune eval`` adds to a set it verified)."""
    from keeltune.data_pipeline.reader import VERIFIED_FILE

    found: dict[str, tuple[int, int] | None] = {}
    for path in folder.rglob("*"):
        if path.name == VERIFIED_FILE:
            continue
        found[str(path.relative_to(folder))] = (
            (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
        )
    return found


def kept_unchanged(run: SharedRun) -> Iterator[SharedRun]:
    """Yield ``run`` to the tests of a fixture's scope, then fail when any of them changed its folder."""
    before = _snapshot(run.run_dir)
    yield run
    after = _snapshot(run.run_dir)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key, 0) != after.get(key, 0))
    if changed:
        pytest.fail(
            f"a test changed the shared run {run.run_dir} (write to SharedRun.copy(tmp_path) instead): "
            + ", ".join(changed[:20]),
            pytrace=False,
        )


DDP_RUN_STEPS = 6


def session_tasks(assets: dict[str, Path]) -> list[dict[str, Any]]:
    """Two evaluation tasks: a retention cloze (multiple choice, its own interval: every 2 steps) and a short
    generation task in the training data's instruction format."""
    return [
        {
            "name": "cloze",
            "path": str(assets["cloze"]),
            "kind": "multiple_choice",
            "retention": True,
            "every_steps": 2,
        },
        {
            "name": "qa",
            "path": str(assets["qa"]),
            "kind": "generate",
            "format": "instruction",
            "metrics": ["exact_match", "f1", "rouge_l", "chrf"],
            "generation": {"max_new_tokens": 8},
        },
    ]


def session_bias_probes() -> dict[str, Any]:
    """A few of keeltune's built-in bias probes (pairs on two axes, templates on one), evenly spaced subsets."""
    return {
        "probes": [
            {"kind": "pairs", "axes": ["gender", "age"], "max_items_per_axis": 16},
            {"kind": "templates", "axes": ["religion"], "max_items_per_axis": 8},
        ],
        "bootstrap_iters": 200,
    }


def ddp_run_config(assets: dict[str, Path], run_root: Path) -> dict[str, Any]:
    """The shared ddp run: 6 steps, evaluated at steps 0, 3 and 6 (the cloze task also at 2 and 4; bias probes
    with the held-out sets), checkpointed at 3 and 6 (both kept), reading in the training process (no
    DataLoader worker)."""
    return base_config(
        assets,
        run_root,
        training={
            "max_steps": DDP_RUN_STEPS,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": DDP_RUN_STEPS // 2, "keep_last": 2},
        },
        eval={
            "every_steps": DDP_RUN_STEPS // 2,
            "micro_batch_size": 4,
            "tasks": session_tasks(assets),
            "bootstrap_iters": 100,
            "bias": session_bias_probes(),
        },
        # tokenize inline (the forked pool hung twice here on a loaded machine); read in the training process
        data={"prepare_workers": 1, "loader_workers": 0},
    )


@pytest.fixture(scope="session")
def ddp_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    """One tiny ddp model trained through the CLI (1 process, W&B disabled: ``ddp_run_config``) for the whole
    session, with the sets it prepared (``run_dir / "data"``: train-task, val-task, retention-general). Used by
    e2e/test_eval_report.py, e2e/test_wandb.py, e2e/test_launch_local.py (its sets), distributed/test_eval_exact.py
    (its retention set) and distributed/test_data_parallel.py (the 1-rank reference)."""
    root = tmp_path_factory.mktemp("ddp_run")
    cfg = write_config(root / "cfg.yaml", ddp_run_config(assets, root / "runs"))
    done = keeltune("train", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    yield from kept_unchanged(SharedRun(root / "runs" / "test", cfg))


def wandb_records(run_file: Path) -> list[Any]:
    """The protobuf ``Record``s of an offline W&B run file (W&B's own record format: a 7-byte header, then
    records in 32 KiB blocks, each a 7-byte header and a piece of a record)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, records = 7, [], []
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
            records.append(record)
    return records


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file."""
    return [
        {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
        for record in wandb_records(run_file)
        if record.WhichOneof("record_type") == "history"
    ]
