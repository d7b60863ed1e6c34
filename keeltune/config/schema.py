"""The config dataclasses and what each checks on itself in ``__post_init__``, with the checks across sections
that ``Config`` and ``DataConfig`` run there (regularization, mixing weights)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from keeltune.config.backends import DEFAULT_BACKEND, backend_spec, check_sharding
from keeltune.config.errors import ConfigError

# --------------------------------------------------------------------------- sections

# keeltune's built-in bias probe axes (eval/bias/builtin.py generates their items) and the axes with built-in
# swap lists (data_pipeline/counterfactual.py) for counterfactual augmentation and the consistency regularizer
BIAS_AXES = ("gender", "religion", "nationality", "age", "race_ethnicity", "disability")
SWAP_AXES = ("gender", "religion", "nationality", "age")


def timeout_minutes(limit: str) -> int:
    """Slurm's time formats (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in whole minutes."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(parts) == 3:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    else:
        total = parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)
    return max(1, int(round(total)))


@dataclass(kw_only=True)
class RunConfig:
    """Where the run folder lives: ``<root>/<name>/``."""

    name: str = "run"
    root: str = "runs"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                f"run.name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )


@dataclass(kw_only=True)
class VocabularyConfig:
    """Domain vocabulary: the words of the domain text that save the most tokens (frequent, split by the base
    tokenizer into many pieces) become tokens of their own before training."""

    new_tokens: int = 0  # how many tokens to add at most; 0: off
    min_count: int = 20  # a word must occur this often in the domain text
    min_pieces: int = 3  # ... and be split by the base tokenizer into at least this many pieces
    sources: list[str] = field(default_factory=list)  # train sources read (names); []: the first stage's
    max_documents: int = 100_000  # documents read from them (the first ones, in file order)

    def __post_init__(self) -> None:
        for key, low in (("new_tokens", 0), ("min_count", 1), ("min_pieces", 2), ("max_documents", 1)):
            if getattr(self, key) < low:
                raise ConfigError(
                    f"model.extend_vocabulary.{key}: must be >= {low}, got {getattr(self, key)}"
                )

    @property
    def enabled(self) -> bool:
        return self.new_tokens > 0


@dataclass(kw_only=True)
class ModelConfig:
    """A Hugging Face causal LM folder (safetensors) and how to run it."""

    path: str = ""
    tokenizer: str = ""  # defaults to the model folder
    gradient_checkpointing: bool = False
    extend_vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("model.path: required (a Hugging Face model folder with config.json)")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass(kw_only=True)
class FieldNames:
    """Record field names, for data that names them differently (``fields: {output: answer}``)."""

    text: str = "text"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"
    speaker: str = "from"
    value: str = "value"
    choices: str = "choices"  # evaluation tasks: a multiple-choice item's list of choices
    gold: str = "gold"  # evaluation tasks: the index of the right choice
    answer: str = "answer"  # evaluation tasks: a generate item's reference (a string or a list of strings)


@dataclass(kw_only=True)
class GenerateConfig:
    """A train source drawn from the base model when training starts (self-replay): rehearsal of what the model
    knew without any general data. Samples are plain text, written once to ``<run>/base_samples/<name>.jsonl``
    and reused on resume."""

    samples: int = 1000  # sequences drawn, shared among the ranks
    temperature: float = 1.0  # 1.0 samples the base model's own distribution
    max_new_tokens: int = 0  # per sample, after the BOS token; 0: data.seq_len - 1
    batch_size: int = 16  # sequences generated at once on each rank

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 0:
            raise ConfigError("samples, batch_size: must be >= 1; max_new_tokens: >= 0 (0: data.seq_len - 1)")
        if not 0 < self.temperature <= 10:
            raise ConfigError(f"temperature: must be > 0 and <= 10, got {self.temperature}")


@dataclass(kw_only=True)
class CounterfactualConfig:
    """Counterfactual data augmentation of a train source: copies of its records with the demographic terms of
    ``axes`` exchanged (he <-> she, mother <-> father, ...; keeltune's swap lists, or a user's ``swaps`` file of
    JSONL lines ``{"term": "nurse", "counterpart": "doctor"}``). ``mode: add`` keeps every record and adds the
    swapped twin of a ``fraction`` of them; ``mode: swap`` replaces a ``fraction`` of them by their twins. Which
    records are chosen depends on the record's text only (the same on every run and worker count)."""

    axes: list[str] = field(default_factory=lambda: ["gender"])
    swaps: str = ""  # a JSONL file of {"term", "counterpart"} pairs, used instead of keeltune's lists
    mode: Literal["add", "swap"] = "add"
    fraction: float | None = None  # share of records twinned; None: 1.0 for add, 0.5 for swap

    def __post_init__(self) -> None:
        if not self.axes and not self.swaps:
            raise ConfigError("counterfactual: name swap axes (e.g. [gender]) or a swaps file")
        unknown = sorted(set(self.axes) - set(SWAP_AXES))
        if unknown:
            raise ConfigError(
                f"counterfactual.axes: {unknown} have no swap list; keeltune has {list(SWAP_AXES)} "
                "(or give your own pairs in a swaps file)"
            )
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"counterfactual.fraction: must be in (0, 1], got {self.fraction}")

    @property
    def share(self) -> float:
        """The fraction of records twinned."""
        if self.fraction is not None:
            return self.fraction
        return 1.0 if self.mode == "add" else 0.5


@dataclass(kw_only=True)
class SourceConfig:
    """One data source: a file, a glob or a folder of JSONL, Parquet, plain text or a saved ``datasets`` folder;
    or, for training only, text drawn from the base model (``generate``, no ``path``).

    ``weight`` sets its share of the training stream when several train sources are mixed (ratios: 80 and 20,
    or 0.8 and 0.2); held-out sets ignore it.
    """

    name: str
    path: str = ""
    generate: GenerateConfig | None = None
    type: Literal["auto", "jsonl", "parquet", "text", "hf_disk"] = "auto"
    format: Literal["text", "instruction", "chat", "sharegpt"] = "text"
    fields: FieldNames = field(default_factory=FieldNames)
    weight: float = 1.0
    on_error: Literal["fail", "skip"] = "fail"
    counterfactual: CounterfactualConfig | None = None  # train sources only: counterfactual augmentation

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )
        if self.generate is not None:
            if self.counterfactual is not None:
                raise ConfigError(
                    "counterfactual: augments records read from files; a generate source's text comes from the "
                    "base model (remove counterfactual here, or put it on a file source)"
                )
            if self.path or self.format != "text":
                raise ConfigError(
                    "generate: a source drawn from the base model has no path and is plain text (its samples go to "
                    f"<run>/base_samples/{self.name}.jsonl); remove path/format, or remove generate"
                )
        elif not self.path:
            raise ConfigError(
                "path: required (a file, a glob such as data/*.jsonl, or a folder; or generate: {samples: N} "
                "for text drawn from the base model)"
            )
        if not 0 < self.weight < 1e6:
            raise ConfigError(f"weight: must be > 0 and < 1e6 (a mixing ratio), got {self.weight}")


@dataclass(kw_only=True)
class DedupConfig:
    """Duplicate training documents found by ``keeltune prepare`` across every ``data.train`` source read from
    files, in config order: exact copies (sha256 of the record's text, whitespace collapsed and lowercased) and
    near copies (MinHash-LSH over word ``shingle_words``-grams; estimated Jaccard similarity >= ``threshold``).
    The first copy is kept; ``action: remove`` leaves the later ones out of the shards, ``report`` only lists
    them. Validation and retention sets are never deduplicated."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128  # MinHash permutations: more estimate the similarity more precisely, and cost more
    shingle_words: int = 5
    action: Literal["remove", "report"] = "remove"
    # documents per in-memory LSH pass (about 5.5 KB each with the default bands: 1,000,000 take ~5.5 GB);
    # more are compared in passes of this many, with the same result: memory stays bounded whatever the size
    max_index_docs: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(
                f"data.dedup.threshold: must be in (0, 1] (a Jaccard similarity), got {self.threshold}"
            )
        if self.num_perm < 16:
            raise ConfigError(f"data.dedup.num_perm: must be >= 16 (128 is usual), got {self.num_perm}")
        if self.shingle_words < 1:
            raise ConfigError(f"data.dedup.shingle_words: must be >= 1, got {self.shingle_words}")
        if self.max_index_docs < 1:
            raise ConfigError(f"data.dedup.max_index_docs: must be >= 1, got {self.max_index_docs}")


@dataclass(kw_only=True)
class DataConfig:
    """What to train and evaluate on; sources are prepared once into shards (``keeltune prepare``)."""

    seq_len: int = 512
    train: list[SourceConfig] = field(default_factory=list)
    validation: SourceConfig | None = None
    retention: list[SourceConfig] = field(default_factory=list)
    prepared_dir: str = ""  # where shards go; default: <run folder>/data
    shard_samples: int = 8192  # packed samples per shard file
    long_documents: Literal["split", "truncate"] = "split"  # documents longer than seq_len + 1 tokens
    # instruction/chat records whose prompt (the tokens before the first learned one) fills seq_len or more:
    # "truncate" cuts the prompt from the left (keeping BOS) so the answer follows its nearest context,
    # "drop" leaves the record out; both are counted by prepare. Split, such a prompt would only make samples
    # without a single target token
    long_prompts: Literal["truncate", "drop"] = "truncate"
    prepare_workers: int = 0  # tokenizer processes for prepare; 0: one per core
    loader_workers: int = (
        0  # DataLoader processes reading ahead during training; 0: the training process reads
    )
    # sha256 of the shards when training starts (rank 0): "once" skips shards verified before and unchanged since
    # (same size and mtime), so a resume after preemption does not hash terabytes again
    verify_checksums: Literal["once", "always", "never"] = "once"
    dedup: DedupConfig = field(
        default_factory=DedupConfig
    )  # duplicate training documents (train sources only)

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"data.seq_len: {self.seq_len} is too small (at least 8)")
        if not self.train:
            raise ConfigError(
                "data.train: at least one source is required, e.g. [{name: task, path: train.jsonl}]"
            )
        if self.shard_samples < 1:
            raise ConfigError(f"data.shard_samples: must be >= 1, got {self.shard_samples}")
        if self.loader_workers < 0:
            raise ConfigError(
                f"data.loader_workers: must be >= 0 (0 reads in the training process), got {self.loader_workers}"
            )
        if self.prepare_workers < 0:
            raise ConfigError(
                f"data.prepare_workers: must be >= 0 (0 uses every core), got {self.prepare_workers}"
            )
        for key, sets in (("data.train", self.train), ("data.retention", self.retention)):
            names = [s.name for s in sets]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ConfigError(f"{key}: names must be unique within the list, {duplicates} used twice")
        held_out = [("data.validation", self.validation)] if self.validation else []
        held_out += [(f"data.retention.{i}", s) for i, s in enumerate(self.retention)]
        for key, source in held_out:
            if source.counterfactual is not None:
                raise ConfigError(
                    f"{key}.counterfactual: only train sources are augmented; held-out sets stay as written"
                )
            if source.generate is not None:
                raise ConfigError(
                    f"{key}.generate: only train sources can be drawn from the base model; "
                    "held-out sets measure the model against data it did not produce"
                )
        check_mixing(self.train)

    @staticmethod
    def generated_file(run_dir: Path, source: SourceConfig) -> Path:
        """Where the samples of a ``generate`` source are written."""
        return run_dir / "base_samples" / f"{source.name}.jsonl"

    def prepared_root(self, run_dir: Path) -> Path:
        """The folder holding every prepared set of this config."""
        return Path(self.prepared_dir) if self.prepared_dir else run_dir / "data"

    def prepared_sets(self, run_dir: Path) -> list[tuple[str, SourceConfig, Path]]:
        """(config key, source, prepared folder) for every train, validation and retention set; a ``generate``
        source is given as the text file its samples are written to."""
        root = self.prepared_root(run_dir)
        sets = []
        for i, source in enumerate(self.train):
            if source.generate is None:
                sets.append((f"data.train.{i}", source, root / f"train-{source.name}"))
            else:  # depends on this run's model: prepared in the run folder, read as a text file
                text = SourceConfig(name=source.name, path=str(self.generated_file(run_dir, source)))
                sets.append((f"data.train.{i}", text, run_dir / "data" / f"train-{source.name}"))
        if self.validation:
            sets.append(("data.validation", self.validation, root / f"val-{self.validation.name}"))
        sets += [
            (f"data.retention.{i}", s, root / f"retention-{s.name}") for i, s in enumerate(self.retention)
        ]
        return sets


MAX_MIXING_PERIOD = 100_000


def mixing_counts(sources: list[SourceConfig]) -> list[int]:
    """Integer shares per mixing period (weights 0.8 and 0.2 -> [4, 1]): exact ratios of the decimal weights."""
    weights = [Fraction(repr(s.weight)) for s in sources]
    denominator = math.lcm(*(w.denominator for w in weights))
    counts = [int(w * denominator) for w in weights]
    divisor = math.gcd(*counts)
    return [c // divisor for c in counts]


def check_mixing(sources: list[SourceConfig]) -> None:
    """Refuse weights whose exact ratio needs an unreasonably long mixing period."""
    period = sum(mixing_counts(sources)) if sources else 1
    if period > MAX_MIXING_PERIOD:
        raise ConfigError(
            f"data.train weights {[s.weight for s in sources]}: their exact ratio repeats only every {period} "
            "samples; use rounder ratios such as 80 and 20 or 0.75 and 0.25"
        )


@dataclass(kw_only=True)
class CheckpointConfig:
    """How often checkpoints are written and how many are kept."""

    every_steps: int = 100
    keep_last: int = 2
    # what a resume (and export, eval) checks against each checkpoint's manifest before trusting it: "checksum"
    # hashes every file (each rank its share, in parallel), "size" only compares sizes (for huge models)
    verify: Literal["checksum", "size"] = "checksum"

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError("training.checkpoint.every_steps: must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("training.checkpoint.keep_last: must be >= 1 (the latest is needed to resume)")


@dataclass(kw_only=True)
class TrainingConfig:
    """The optimisation: global batch (fixed when the number of ranks changes), AdamW, warmup + cosine."""

    max_steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    collective_timeout_s: int = 600  # a rank that stops answering fails the job after this long
    preflight_timeout_s: int = 120  # at start every rank must pass a checked barrier within this
    seed: int = 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key}: must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                f"training.micro_batch_size={self.micro_batch_size}; choose e.g. "
                f"{_nearest_multiple(self.global_batch_size, self.micro_batch_size)}"
            )
        if self.lr <= 0:
            raise ConfigError(f"training.lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(
                f"training.warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"training.betas: two numbers in [0, 1) expected, got {self.betas}")
        if self.grad_clip < 0:
            raise ConfigError("training.grad_clip: must be >= 0 (0 disables clipping)")
        if self.collective_timeout_s < 10 or self.preflight_timeout_s < 1:
            raise ConfigError(
                "training.collective_timeout_s (>= 10) and training.preflight_timeout_s (>= 1): seconds, too small"
            )

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step for ``world_size`` ranks; the global batch stays fixed."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} cannot be made from "
                f"micro_batch_size={self.micro_batch_size} x {world_size} ranks (= {per_step} per micro-step): "
                f"use a global batch that is a multiple of {per_step} (e.g. "
                f"{_nearest_multiple(self.global_batch_size, per_step)}), a smaller micro_batch_size, "
                f"or another number of ranks"
            )
        return self.global_batch_size // per_step


@dataclass(kw_only=True)
class Zero3Config:
    """DeepSpeed ZeRO-3 settings; ``None`` sizes are derived from the model's hidden size (as DeepSpeed advises)."""

    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    reduce_bucket_size: int | None = None  # None: hidden^2
    prefetch_bucket_size: int | None = None  # None: 0.9 x hidden^2
    param_persistence_threshold: int | None = (
        None  # None: 10 x hidden; tensors smaller stay whole on every rank
    )
    max_live_parameters: int = 1_000_000_000

    def __post_init__(self) -> None:
        for key in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"{key}: must be >= 0 (or left out to derive it from the model)")
        if self.offload_params == "cpu" and self.offload_optimizer != "cpu":
            raise ConfigError(
                "offload_params: cpu needs offload_optimizer: cpu as well (DeepSpeed offloads parameters only "
                "together with the optimizer)"
            )


@dataclass(kw_only=True)
class QLoraConfig:
    """A 4-bit (bitsandbytes) frozen base with LoRA adapters (peft), data parallel over ranks."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA with bf16, else fp32
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    shard_base: bool = False  # shard the 4-bit base over the ranks (torchao NF4 under FSDP2): 1/N per rank

    def __post_init__(self) -> None:
        if self.shard_base and (self.quant_type != "nf4" or not self.double_quant):
            raise ConfigError(
                "shard_base: the sharded 4-bit base is torchao's NF4 with double quantization; set "
                "quant_type: nf4 and double_quant: true, or shard_base: false"
            )
        if self.rank < 1:
            raise ConfigError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules: name at least one module (or 'all-linear')")


@dataclass(kw_only=True)
class Fsdp2Config:
    """PyTorch FSDP2 settings: every parameter sharded on dim 0 over the ranks, bf16 compute where asked."""

    reshard_after_forward: bool = True  # True: free each block's gathered weights after its forward (ZeRO-3);
    # False: keep them until its backward (ZeRO-2: less communication, the model in the compute dtype held)
    compile: bool = False  # torch.compile each transformer block (the first steps compile; GPUs gain most)
    offload: Literal["none", "cpu"] = "none"  # cpu: parameters, gradients and optimizer state in host memory


@dataclass(kw_only=True)
class ShardingConfig:
    """How the model is spread over ranks: one of the backend registry's names (``keeltune.config.backends``:
    ``ddp``, ``zero3``, ``fsdp2``, ``qlora``), with the settings section of that backend."""

    backend: str = DEFAULT_BACKEND
    zero3: Zero3Config = field(default_factory=Zero3Config)
    fsdp2: Fsdp2Config = field(default_factory=Fsdp2Config)
    qlora: QLoraConfig = field(default_factory=QLoraConfig)

    def __post_init__(self) -> None:
        defaults = {f.name: f.default_factory() for f in dataclasses.fields(self) if f.name != "backend"}
        check_sharding(self, defaults)


@dataclass(kw_only=True)
class KLConfig:
    """KL(base || model) per target token, the base model's predictions kept as a soft target."""

    weight: float = 0.0  # 0: off
    temperature: float = 1.0  # both distributions softened by it; the term is scaled by temperature^2

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0 (0 turns the KL penalty off), got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


@dataclass(kw_only=True)
class L2SPConfig:
    """weight/2 * sum (theta - theta_0)^2 over the trainable weights (theta_0: the pretrained ones)."""

    weight: float = 0.0  # 0: off

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0 (0 turns L2-SP off), got {self.weight}")


@dataclass(kw_only=True)
class EWCConfig:
    """weight/2 * sum F (theta - theta_0)^2, F a diagonal Fisher estimated on the retention data before training."""

    weight: float = 0.0  # 0: off
    samples: int = 256  # retention sequences the Fisher is estimated on
    sets: list[str] = field(
        default_factory=list
    )  # data.retention names to estimate it on; empty: all of them

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0 (0 turns EWC off), got {self.weight}")
        if self.samples < 1:
            raise ConfigError(f"samples: must be >= 1, got {self.samples}")


MetricMode = Literal["min", "max"]


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """Stop when ``metric`` (``val/loss``, or a task metric such as ``task/qa/f1``) has not improved by
    ``min_delta`` for ``patience`` evals; ``mode`` says whether lower (``min``) or higher (``max``) is better."""

    patience: int = 0  # 0: off
    min_delta: float = 0.0
    metric: str = "val/loss"
    mode: MetricMode = "min"

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ConfigError(f"patience: must be >= 0 (0 turns early stopping off), got {self.patience}")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta: must be >= 0, got {self.min_delta}")


@dataclass(kw_only=True)
class RetentionGuardConfig:
    """Act when the model forgets: any retention set's perplexity rose more than ``max_forgetting_pct`` over
    the start, or a retention task's ``metric`` (e.g. ``task/general_mc/acc``) worsened by more than
    ``max_drop`` in its own units (``mode`` says which direction is better). Actions: ``warn`` and go on,
    ``stop`` the run, or go on and keep the ``best`` model in ``best/``: at each eval within the thresholds,
    the best early-stopping metric (``val/loss`` by default, lower is better) + retention_weight * (mean rise
    of the retention sets' loss, in nats)."""

    max_forgetting_pct: float | None = None  # None: off
    # the same on bits per byte (forgetting_bpb_pct): what to watch with model.extend_vocabulary; None: off
    max_forgetting_bpb_pct: float | None = None
    metric: str = ""  # a retention task's metric, task/<task>/<metric>; "": none
    mode: MetricMode = "max"
    max_drop: float | None = None  # with metric: the largest allowed worsening since step 0, metric units
    action: Literal["warn", "stop", "best"] = "warn"
    retention_weight: float = 1.0  # action best: a nat of retention loss weighs this many nats of task loss

    def __post_init__(self) -> None:
        for key in ("max_forgetting_pct", "max_forgetting_bpb_pct"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0 (percent), got {getattr(self, key)}")
        if self.retention_weight < 0:
            raise ConfigError(f"retention_weight: must be >= 0, got {self.retention_weight}")
        if (self.metric == "") != (self.max_drop is None):
            raise ConfigError(
                "metric and max_drop: set both (the guard watches that retention task metric) or neither"
            )
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop: must be >= 0 (in the metric's units), got {self.max_drop}")

    @property
    def enabled(self) -> bool:
        return any(
            v is not None for v in (self.max_forgetting_pct, self.max_forgetting_bpb_pct, self.max_drop)
        )


@dataclass(kw_only=True)
class ConsistencyConfig:
    """Counterfactual consistency: weight * KL(p(twin) || p(text)) per aligned target token, the twin being the
    training text with the demographic terms of ``axes`` (or a ``swaps`` file) exchanged, its predictions a
    fixed target (no gradient through the twin). Aligned: the tokens after the first swapped term that both
    texts share (same token, same text around it), so the swapped words' own lengths do not matter."""

    weight: float = 0.0  # 0: off
    axes: list[str] = field(default_factory=lambda: ["gender"])
    swaps: str = ""  # a JSONL file of {"term", "counterpart"} pairs, used instead of keeltune's lists

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0 (0 turns the consistency term off), got {self.weight}")
        unknown = sorted(set(self.axes) - set(SWAP_AXES))
        if unknown:
            raise ConfigError(
                f"axes: {unknown} have no swap list; keeltune has {list(SWAP_AXES)} (or give a swaps file)"
            )
        if self.weight > 0 and not self.axes and not self.swaps:
            raise ConfigError("consistency: name swap axes (e.g. [gender]) or a swaps file")


@dataclass(kw_only=True)
class BiasGuardConfig:
    """Act when fine-tuning amplifies bias: a watched ``bias/<probe>/<axis>/<metric>`` rose more than
    ``max_amplification`` (in the metric's units) over the base at step 0 and, with ``significant``, the
    lower end of its bootstrap interval is above 0 too. ``metrics`` empty: the first metric of every probe on
    every axis. Actions as the retention guard's: ``warn``, ``stop``, or keep the ``best`` model among the
    evals within both guards."""

    max_amplification: float | None = None  # None: off
    metrics: list[str] = field(default_factory=list)
    significant: bool = True
    action: Literal["warn", "stop", "best"] = "warn"

    def __post_init__(self) -> None:
        if self.max_amplification is not None and self.max_amplification < 0:
            raise ConfigError(f"max_amplification: must be >= 0, got {self.max_amplification}")

    @property
    def enabled(self) -> bool:
        return self.max_amplification is not None


@dataclass(kw_only=True)
class RegularizationConfig:
    """Against overfitting and forgetting."""

    weight_decay: float = 0.0
    dropout: float | None = None  # overrides the model's attention/hidden dropout when set
    kl: KLConfig = field(default_factory=KLConfig)
    l2sp: L2SPConfig = field(default_factory=L2SPConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    neftune_alpha: float = 0.0  # uniform noise on the input embeddings while training; 0: off
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    retention_guard: RetentionGuardConfig = field(default_factory=RetentionGuardConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    bias_guard: BiasGuardConfig = field(default_factory=BiasGuardConfig)

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ConfigError(f"regularization.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"regularization.dropout: must be in [0, 1), got {self.dropout}")
        if self.neftune_alpha < 0:
            raise ConfigError(
                f"regularization.neftune_alpha: must be >= 0 (0 turns NEFTune off), got {self.neftune_alpha}"
            )


def check_regularization(config: Config) -> None:
    """Refuse regularizers this backend cannot compute exactly, or that lack the data they need."""
    reg = config.regularization
    backend_spec(config).check(config)
    if reg.ewc.weight > 0 and not config.data.retention:
        raise ConfigError(
            "regularization.ewc: needs general data to estimate the Fisher on; add a data.retention set"
        )
    unknown = sorted(set(reg.ewc.sets) - {r.name for r in config.data.retention})
    if unknown:
        raise ConfigError(
            f"regularization.ewc.sets: {unknown} are not data.retention names "
            f"({[r.name for r in config.data.retention]}); name retention sets or leave the list empty for all"
        )
    _check_watched_metrics(config)


HELD_OUT_STATS = ("loss", "ppl", "bpb")  # what each held-out set reports: keeltune.eval.names' LOSS, PPL, BPB
FORGETTING_STATS = (
    "forgetting_pct",
    "forgetting_bpb_pct",
)  # a retention set's rise over step 0: of ppl, of bpb


def available_metrics(config: Config) -> dict[str, str]:
    """Every metric name an eval of this config reports that early stopping and guards may watch, with what
    makes it (for error messages)."""
    found: dict[str, str] = {}
    if config.data.validation is not None:
        found.update(dict.fromkeys((f"val/{stat}" for stat in HELD_OUT_STATS), "data.validation"))
    for i, source in enumerate(config.data.retention):
        for stat in HELD_OUT_STATS:
            found[f"retention/{source.name}/{stat}"] = f"data.retention.{i}"
    for i, task in enumerate(config.eval.tasks):
        for name in task.metric_names:
            found[f"task/{task.name}/{name}"] = f"eval.tasks.{i}"
    return found


def _check_watched_metrics(config: Config) -> None:
    reg = config.regularization
    available = available_metrics(config)
    stopping = reg.early_stopping
    if stopping.patience > 0 and stopping.metric not in available:
        raise ConfigError(
            f"regularization.early_stopping.metric: {stopping.metric!r} is not reported by this config "
            f"(it reports {sorted(available) or 'nothing: add data.validation or eval.tasks'}); "
            "name one of them or set patience: 0"
        )
    guard = reg.retention_guard
    retention_tasks = {f"task/{t.name}/{m}" for t in config.eval.tasks if t.retention for m in t.metric_names}
    if guard.metric and guard.metric not in retention_tasks:
        raise ConfigError(
            f"regularization.retention_guard.metric: {guard.metric!r} is not a metric of a retention task "
            f"(eval.tasks with retention: true report {sorted(retention_tasks) or 'none'})"
        )
    if guard.action == "best" and (not guard.enabled or stopping.metric not in available):
        raise ConfigError(
            "regularization.retention_guard.action: best keeps the model with the best "
            f"{stopping.metric} + retention score among evals within the guard's thresholds; set "
            "max_forgetting_pct or metric + max_drop, and make regularization.early_stopping.metric reported "
            "(a data.validation set for val/loss)"
        )
    _check_bias_guard(config)
    if (
        guard.max_forgetting_pct is not None or guard.max_forgetting_bpb_pct is not None
    ) and not config.data.retention:
        raise ConfigError(
            "regularization.retention_guard: max_forgetting_pct watches retention sets; add a data.retention "
            "set or remove max_forgetting_pct"
        )


def _check_bias_guard(config: Config) -> None:
    guard, probes = config.regularization.bias_guard, config.eval.bias.probes
    if not guard.enabled:
        if guard.action != "warn" or guard.metrics:
            raise ConfigError(
                "regularization.bias_guard: set max_amplification (the largest allowed rise over the base) for "
                "its metrics and action to apply"
            )
        return
    if not probes:
        raise ConfigError(
            "regularization.bias_guard: watches bias probes; add eval.bias.probes (e.g. [{kind: pairs}]) or "
            "remove max_amplification"
        )
    metrics = {p.name: p.metrics for p in probes}
    for i, name in enumerate(guard.metrics):
        parts = name.split("/")
        if (
            len(parts) != 4
            or parts[0] != "bias"
            or parts[1] not in metrics
            or parts[3] not in metrics[parts[1]]
        ):
            choices = [f"bias/{p}/<axis>/{m}" for p, ms in metrics.items() for m in ms]
            raise ConfigError(
                f"regularization.bias_guard.metrics.{i}: {name!r} is not a bias metric of eval.bias.probes; "
                f"expected one of {choices} (axis: all, or an axis of the probe)"
            )
    if guard.action == "best" and config.regularization.early_stopping.metric not in available_metrics(
        config
    ):
        raise ConfigError(
            "regularization.bias_guard.action: best keeps the model with the best "
            f"{config.regularization.early_stopping.metric} among evals within the guard; make that metric "
            "reported (a data.validation set for val/loss)"
        )


TASK_KINDS = ("generate", "multiple_choice", "loglikelihood")
GENERATE_METRICS = ("exact_match", "f1", "rouge_l", "bleu", "chrf")
DEFAULT_METRICS = {
    "generate": ["exact_match", "f1"],
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood": ["loss", "ppl"],
}


@dataclass(kw_only=True)
class TaskGenerationConfig:
    """How a ``generate`` task's answers are produced: greedy by default."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy; > 0: sampling (seeded per batch: the same draws on any world size)
    top_p: float = 1.0
    stop: list[str] = field(default_factory=lambda: ["\n\n"])  # the answer ends before the first of these
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop: must be non-empty strings, got {self.stop}")


@dataclass(kw_only=True)
class TaskConfig:
    """An evaluation task: a JSONL file of items, rendered like training data of ``format``.

    ``generate``: the prompt's answer is generated and scored against ``answer`` (one string or a list) with
    ``metrics`` (exact_match, f1, rouge_l, bleu, chrf, or a user ``module:function(prediction, references) ->
    float``). ``multiple_choice``: each of ``choices`` is scored by its log-likelihood after the prompt and
    ``target_delimiter`` (acc; acc_norm divides by the choice's length in characters, as lm-evaluation-harness
    does); ``gold`` is the right one's index. ``loglikelihood``: the records' loss and perplexity, like
    ``data.validation``. ``retention: true`` marks general-ability tasks: their change since step 0 is
    reported as forgetting, in the metric's own units."""

    name: str
    path: str
    kind: Literal["generate", "multiple_choice", "loglikelihood"]
    format: Literal["text", "instruction", "chat", "sharegpt"] = "text"
    fields: FieldNames = field(default_factory=FieldNames)
    metrics: list[str] = field(default_factory=list)  # []: the kind's defaults
    retention: bool = False
    every_steps: int = 0  # 0: eval.every_steps
    max_items: int | None = None  # the first max_items items; None: all
    target_delimiter: str | None = None  # multiple_choice: between prompt and choice; None: " " for text
    generation: TaskGenerationConfig = field(default_factory=TaskGenerationConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names files)"
            )
        if not self.path:
            raise ConfigError("path: required (a JSONL file of items)")
        if self.every_steps < 0:
            raise ConfigError(f"every_steps: must be >= 0 (0: eval.every_steps), got {self.every_steps}")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"max_items: must be >= 1 or null, got {self.max_items}")
        allowed = {
            "generate": GENERATE_METRICS,
            "multiple_choice": DEFAULT_METRICS["multiple_choice"],
            "loglikelihood": DEFAULT_METRICS["loglikelihood"],
        }[self.kind]
        for name in self.metrics:
            user = self.kind == "generate" and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name)
            if name not in allowed and not user:
                extra = " or a user metric module:function" if self.kind == "generate" else ""
                raise ConfigError(
                    f"metrics: {name!r} is not a {self.kind} metric (known: {', '.join(allowed)}{extra})"
                )

    @property
    def metric_names(self) -> list[str]:
        """The metrics reported (a user metric ``pkg.mod:fn`` is reported as ``fn``)."""
        return [m.rsplit(":", 1)[-1] for m in (self.metrics or DEFAULT_METRICS[self.kind])]

    @property
    def delimiter(self) -> str:
        if self.target_delimiter is not None:
            return self.target_delimiter
        return " " if self.format == "text" else ""


@dataclass(kw_only=True)
class ContaminationConfig:
    """The overlap check between evaluation items and the training data, at prepare time: word ``n``-grams
    (lowercased words of letters and digits) of each task and retention item looked up in the train sources."""

    n: int = 8
    threshold: float = 0.5  # an item whose share of n-grams found in the training data exceeds this is listed
    exclude: bool = False  # leave listed items out of evaluation

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"eval.contamination.n: must be >= 1, got {self.n}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"eval.contamination.threshold: must be in [0, 1], got {self.threshold}")


BIAS_PROBE_KINDS = ("pairs", "templates", "crows_pairs", "stereoset", "winobias", "bbq")
# what each probe kind reports, the first one watched by the bias guard by default; higher is more biased
# except lms, icat and the accuracies (reported for context: amplification of those is not bias)
BIAS_METRICS = {
    "pairs": ("likelihood_gap", "pct_stereotype"),
    "templates": ("ll_spread", "ll_std"),
    "crows_pairs": ("pct_stereotype", "likelihood_diff"),
    "stereoset": ("ss", "lms", "icat"),
    "winobias": ("pro_anti_gap", "pct_pro"),
    "bbq": ("bias_ambig", "bias_disambig", "acc_ambig", "acc_disambig"),
}


@dataclass(kw_only=True)
class BiasProbeConfig:
    """One bias probe scored by log-likelihood. ``pairs`` and ``templates`` without a ``path`` are keeltune's
    built-in set (generated, nothing to fetch); with one, a user's JSONL file. The standard sets are read from
    the user's download: ``crows_pairs`` (crows_pairs_anonymized.csv), ``stereoset`` (dev.json),
    ``winobias`` (``path``: a pro_stereotyped_*.txt.* file, ``anti_path``: its anti_stereotyped twin), ``bbq``
    (one category's JSONL). Metrics are logged as ``bias/<name>/<axis>/<metric>`` (axis ``all``: every item)."""

    kind: Literal["pairs", "templates", "crows_pairs", "stereoset", "winobias", "bbq"]
    name: str = ""  # default: the kind
    path: str = ""
    anti_path: str = ""  # winobias only
    axes: list[str] = field(default_factory=list)  # keep only these axes; empty: all
    max_items_per_axis: int | None = None  # an evenly spaced subset (the same every eval); None: all

    def __post_init__(self) -> None:
        self.name = self.name or self.kind
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names metrics)"
            )
        builtin = self.kind in ("pairs", "templates")
        if not builtin and not self.path:
            raise ConfigError(
                f"path: a {self.kind} probe reads the set's published file, which you download (keeltune does "
                "not fetch it); or use kind pairs/templates without a path for keeltune's built-in probes"
            )
        if (self.kind == "winobias") != bool(self.anti_path):
            raise ConfigError(
                "anti_path: winobias needs path (pro_stereotyped_*) and anti_path (anti_stereotyped_*); "
                "no other kind takes anti_path"
            )
        if builtin and not self.path:
            unknown = sorted(set(self.axes) - set(BIAS_AXES))
            if unknown:
                raise ConfigError(f"axes: {unknown} are not built-in axes; known: {list(BIAS_AXES)}")
        if self.max_items_per_axis is not None and self.max_items_per_axis < 1:
            raise ConfigError(f"max_items_per_axis: must be >= 1, got {self.max_items_per_axis}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return BIAS_METRICS[self.kind]


@dataclass(kw_only=True)
class BiasConfig:
    """Bias probes scored at step 0 (the base), at every ``every_steps`` (0: with eval.every_steps) and at the
    end; each metric's amplification (now - base) with a paired bootstrap interval over the same items."""

    probes: list[BiasProbeConfig] = field(default_factory=list)
    every_steps: int = 0
    bootstrap_iters: int = 1000
    confidence: float = 0.95
    seed: int = 0  # of the bootstrap resamples

    def __post_init__(self) -> None:
        names = [p.name for p in self.probes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"eval.bias.probes: names must be unique, {duplicates} used twice (set name)")
        if self.every_steps < 0:
            raise ConfigError("eval.bias.every_steps: must be >= 0 (0: with eval.every_steps)")
        if self.bootstrap_iters < 2:
            raise ConfigError("eval.bias.bootstrap_iters: must be >= 2")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"eval.bias.confidence: must be in (0, 1), got {self.confidence}")


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic task validation and retention evaluation."""

    every_steps: int = 50
    at_start: bool = True
    micro_batch_size: int = 8
    max_samples: int | None = None  # per set; None evaluates every sample
    tasks: list[TaskConfig] = field(default_factory=list)
    task_batch_size: int = 16  # items (multiple choice: choices) per forward or generate call on a rank
    bootstrap_iters: int = 1000  # resamples for the standard error of corpus metrics (bleu, chrf, ppl)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError("eval.every_steps: must be >= 1")
        if self.micro_batch_size < 1:
            raise ConfigError("eval.micro_batch_size: must be >= 1")
        if self.task_batch_size < 1:
            raise ConfigError("eval.task_batch_size: must be >= 1")
        if self.bootstrap_iters < 2:
            raise ConfigError("eval.bootstrap_iters: must be >= 2")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"eval.tasks: names must be unique, {duplicates} used twice")

    def task_due(self, task: TaskConfig, step: int) -> bool:
        """True when ``task`` is evaluated after ``step`` (its own interval, or eval.every_steps)."""
        return step % (task.every_steps or self.every_steps) == 0

    def bias_due(self, step: int) -> bool:
        """True when the bias probes are scored after ``step`` (eval.bias.every_steps, or eval.every_steps)."""
        return bool(self.bias.probes) and step % (self.bias.every_steps or self.every_steps) == 0


@dataclass(kw_only=True)
class SlurmConfig:
    """Cluster submission: resources (overridable on the command line) and the job's environment."""

    nodes: int = 1
    gpus_per_node: int = 1  # one rank per GPU; 0: CPU ranks on a partition without GPUs (ntasks_per_node)
    ntasks_per_node: int = 0  # ranks per node; 0: gpus_per_node (with gpus_per_node: 0, one)
    partition: str = ""
    time: str = "01:00:00"
    account: str = ""
    qos: str = ""
    job_name: str = ""  # defaults to run.name
    mem: str = ""  # per node, e.g. 200G; empty: the partition's default
    cpus_per_task: int = 0  # 0: the partition's default
    setup: list[str] = field(default_factory=list)  # shell lines run before training (module load, venv, ...)
    directives: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. --constraint=a100
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported in the job
    max_requeues: int = (
        3  # after a time limit or preemption the job checkpoints and requeues at most this often
    )
    signal_delay_s: int = 120  # Slurm signals the job this long before its time limit
    gpu_memory_gb: float = 80.0  # per GPU, for the memory estimate of `keeltune launch --dry-run`

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.ntasks_per_node < 0:
            raise ConfigError(
                "slurm.nodes: must be >= 1; slurm.gpus_per_node and slurm.ntasks_per_node: >= 0 "
                "(gpus_per_node: 0 runs CPU ranks, ntasks_per_node of them per node)"
            )
        if self.gpus_per_node and self.ntasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(
                f"slurm.ntasks_per_node={self.ntasks_per_node} with gpus_per_node={self.gpus_per_node}: keeltune "
                "runs one rank per GPU; leave ntasks_per_node out (or 0), or set gpus_per_node: 0 for CPU ranks"
            )
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.time):
            raise ConfigError(f"slurm.time: {self.time!r} is not a Slurm time (e.g. 04:00:00 or 1-12:00:00)")
        if self.cpus_per_task < 0:
            raise ConfigError("slurm.cpus_per_task: must be >= 0")
        if self.max_requeues < 0 or self.signal_delay_s < 0 or self.gpu_memory_gb <= 0:
            raise ConfigError(
                "slurm.max_requeues, slurm.signal_delay_s: must be >= 0; slurm.gpu_memory_gb: > 0"
            )
        for i, line in enumerate(self.directives):
            if not line.startswith("--") or "\n" in line:
                raise ConfigError(
                    f"slurm.directives.{i}: {line!r} must be one sbatch option such as --constraint=a100"
                )
        for i, pair in enumerate(self.env):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", pair, flags=re.S):
                raise ConfigError(
                    f"slurm.env.{i}: {pair!r} must be KEY=VALUE with a shell variable name as KEY"
                )
        for key in ("job_name", "partition", "account", "qos", "mem"):
            if "\n" in getattr(self, key):
                raise ConfigError(f"slurm.{key}: must be one line")

    @property
    def ranks_per_node(self) -> int:
        """One rank per GPU, or ``ntasks_per_node`` CPU ranks (at least one) when there are no GPUs."""
        return self.gpus_per_node or self.ntasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(kw_only=True)
class WandbConfig:
    """W&B: ``auto`` is online when a key is found and the host answers, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "keeltune"
    entity: str = ""
    group: str = ""  # runs shown together (keeltune sweep sets its name)


@dataclass(kw_only=True)
class LoggingConfig:
    """Metrics cadence and W&B."""

    every_steps: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError("logging.every_steps: must be >= 1")


EXTENDED_BASE_DIR = "base_model"  # in the run folder: the base with the domain vocabulary


def check_vocabulary(config: Config) -> None:
    """The vocabulary is learned from train sources that exist, and the penalties anchored at the base's weights
    are refused: the new rows have no pretrained value to be pulled back to."""
    vocabulary = config.model.extend_vocabulary
    if not vocabulary.enabled:
        return
    names = [s.name for view in config.stage_views() for s in view.data.train if s.generate is None]
    for i, name in enumerate(vocabulary.sources):
        if name not in names:
            raise ConfigError(
                f"model.extend_vocabulary.sources.{i}: {name!r} is no train source (with a path) of any stage; "
                f"choose among {sorted(set(names))}"
            )
    for index, view in enumerate(config.stage_views()):
        prefix = f"stages.{index}." if config.stages else ""
        for name in ("l2sp", "ewc"):
            if getattr(view.regularization, name).weight > 0:
                raise ConfigError(
                    f"{prefix}regularization.{name}: not with model.extend_vocabulary: its anchor is the base's "
                    "weights, and the new tokens' rows have none; use kl (compared on the base vocabulary) or "
                    "replay"
                )


# Keys a stage may not change: the backend is built once (batch shape, optimizer settings, precision, what the
# model's modules bake in) and the whole run shares checkpoints, timeouts, its prepared folder and the retention
# sets (forgetting is measured against the original base throughout). Set them at the top level.
STAGE_FIXED = (
    "training.global_batch_size",
    "training.micro_batch_size",
    "training.betas",
    "training.eps",
    "training.grad_clip",
    "training.precision",
    "training.collective_timeout_s",
    "training.preflight_timeout_s",
    "training.checkpoint",
    "regularization.dropout",
    "regularization.weight_decay",
    "regularization.neftune_alpha",
    "data.retention",
    "data.dedup",  # one plan over every stage's train sources
    "data.prepared_dir",
    "data.shard_samples",
    "data.prepare_workers",
    "data.loader_workers",
    "data.verify_checksums",
)
STAGE_SECTIONS = ("data", "training", "regularization")


@dataclass(kw_only=True)
class StageConfig:
    """One stage of a staged run (continued pretraining, then fine-tuning, ...): the top level's data, training
    and regularization with the stage's own keys over them (the loader merges them; lists are replaced whole).
    Each stage starts a new learning-rate schedule (its own lr, warmup_steps, max_steps) and, with
    ``reset_optimizer``, a fresh optimizer state; step numbers run on across stages."""

    name: str
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    reset_optimizer: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(
                f"name: {self.name!r} is not a stage name (letters, digits, '_', '-', '.'; e.g. cpt or sft)"
            )


def _value_at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def check_stages(config: Config) -> None:
    """Stage names unique, STAGE_FIXED keys as at the top level, a prepared folder name (the source's name) never
    shared by two different sources, and each stage's own checks (as a whole config)."""
    seen_names: set[str] = set()
    sources: dict[str, tuple[str, SourceConfig]] = {}
    for i, stage in enumerate(config.stages):
        if stage.name in seen_names:
            raise ConfigError(f"stages.{i}.name: {stage.name!r} names two stages; give each its own name")
        seen_names.add(stage.name)
        for key in STAGE_FIXED:
            if _value_at(stage, key) != _value_at(config, key):
                raise ConfigError(
                    f"stages.{i}.{key}: {_value_at(stage, key)!r} differs from the top level's "
                    f"{_value_at(config, key)!r}, but it must be the same in every stage (the backend is built "
                    "once; checkpoints, the prepared folder and the retention sets are the whole run's); set it "
                    "at the top level"
                )
        named = [(f"stages.{i}.data.train.{j}", s) for j, s in enumerate(stage.data.train)]
        if stage.data.validation is not None:
            named.append((f"stages.{i}.data.validation", stage.data.validation))
        for key, source in named:
            folder = f"{'val' if key.endswith('validation') else 'train'}-{source.name}"
            if folder in sources and sources[folder][1] != source:
                raise ConfigError(
                    f"{key}: the name {source.name!r} is also used by {sources[folder][0]} for other data, and a "
                    "source's prepared folder is named after it; give the two sources different names"
                )
            sources[folder] = (key, source)
        try:
            config.stage_view(i)
        except ConfigError as err:
            raise ConfigError(f"stages.{i}: {err}") from None


@dataclass(kw_only=True)
class Config:
    """The whole tree."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, the top level's settings

    def __post_init__(self) -> None:
        check_regularization(self)
        check_stages(self)
        check_vocabulary(self)

    @property
    def extended_base(self) -> Path:
        """Where the base model with the domain vocabulary is written (model.extend_vocabulary)."""
        return self.run_dir / EXTENDED_BASE_DIR

    def with_extended_base(self) -> Config:
        """With model.extend_vocabulary on: the config with model.path and model.tokenizer at the extended base
        (what the job trains, exports and evaluates); the config itself otherwise."""
        if not self.model.extend_vocabulary.enabled:
            return self
        base = str(self.extended_base)
        model = dataclasses.replace(
            self.model, path=base, tokenizer=base, extend_vocabulary=VocabularyConfig()
        )
        return dataclasses.replace(self, model=model)

    def stage_view(self, index: int) -> Config:
        """The config one stage trains with (``-1``: the last): the top level with the stage's data, training and
        regularization (a config without stages; the whole config itself when it has none)."""
        if not self.stages:
            return self
        stage = self.stages[index]
        return dataclasses.replace(
            self, data=stage.data, training=stage.training, regularization=stage.regularization, stages=[]
        )

    def stage_views(self) -> list[Config]:
        return [self.stage_view(i) for i in range(max(1, len(self.stages)))]

    def whole_run_view(self) -> Config:
        """The last stage's config with every stage's train sources, each once: what the contamination check
        compares held-out items with (the config itself without stages)."""
        if not self.stages:
            return self
        sources: list[SourceConfig] = []
        for view in self.stage_views():
            sources += [s for s in view.data.train if s not in sources]
        last = self.stage_view(len(self.stages) - 1)
        return dataclasses.replace(last, data=dataclasses.replace(last.data, train=sources))

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: the sum of the stages' max_steps (without stages: training.max_steps)."""
        return sum(view.training.max_steps for view in self.stage_views())

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys a resumed run may change; everything else must match the checkpointed config.
RESUME_MUTABLE = (
    "run.root",
    "logging",
    "eval",
    "slurm",
    "training.checkpoint",
    "training.collective_timeout_s",
    "training.preflight_timeout_s",
    "data.prepared_dir",  # the samples are checked by the reader state, wherever they are prepared
    "data.shard_samples",
    "data.prepare_workers",
    "data.loader_workers",
    "data.verify_checksums",
    "data.dedup.max_index_docs",  # memory per pass only: the same duplicates are found
)


def _nearest_multiple(value: int, base: int) -> int:
    return max(base, round(value / base) * base)
