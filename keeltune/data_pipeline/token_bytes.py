"""How many bytes of UTF-8 text each token id stands for: the denominator of bits per byte, which stays
comparable when the tokenizer changes (a domain vocabulary makes fewer, longer tokens of the same text).

Byte-level BPE (GPT-2, Llama 3, keeltune's demo tokenizer) spells every byte as one printable character
(``bytes_to_unicode``): a token's bytes are its characters mapped back. SentencePiece-style vocabularies spell
a space as ``▁`` (one byte) and byte-fallback pieces as ``<0xNN>`` (one byte); their other characters count
their own UTF-8 bytes. Added tokens that are not special count the bytes of their text; special tokens (BOS,
EOS, PAD, chat markers) stand for no text and count 0, so a target EOS adds nats but no bytes.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np

SPACE_MARKER = "▁"  # SentencePiece's space
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable character -> the byte it spells."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_types(node: Any) -> set[str]:
    """Every decoder type in a tokenizer.json ``decoder`` entry (a ``Sequence`` nests others)."""
    if not isinstance(node, dict):
        return set()
    return {node.get("type", ""), *(t for child in node.get("decoders") or [] for t in _decoder_types(child))}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's pieces are byte-level BPE characters (its decoder maps them back to bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False  # a slow tokenizer: SentencePiece in practice
    return "ByteLevel" in _decoder_types(json.loads(backend.to_str()).get("decoder"))


def piece_bytes(piece: str, *, byte_level: bool) -> int:
    """UTF-8 bytes of the text that vocabulary entry ``piece`` stands for."""
    if byte_level:
        decoder = byte_decoder()
        return sum(1 if char in decoder else len(char.encode()) for char in piece)
    if BYTE_PIECE.fullmatch(piece):
        return 1
    return len(piece.replace(SPACE_MARKER, " ").encode())


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """For every token id of ``tokenizer`` (``len(tokenizer)`` of them, added tokens included), the number of
    UTF-8 bytes of text it stands for (int32; 0 for special tokens and ids without an entry)."""
    byte_level = is_byte_level(tokenizer)
    lengths = np.zeros(len(tokenizer), dtype=np.int32)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or piece is None:
            continue
        if token_id in added:  # an added token matches its text as written, before any byte mapping
            lengths[token_id] = len(added[token_id].content.encode())
        else:
            lengths[token_id] = piece_bytes(piece, byte_level=byte_level)
    return lengths
