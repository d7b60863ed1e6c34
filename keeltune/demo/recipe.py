"""The demo's numbers: tokenizer, tiny Llama, pretraining and fine-tuning schedules.

``DEFAULT`` was chosen by measurement on a 2-core CPU (fp32, 2 torch threads) so
that the whole ``keeltune demo`` (tokenizer, pretraining to a held-out
perplexity well under ``max_pretrain_ppl``, then fine-tuning with evaluations
and two 400-item multiple-choice tasks at its start and end)
fits in ~10 minutes with margin. ``SMOKE`` is a seconds-long variant for
end-to-end tests; it makes no quality claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import LlamaConfig, PreTrainedTokenizerBase


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A Llama architecture (the ``LlamaConfig`` numbers that are not the tokenizer's)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One training phase: AdamW (betas 0.9/0.95, decay on 2-D weights), linear warmup, cosine to ``min_lr_ratio * lr``."""

    steps: int
    batch_size: int  # sequences of ``seq_len`` tokens per optimizer step
    micro_batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    eval_every: int  # evaluate task validation / retention sets every this many steps (and at 0 and the end)
    grad_clip: float = 1.0


# Recipe fields that only shape the fine-tune's task evaluation: not part of the base model's cache key.
EVAL_ONLY = ("task_items", "task_batch_size")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything the demo needs to be reproducible."""

    vocab_size: int
    seq_len: int
    model: ModelShape
    pretrain: Schedule
    finetune: Schedule
    seed: int = 0
    lora_lr_scale: float = (
        4.0  # the fine-tune's lr times this under QLoRA (adapters start at zero; common practice)
    )
    max_pretrain_ppl: float = 150.0  # hard check on the held-out ("retention") perplexity after pretraining
    eval_max_samples: int | None = None  # sequences per evaluation set; None evaluates them all
    chunk_chars: int | None = 3000  # general-corpus document size (see ``corpora.general_corpus``)
    # Multiple-choice items per evaluation task (domain: stdlib_mc, retention: docs_cloze), scored at the
    # fine-tune's step 0 and last step. Evaluation only: leaves the base and its cache key alone.
    task_items: int = 400
    task_batch_size: int = 64  # choices per forward pass (CPU: larger batches are faster per choice)
    notes: tuple[str, ...] = field(default_factory=tuple)


DEFAULT = Recipe(
    vocab_size=2048,
    seq_len=256,
    model=ModelShape(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
    ),
    pretrain=Schedule(
        steps=360,
        batch_size=8,
        micro_batch_size=8,
        lr=1e-3,
        warmup_steps=30,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        eval_every=60,
    ),
    finetune=Schedule(
        steps=100,
        batch_size=16,
        micro_batch_size=16,
        lr=5e-4,
        warmup_steps=10,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        eval_every=20,
    ),
)

SMOKE = Recipe(
    vocab_size=512,
    seq_len=64,
    model=ModelShape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=172,
    ),
    pretrain=Schedule(
        steps=10,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        eval_every=5,
    ),
    finetune=Schedule(
        steps=10,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        warmup_steps=2,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        eval_every=5,
    ),
    max_pretrain_ppl=float("inf"),  # too short to learn anything: no quality check
    eval_max_samples=16,
    task_items=24,
)


def llama_config(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The ``LlamaConfig`` of ``recipe``'s model, with vocabulary and special ids from ``tokenizer``."""
    shape = recipe.model
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=shape.tie_word_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        initializer_range=shape.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
