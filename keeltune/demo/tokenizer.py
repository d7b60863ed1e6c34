"""Train the demo's byte-level BPE tokenizer (offline, deterministic)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path | str,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``texts`` and save it to ``out_dir``.

    The vocabulary holds the three special tokens, the 256 byte symbols and the
    learned merges, ``vocab_size`` in all. No special token is added on
    encoding: callers append ``eos`` themselves. The folder loads offline with
    ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(SPECIAL_TOKENS) + 256} special and byte tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorting makes the result independent of the order the texts come in.
    tokenizer.train_from_iterator(sorted(texts), trainer=trainer)

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
