"""The run's base with the domain vocabulary (``model.extend_vocabulary``), written once into the run folder.

``ensure_extended_tokenizer`` learns the new tokens and writes the tokenizer with them (cheap: ``keeltune
prepare`` on a login node does it, so the data are tokenized with it); ``ensure_extended_base`` adds the model
weights (rank 0 of the job: it reads the whole model once). Both are written under a temporary name and renamed
into place, with ``keeltune_vocabulary.json`` saying what was added, from what, and the tokens per domain document
before and after. A folder made with other settings is made again (a resume cannot change them)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from keeltune.atomic import fsync_folder, write_json_atomically
from keeltune.config import Config
from keeltune.data_pipeline.prepare import recipe
from keeltune.data_pipeline.sources import DataError
from keeltune.data_pipeline.vocabulary import (
    add_tokens,
    check_extendable,
    domain_texts,
    learn_tokens,
    tokens_per_document,
)
from keeltune.run_folder import VOCABULARY_FILE
from keeltune.sharding.model import extend_embeddings, load_causal_lm, load_tokenizer

log = logging.getLogger("keeltune")
WEIGHTS_DONE = "keeltune_weights.json"  # written last when the weights are in the folder
REPORT_DOCUMENTS = 1000  # domain documents the tokens-per-document figures are measured on


def _sources(config: Config) -> list[Any]:
    settings = config.model.extend_vocabulary
    every = {s.name: s for view in config.stage_views() for s in view.data.train if s.generate is None}
    if settings.sources:
        return [every[name] for name in settings.sources]
    return [s for s in config.stage_view(0).data.train if s.generate is None]


def _settings_digest(config: Config) -> str:
    settings = config.model.extend_vocabulary
    text = json.dumps(
        {
            "settings": vars(settings),
            "model": config.model.path,
            "tokenizer": config.model.tokenizer_path,
            "sources": [recipe(s, 0, "split") for s in _sources(config)],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_vocabulary(folder: Path) -> dict[str, Any] | None:
    file = folder / VOCABULARY_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def ensure_extended_tokenizer(config: Config) -> dict[str, Any] | None:
    """The extended base's tokenizer and its report, made now when missing or made with other settings; None
    when the config extends no vocabulary."""
    if not config.model.extend_vocabulary.enabled:
        return None
    folder, digest = config.extended_base, _settings_digest(config)
    found = read_vocabulary(folder)
    if found is not None and found["digest"] == digest:
        return found
    settings = config.model.extend_vocabulary
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    check_extendable(tokenizer, config.model.tokenizer_path)
    sources = _sources(config)
    texts = list(domain_texts(sources, settings.max_documents))
    tokens = learn_tokens(tokenizer, texts, settings)
    if not tokens:
        raise DataError(
            f"model.extend_vocabulary: no word of the {len(texts)} domain documents of "
            f"{[s.name for s in sources]} occurs {settings.min_count}+ times split into {settings.min_pieces}+ "
            "pieces; lower min_count or min_pieces, or read more documents"
        )
    sample = texts[:REPORT_DOCUMENTS]
    before = tokens_per_document(tokenizer, sample)
    base_vocab_size = len(tokenizer)
    ids = add_tokens(tokenizer, tokens)
    after = tokens_per_document(tokenizer, sample)
    report = {
        "digest": digest,
        "base": config.model.path,
        "base_vocab_size": base_vocab_size,
        "sources": [s.name for s in sources],
        "documents": len(texts),
        "tokens_per_document": {"before": before, "after": after, "documents": len(sample)},
        "tokens": [
            {"id": i, "text": t.text, "pieces": t.pieces, "count": t.count}
            for i, t in zip(ids, tokens, strict=True)
        ],
    }
    staging = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save_pretrained(staging)
    write_json_atomically(staging / VOCABULARY_FILE, report)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    fsync_folder(folder.parent)
    log.info(
        "domain vocabulary: %d new tokens from %d documents of %s (e.g. %s); tokens per document %.1f -> %.1f",
        len(tokens),
        len(texts),
        ", ".join(report["sources"]),
        ", ".join(repr(t.text) for t in tokens[:5]),
        before,
        after,
    )
    return report


def ensure_extended_base(config: Config) -> dict[str, Any] | None:
    """The extended base whole (tokenizer and weights), made now where missing (call on one process)."""
    report = ensure_extended_tokenizer(config)
    if report is None:
        return None
    folder = config.extended_base
    done = folder / WEIGHTS_DONE
    if done.is_file() and json.loads(done.read_text())["digest"] == report["digest"]:
        return report
    model = load_causal_lm(config.model.path, dtype="auto")
    extend_embeddings(model, report["tokens"][0]["id"], [t["pieces"] for t in report["tokens"]])
    model.save_pretrained(folder, safe_serialization=True)
    rows = model.get_input_embeddings().weight.shape[0]
    write_json_atomically(done, {"digest": report["digest"], "rows": rows})
    log.info("extended base written: %s (%d embedding rows)", folder, rows)
    return report


def base_vocab_size(config: Config) -> int | None:
    """With an extended base (the config as ``with_extended_base`` made it, or not): the base tokenizer's size,
    the rows that compare with the original base; None without one."""
    report = read_vocabulary(Path(config.model.path))
    return None if report is None else int(report["base_vocab_size"])
