"""The typed config: loading, overrides, and the errors a user sees."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from keeltune.config import (
    ConfigError,
    check_paths,
    check_world_size,
    config_from_dict,
    load_config,
    resume_differences,
)
from tests.conftest import REPO, base_config, keeltune, write_config

MINIMAL = """\
model:
  path: /shared/models/llama-3-8b
data:
  seq_len: 128
  train:
    - name: task
      path: /shared/data/task.jsonl
      format: instruction
training:
  global_batch_size: 32
  micro_batch_size: 4
  lr: 2e-5
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_example_config_validates() -> None:
    """Run configs, and sweep files (configs/sweeps/) against their base: every parameter at both ends and
    every choice, every metric."""
    from keeltune.config.loader import load_sweep
    from keeltune.sweep.trials import check_sweep

    sweeps = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    files = sorted(set((REPO / "configs").rglob("*.yaml")) - set(sweeps))
    assert files and sweeps, "configs/ holds example configs and sweeps"
    for path in files:
        config = load_config(path)
        check_world_size(config, config.slurm.nodes * config.slurm.gpus_per_node)
    for path in sweeps:  # the cluster's folders need not exist here
        base = check_sweep(load_sweep(path), path, folder=False)
        check_world_size(base, base.slurm.world_size)


def test_minimal_config_defaults_and_cluster_paths_validate_at_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL, "my-run.yaml"))
    assert config.run.name == "my-run"  # the file name when not given
    assert config.training.lr == 2e-5 and isinstance(config.training.lr, float)
    assert config.data.train[0].format == "instruction"
    assert config.sharding.backend == "ddp"
    with pytest.raises(
        ConfigError, match=r"model.path: /shared/models/llama-3-8b is not a Hugging Face model"
    ):
        check_paths(config)


def test_overrides_nested_and_list_index(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL),
        [
            "training.lr=3e-4",
            "data.train.0.name=other",
            "logging.wandb.mode=offline",
            "eval.max_samples=null",
        ],
    )
    assert config.training.lr == 3e-4
    assert config.data.train[0].name == "other"
    assert config.logging.wandb.mode == "offline"
    with pytest.raises(
        ConfigError,
        match=r"--set training\.lrr=1: training\.lrr: unknown key \(did you mean training\.lr\?\)",
    ):
        load_config(write(tmp_path, MINIMAL), ["training.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["training.lr"])


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("  lr: 2e-5", "  lr: [2e-5"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:")
    assert "malformed YAML" in str(err.value)
    line = int(str(err.value).split(":")[1])
    assert line >= 12  # the broken value is on line 12; the parser notices it there or just after


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("  micro_batch_size: 4", "  micro_batch_sise: 4"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:11: training.micro_batch_sise: unknown key")
    assert "did you mean training.micro_batch_size?" in message


def test_unknown_section_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("training:", "trainig:"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:9: trainig: unknown key (did you mean training?); valid keys")


def test_wrong_type_names_key_line_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("  micro_batch_size: 4", "  micro_batch_size: four"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:11: training.micro_batch_size: expected int, got str 'four'"
    with pytest.raises(
        ConfigError,
        match=r"sharding.backend: 'zero' is not one of \['ddp', 'zero3', 'fsdp2', 'qlora'\] \(did you mean 'zero3'\?\)",
    ):
        load_config(write(tmp_path, MINIMAL + "sharding:\n  backend: zero\n"))
    with pytest.raises(
        ConfigError,
        match=r"data.train.0.format: 'instructions' is not one of .* \(did you mean 'instruction'",
    ):
        load_config(write(tmp_path, MINIMAL.replace("format: instruction", "format: instructions")))


def test_impossible_combinations_rejected_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml:10: training.global_batch_size=30 is not a multiple of"):
        load_config(write(tmp_path, MINIMAL.replace("global_batch_size: 32", "global_batch_size: 30")))
    with pytest.raises(ConfigError, match="warmup_steps=500 must be between 0 and max_steps=100"):
        load_config(write(tmp_path, MINIMAL + "  warmup_steps: 500\n"))
    with pytest.raises(ConfigError, match="slurm.time: 'two hours' is not a Slurm time"):
        load_config(write(tmp_path, MINIMAL + "slurm:\n  time: two hours\n"))


def test_batch_that_ranks_cannot_make_is_refused_with_the_fix(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert check_world_size(config, 1) == 8
    assert check_world_size(config, 4) == 2  # accumulation recomputed, global batch fixed
    with pytest.raises(ConfigError) as err:
        check_world_size(config, 3)
    message = str(err.value)
    assert (
        "global_batch_size=32 cannot be made from micro_batch_size=4 x 3 ranks (= 12 per micro-step)"
        in message
    )
    assert "multiple of 12" in message


def test_config_verb_prints_resolved_config_and_checks_nproc(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    done = keeltune("config", str(path), "--set", "training.max_steps=70", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["training"]["max_steps"] == 70
    assert printed["regularization"]["weight_decay"] == 0.0  # defaults are shown
    assert "gradient accumulation 4" in done.stdout
    failed = keeltune("config", str(path), "--nproc", "3")
    assert failed.returncode == 2
    assert "cannot be made from micro_batch_size=4 x 3 ranks" in failed.stderr


def test_missing_model_path_at_train_time(tmp_path: Path, assets: dict) -> None:
    config = base_config(assets, tmp_path / "runs", model={"path": str(tmp_path / "nope")})
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 2
    assert (
        f"model.path: {tmp_path / 'nope'} is not a Hugging Face model folder (no config.json there)"
        in done.stderr
    )
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_missing_data_file_at_train_time(tmp_path: Path, assets: dict) -> None:
    config = base_config(assets, tmp_path / "runs")
    config["data"]["retention"][0]["path"] = str(tmp_path / "gone.jsonl")
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 2
    assert "data.retention.0.path:" in done.stderr and "does not exist" in done.stderr


def test_output_under_a_file_is_refused(tmp_path: Path, assets: dict) -> None:
    (tmp_path / "afile").write_text("x")
    config = config_from_dict(base_config(assets, tmp_path / "afile" / "runs"))
    with pytest.raises(
        ConfigError, match=r"run.root: .* is not writable \(.*afile is a file, not a folder\)"
    ):
        check_paths(config)


def _check_paths_as_nobody(config) -> str:
    """check_paths in a forked child that dropped root (root may write anywhere); returns its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        message = ""
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            check_paths(config)
        except ConfigError as err:
            message = str(err)
        except BaseException as err:  # noqa: BLE001 - report anything to the parent
            message = f"unexpected {err!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_output_folder_without_write_permission_is_refused(assets: dict) -> None:
    """A read-only folder is refused before any work (root drops to user nobody to be refused at all)."""
    shared = Path(tempfile.mkdtemp(prefix="keeltune-perm-"))
    try:
        shared.chmod(0o755)
        shutil.copytree(assets["model"], shared / "model")
        shutil.copy(assets["task"], shared / "task.jsonl")
        readonly = shared / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        config = {
            "run": {"root": str(readonly / "runs")},
            "model": {"path": str(shared / "model")},
            "data": {"train": [{"name": "t", "path": str(shared / "task.jsonl"), "format": "instruction"}]},
        }
        message = _check_paths_as_nobody(config_from_dict(config))
        assert "run.root:" in message and "not writable" in message, message
        assert "Permission denied" in message
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_resume_differences_ignore_mutable_keys(tmp_path: Path) -> None:
    old = load_config(write(tmp_path, MINIMAL)).to_dict()
    new = load_config(
        write(tmp_path, MINIMAL), ["eval.every_steps=5", "logging.wandb.mode=offline"]
    ).to_dict()
    assert resume_differences(old, new) == []
    changed = load_config(write(tmp_path, MINIMAL), ["training.lr=1e-3", "data.seq_len=256"]).to_dict()
    assert resume_differences(old, changed) == [
        "  data.seq_len: 128 -> 256",
        "  training.lr: 2e-05 -> 0.001",
    ]


def test_a_key_the_saved_config_lacks_is_unchanged_while_it_holds_its_default(tmp_path: Path) -> None:
    old = load_config(write(tmp_path, MINIMAL)).to_dict()
    del old["data"]["dedup"]  # a run saved by a keeltune without deduplication
    old["data"]["train"][0].pop("on_error")
    assert resume_differences(old, load_config(write(tmp_path, MINIMAL)).to_dict()) == []
    changed = load_config(
        write(tmp_path, MINIMAL), ["data.dedup.threshold=0.9", "data.dedup.max_index_docs=10"]
    )
    assert resume_differences(old, changed.to_dict()) == ["  data.dedup.threshold: '<absent>' -> 0.9"]


def test_qlora_with_zero3_and_misplaced_sections_are_refused(tmp_path: Path) -> None:
    both = MINIMAL + "sharding:\n  backend: qlora\n  zero3:\n    offload_optimizer: cpu\n"
    with pytest.raises(
        ConfigError, match=r"cfg.yaml:\d+: sharding.zero3: QLoRA with ZeRO-3 .* not supported"
    ):
        load_config(write(tmp_path, both))
    stray = MINIMAL + "sharding:\n  qlora:\n    rank: 8\n"
    with pytest.raises(
        ConfigError, match=r"sharding.qlora: settings for backend qlora, but backend is 'ddp'"
    ):
        load_config(write(tmp_path, stray))
    params_only = MINIMAL + "sharding:\n  backend: zero3\n  zero3:\n    offload_params: cpu\n"
    with pytest.raises(ConfigError, match=r"sharding.zero3.offload_params: cpu needs offload_optimizer"):
        load_config(write(tmp_path, params_only))
    assert load_config(write(tmp_path, MINIMAL + "sharding:\n  backend: qlora\n")).sharding.qlora.rank == 16


def test_regularizers_a_backend_cannot_compute_exactly_are_refused_at_load(tmp_path: Path) -> None:
    def load(text: str):
        return load_config(write(tmp_path, MINIMAL + text))

    zero3 = load(
        "sharding:\n  backend: zero3\nregularization:\n  kl:\n    weight: 0.1\n  l2sp:\n    weight: 0.1\n"
    )
    assert (
        zero3.regularization.kl.weight == zero3.regularization.l2sp.weight == 0.1
    )  # partitioned, not refused
    retention = "  retention:\n    - name: general\n      path: /shared/data/general.jsonl\n"
    text = MINIMAL.replace("training:", retention + "training:")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text + "regularization:\n  ewc:\n    weight: 1.0\n    sets: [genral]\n"))
    assert "regularization.ewc.sets: ['genral'] are not data.retention names (['general'])" in str(err.value)
    with pytest.raises(ConfigError, match=r"regularization.ewc: not supported with sharding.backend: qlora"):
        load("sharding:\n  backend: qlora\nregularization:\n  ewc:\n    weight: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"regularization.ewc: needs general data .* add a data.retention set"
    ):
        load("regularization:\n  ewc:\n    weight: 1.0\n")
    with pytest.raises(
        ConfigError,
        match=r"regularization.early_stopping.metric: 'val/loss' is not reported by this config .*add "
        r"data.validation or eval.tasks",
    ):
        load("regularization:\n  early_stopping:\n    patience: 2\n")
    with pytest.raises(
        ConfigError, match=r"action: best keeps the model .* set max_forgetting_pct or metric \+ max_drop"
    ):
        load("regularization:\n  retention_guard:\n    action: best\n")
    with pytest.raises(ConfigError, match=r"retention_guard: max_forgetting_pct watches retention sets"):
        load("regularization:\n  retention_guard:\n    max_forgetting_pct: 20\n")
    for text, match in (
        ("kl:\n    weight: -1", r"regularization.kl.weight: must be >= 0"),
        ("kl:\n    temperature: 0", r"regularization.kl.temperature: must be > 0"),
        ("l2sp:\n    weight: -1", r"regularization.l2sp.weight: must be >= 0"),
        ("ewc:\n    samples: 0", r"regularization.ewc.samples: must be >= 1"),
        ("neftune_alpha: -5", r"regularization.neftune_alpha: must be >= 0"),
        ("early_stopping:\n    patience: -1", r"regularization.early_stopping.patience: must be >= 0"),
        (
            "retention_guard:\n    max_forgetting_pct: 0",
            r"regularization.retention_guard.max_forgetting_pct: must be > 0",
        ),
        (
            "retention_guard:\n    action: halt",
            r"regularization.retention_guard.action: 'halt' is not one of",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            load(f"regularization:\n  {text}\n")
    # what each backend can do passes
    assert (
        load(
            "sharding:\n  backend: zero3\nregularization:\n  neftune_alpha: 5\n"
        ).regularization.neftune_alpha
        == 5
    )
    qlora = load(
        "sharding:\n  backend: qlora\nregularization:\n  kl: {weight: 0.5}\n  l2sp: {weight: 0.01}\n"
    )
    assert qlora.regularization.kl.weight == 0.5 and qlora.regularization.l2sp.weight == 0.01


def test_anchors_and_merge_keys_work_and_an_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    import time
    import tracemalloc

    merged = MINIMAL.replace(
        "      format: instruction\n",
        "      format: instruction\n      fields: &names {instruction: question, output: answer}\n"
        "  validation:\n    <<: {name: val, format: instruction}\n    path: /shared/data/val.jsonl\n"
        "    fields: *names\n",
    )
    config = load_config(write(tmp_path, merged))
    assert config.data.validation.name == "val" and config.data.validation.format == "instruction"
    assert config.data.validation.fields.instruction == "question"
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = write(tmp_path, MINIMAL + "\n".join(laughs) + "\n", "bomb.yaml")
    assert bomb.stat().st_size < 1024  # 9^10 = 3.5e9 leaves
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml:\d+: the config expands to more than 20,000 values"):
        load_config(bomb)
    assert time.perf_counter() - started < 1.0
    tracemalloc.start()
    with pytest.raises(ConfigError):
        load_config(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2**20, peak
    itself = write(tmp_path, MINIMAL + "run: &loop {name: x, more: *loop}\n", "loop.yaml")
    with pytest.raises(ConfigError, match=r"loop.yaml:\d+: run.more: an alias that contains itself"):
        load_config(itself)
    deep = write(tmp_path, MINIMAL + "run: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)


def test_an_override_that_creates_a_wrong_section_is_blamed_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL, "good.yaml")
    with pytest.raises(ConfigError, match=r"^--set nosuch\.deep=1: nosuch: unknown key"):
        load_config(path, ["nosuch.deep=1"])
    with pytest.raises(ConfigError, match=r"^--set nosuch=1: nosuch: unknown key"):
        load_config(path, ["nosuch=1"])


def test_cpu_ranks_without_gpus_and_one_rank_per_gpu(tmp_path: Path) -> None:
    cpu = load_config(
        write(tmp_path, MINIMAL), ["slurm.gpus_per_node=0", "slurm.ntasks_per_node=4", "slurm.nodes=2"]
    )
    assert cpu.slurm.ranks_per_node == 4 and cpu.slurm.world_size == 8
    assert load_config(write(tmp_path, MINIMAL), ["slurm.gpus_per_node=0"]).slurm.world_size == 1
    with pytest.raises(ConfigError, match="keeltune runs one rank per GPU"):
        load_config(write(tmp_path, MINIMAL), ["slurm.gpus_per_node=8", "slurm.ntasks_per_node=2"])
