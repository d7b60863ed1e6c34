"""Domain vocabulary (torch-free): which words of the domain text become tokens of their own, and the tokenizer
that has them.

A word is a unit of the tokenizer's own pre-tokenizer (for byte-level BPE: a word with its leading space, such
as " tokenizer"), so a new token never spans what the base tokenizer keeps apart. Each candidate occurring at
least ``min_count`` times and split into at least ``min_pieces`` pieces saves ``count x (pieces - 1)`` tokens;
the ``new_tokens`` best (ties by the word itself: deterministic) are added as tokens matched before the base
model's splitting, which keeps decoding exact. Each new token's embedding starts as the mean of its pieces'
(``sharding.model.extend_embeddings``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from keeltune.config import Config, ConfigError, SourceConfig, VocabularyConfig
from keeltune.data_pipeline.contamination import record_strings
from keeltune.data_pipeline.sources import DataError, decode_payload, read_records, resolve_files


@dataclass(frozen=True)
class NewToken:
    text: str  # what it stands for, e.g. " tokenizer"
    pieces: list[int]  # the base tokenizer's ids for it
    count: int  # occurrences in the domain text read


def check_extendable(tokenizer: Any, where: str) -> None:
    """A fast tokenizer (tokenizer.json) with a pre-tokenizer, or a clear refusal."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"model.extend_vocabulary: the tokenizer at {where} is a slow {type(tokenizer).__name__} without "
            "tokenizer.json; keeltune adds tokens to fast tokenizers only (save it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...))"
        )
    if backend.pre_tokenizer is None:
        raise ConfigError(
            f"model.extend_vocabulary: the tokenizer at {where} has no pre-tokenizer, so it has no words to add "
            "as tokens"
        )


def domain_texts(sources: list[SourceConfig], max_documents: int) -> Iterator[str]:
    """The text of the first ``max_documents`` records of ``sources`` (in order; records that do not decode
    are left to prepare, which reports them)."""

    def texts() -> Iterator[str]:
        for source in sources:
            for location, payload in read_records(resolve_files(source.path, source.type)):
                try:
                    record = decode_payload(location, payload, source.fields.text)
                except DataError:
                    continue
                yield "\n".join(record_strings(record, source.format, source.fields))

    return itertools.islice(texts(), max_documents)


def learn_tokens(tokenizer: Any, texts: Iterable[str], settings: VocabularyConfig) -> list[NewToken]:
    """The words worth a token of their own, best first (see the module's docstring)."""
    backend = tokenizer.backend_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    candidates = []
    for word, count in counts.items():
        if count < settings.min_count:
            continue
        pieces = [token.id for token in backend.model.tokenize(word)]
        if len(pieces) >= settings.min_pieces:
            candidates.append((-count * (len(pieces) - 1), word, pieces, count))
    candidates.sort()
    decoder = backend.decoder
    found = []
    for _, word, pieces, count in candidates[: settings.new_tokens]:
        text = decoder.decode([word]) if decoder is not None else word
        found.append(NewToken(text, pieces, count))
    return found


def add_tokens(tokenizer: Any, tokens: list[NewToken]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` (in place); return their ids, in order."""
    from tokenizers import AddedToken

    first = len(tokenizer)
    added = tokenizer.add_tokens([AddedToken(t.text, normalized=False) for t in tokens])
    if added != len(tokens):
        raise ValueError(f"the tokenizer took {added} of {len(tokens)} new tokens (some exist already?)")
    return list(range(first, first + added))


def tokens_per_document(tokenizer: Any, texts: list[str]) -> float:
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) / max(1, len(texts))


def check_extended_vocabulary(config: Config) -> None:
    """Before a job waits in the queue (no torch): model.extend_vocabulary's tokenizer can take new tokens."""
    if not config.model.extend_vocabulary.enabled:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.tokenizer: {config.model.tokenizer_path}: no usable tokenizer ({err})"
        ) from None
    check_extendable(tokenizer, config.model.tokenizer_path)
