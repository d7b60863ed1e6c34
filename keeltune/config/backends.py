"""The backend registry: one table, name -> what the backend is. Torch-free, so the login node checks configs
and estimates memory with it; ``module`` (build and export, with torch) is imported only when a run needs it
(``keeltune.sharding.backends``). Adding a backend: its module under ``keeltune/sharding/`` with ``build`` and
``export_checkpoint``, and one entry here."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from keeltune.config.errors import ConfigError
from keeltune.config.plan import block_matrix_shapes, deepspeed_summary, weight_shapes

if TYPE_CHECKING:
    from keeltune.config.schema import Config, ShardingConfig

DEFAULT_BACKEND = "ddp"  # a full replica per rank: what one process or plain data parallel runs
Bytes = Callable[["Config", dict[str, int], int], float]  # (config, model shape, ranks) -> bytes per GPU


def _no_check(config: Config) -> None:
    """Nothing to check beyond the common sections."""


@dataclass(frozen=True)
class BackendSpec:
    module: str  # the module with build(config, parallel, *, keep_reference) and export_checkpoint(...)
    summary: str
    states_bytes: Bytes  # model and optimizer states per GPU, held for the whole run
    regularizer_bytes: Bytes  # what the active regularizers keep (base copy, anchors, Fisher) per GPU
    check: Callable[[Config], None] = _no_check  # checks of the whole config this backend needs
    settings: str | None = None  # its own section, sharding.<settings>
    refuses: dict[str, str] = field(
        default_factory=dict
    )  # another backend's section -> why not with this one
    adapters: bool = False  # trains adapters over a frozen base (export --merge gives the full model)
    describe: Callable[[Config, int], list[str]] | None = None  # extra lines `keeltune config` shows
    gathered_bytes: Bytes | None = None  # parameters gathered whole for compute, at the peak, per GPU
    fixed_ranks: bool = False  # its checkpoints resume only on the number of ranks that wrote them
    check_ranks: Callable[[Config, int], None] = lambda config, ranks: None  # checks for a number of ranks


def fixed_ranks_refusal(checkpoint: object, saved: int, backend: str) -> str:
    """Why a checkpoint of a ``fixed_ranks`` backend written by ``saved`` ranks cannot resume on others."""
    return (
        f"{checkpoint}: this {backend} checkpoint was written by {saved} rank(s) and its optimizer state is "
        f"partitioned that way; resume with {saved} rank(s) (e.g. --nproc {saved} or nodes x gpus_per_node = "
        f"{saved}), or `keeltune export` it and start a new run from the export. Runs with sharding.backend: "
        "fsdp2 resume on any number of ranks"
    )


def _regularized(config: Config) -> tuple[bool, bool, bool]:
    """(KL keeps the base, L2-SP or EWC keep pretrained weights, EWC keeps a Fisher)."""
    reg = config.regularization
    return reg.kl.weight > 0, reg.l2sp.weight > 0 or reg.ewc.weight > 0, reg.ewc.weight > 0


def _ddp_states(config: Config, shape: dict[str, int], ranks: int) -> float:
    return 16.0 * shape["params"]  # fp32 weights, gradients, AdamW's two moments


def _ddp_regularizers(config: Config, shape: dict[str, int], ranks: int) -> float:
    kl, anchored, ewc = _regularized(config)  # one fp32 base copy, whose weights are also the anchors
    return (4 * (kl or anchored) + 4 * ewc) * shape["params"]


def _zero3_states(config: Config, shape: dict[str, int], ranks: int) -> float:
    offloaded = config.sharding.zero3.offload_optimizer == "cpu"
    return (4 + (0 if offloaded else 12)) * shape["params"] / ranks


def _zero3_gathered(config: Config, shape: dict[str, int], ranks: int) -> float:
    return 2 * 2 * shape["params"] / shape["layers"]  # two layers' bf16 parameters gathered at a time


def _compute_bytes(config: Config) -> int:
    """Bytes per parameter in the compute dtype (bf16 on GPUs unless precision is fp32)."""
    return 4 if config.training.precision == "fp32" else 2


def _root_params(shape: dict[str, int]) -> int:
    """Parameters outside the transformer blocks: the input embeddings, and the output layer unless tied."""
    return shape["vocab"] * shape["hidden"] * (1 if shape.get("tied", 1) else 2)


def _fsdp2_states(config: Config, shape: dict[str, int], ranks: int) -> float:
    """fp32 weights, gradients and AdamW's two moments, sharded: 16 B / ranks per parameter (host memory with
    offload)."""
    return 0.0 if config.sharding.fsdp2.offload == "cpu" else 16.0 * shape["params"] / ranks


def _fsdp2_gathered(config: Config, shape: dict[str, int], ranks: int) -> float:
    """The root (embeddings, output layer) stays gathered from forward to backward; blocks are gathered two at a
    time (one computing, one prefetched), or all of them without resharding after forward."""
    if ranks == 1:
        return 0.0  # one rank: the shard is the whole parameter, nothing is gathered apart
    root = _root_params(shape)
    block = (shape["params"] - root) / shape["layers"]
    blocks = shape["layers"] if not config.sharding.fsdp2.reshard_after_forward else min(2, shape["layers"])
    return _compute_bytes(config) * (root + blocks * block)


def _zero3_regularizers(config: Config, shape: dict[str, int], ranks: int) -> float:
    kl, anchored, ewc = _regularized(
        config
    )  # partitioned: a bf16 base, fp32 anchors and Fisher, each / ranks
    return (2 * kl + 4 * anchored + 4 * ewc) * shape["params"] / ranks


def _qlora_states(config: Config, shape: dict[str, int], ranks: int) -> float:
    """NF4 with double quantization on the blocks' matrices (0.5 + 1/64 + 4/16384 B per weight: codes, int8
    scales, a factor per 256 scales), the other weights in fp32 (4 B), fp32 adapters with their AdamW moments
    and gradients (16 B); all of it / ranks with ``shard_base``. The adapters: rank x (in + out) for each
    adapted matrix, ~7 a block."""
    qlora = config.sharding.qlora
    lora = 2 * qlora.rank * shape["hidden"] * 7 * shape["layers"]
    matrices = shape.get("block_matrices", shape["params"])
    total = (0.5 + 1 / 64 + 4 / 16384) * matrices + 4 * (shape["params"] - matrices) + 16 * lora
    return total / ranks if qlora.shard_base else total


def _qlora_regularizers(config: Config, shape: dict[str, int], ranks: int) -> float:
    return 0.0  # the base is the model with adapters off; anchors and changes are the adapters'


NF4_GROUP = (
    64 * 256
)  # NF4: a scale per 64 weights, int8 scales in groups of 256: a rank's rows hold whole groups


def check_shardable(shapes: list[list[int]], ranks: int) -> None:
    """Every 4-bit matrix (``shapes``) splits into ``ranks`` equal row blocks of whole NF4 scale groups;
    otherwise say which numbers of ranks would do."""

    def fits(n: int) -> bool:
        return all(rows % n == 0 and (rows // n * cols) % NF4_GROUP == 0 for rows, cols in shapes)

    if fits(ranks):
        return
    distinct = sorted({tuple(shape) for shape in shapes})[:4]
    working = [n for n in range(1, 129) if fits(n)]
    if not working:
        raise ConfigError(
            f"sharding.qlora.shard_base: the 4-bit weights (shapes {distinct}) are not whole groups of "
            f"{NF4_GROUP} weights, which torchao's NF4 needs; use shard_base: false for this model"
        )
    raise ConfigError(
        f"sharding.qlora.shard_base: the 4-bit weights (shapes {distinct}) do not split into {ranks} equal row "
        f"blocks of whole {NF4_GROUP}-weight scale groups; train on one of {working[:12]} ranks, or with "
        "shard_base: false"
    )


def _check_qlora_ranks(config: Config, ranks: int) -> None:
    if config.sharding.qlora.shard_base and Path(config.model.path).is_dir():
        check_shardable(block_matrix_shapes(weight_shapes(config.model.path)), ranks)


def _check_qlora(config: Config) -> None:
    if config.sharding.qlora.shard_base and config.regularization.l2sp.weight > 0:
        raise ConfigError(
            "regularization.l2sp: not supported with sharding.qlora.shard_base (the adapters' weight-change "
            "penalty needs whole adapters on every rank); use regularization.kl or replay, or shard_base: false"
        )
    if config.sharding.qlora.shard_base and config.model.extend_vocabulary.enabled:
        raise ConfigError(
            "model.extend_vocabulary: not supported with sharding.qlora.shard_base (the new rows train through "
            "peft's trainable tokens, which are not sharded); use shard_base: false or backend fsdp2"
        )
    if config.regularization.ewc.weight > 0:
        raise ConfigError(
            "regularization.ewc: not supported with sharding.backend: qlora (gradients never reach the 4-bit "
            "weights, and a Fisher over them would cost 8x the 4-bit model's memory); use regularization.l2sp "
            "(under qlora it penalises the adapters' weight change) or regularization.kl, or replay general data"
        )


BACKENDS: dict[str, BackendSpec] = {
    "ddp": BackendSpec(
        module="keeltune.sharding.ddp",
        summary="a full replica per rank, gradients averaged (torch DDP)",
        states_bytes=_ddp_states,
        regularizer_bytes=_ddp_regularizers,
    ),
    "zero3": BackendSpec(
        module="keeltune.sharding.zero3",
        summary="DeepSpeed ZeRO-3 full fine-tuning: parameters, gradients and optimizer state partitioned",
        states_bytes=_zero3_states,
        regularizer_bytes=_zero3_regularizers,
        settings="zero3",
        describe=deepspeed_summary,
        gathered_bytes=_zero3_gathered,
        fixed_ranks=True,
    ),
    "fsdp2": BackendSpec(
        module="keeltune.sharding.fsdp2",
        summary="PyTorch FSDP2 full fine-tuning: every parameter sharded on dim 0, checkpoints that reshard on load",
        states_bytes=_fsdp2_states,
        regularizer_bytes=_zero3_regularizers,  # the same partitioned copies, bf16 base / ranks
        settings="fsdp2",
        gathered_bytes=_fsdp2_gathered,
    ),
    "qlora": BackendSpec(
        module="keeltune.sharding.qlora",
        summary="a 4-bit base (bitsandbytes) with LoRA adapters (peft), data parallel",
        states_bytes=_qlora_states,
        regularizer_bytes=_qlora_regularizers,
        check=_check_qlora,
        check_ranks=_check_qlora_ranks,
        settings="qlora",
        refuses={
            "zero3": "QLoRA with ZeRO-3 (sharding the 4-bit base) is not supported. Use backend: qlora alone "
            "(every rank holds the 4-bit base, about 0.3x its bf16 size, and only the adapters are "
            "all-reduced), or backend: zero3 for full fine-tuning; remove the sharding.zero3 section"
        },
        adapters=True,
    ),
}


def backend_spec(config: Config) -> BackendSpec:
    return BACKENDS[config.sharding.backend]


def check_sharding(sharding: ShardingConfig, defaults: dict[str, object]) -> None:
    """A known backend, and no settings section of another backend (``defaults``: each section's default)."""
    if sharding.backend not in BACKENDS:
        close = difflib.get_close_matches(str(sharding.backend), BACKENDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"backend: {sharding.backend!r} is not one of {list(BACKENDS)}{hint}")
    spec = BACKENDS[sharding.backend]
    for section, default in defaults.items():
        if section == spec.settings or getattr(sharding, section) == default:
            continue
        raise ConfigError(
            f"{section}: "
            + spec.refuses.get(
                section,
                f"settings for backend {section}, but backend is {sharding.backend!r}; "
                f"set sharding.backend: {section} or remove the sharding.{section} section",
            )
        )
