"""Records -> token ids + loss mask, for raw text, instruction, chat (``messages``) and ShareGPT records.

Conversations use the tokenizer's chat template when it has one, a simple built-in template otherwise. Only
assistant turns (and the EOS that ends them) are learned; system, user and prompt tokens are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keeltune.config import FieldNames
from keeltune.data_pipeline.sources import DataError

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
BUILTIN_TURN_HEADER = "<|{role}|>\n"
ROLES = {  # the names datasets use -> the roles chat templates know
    **dict.fromkeys(["system"], "system"),
    **dict.fromkeys(["user", "human"], "user"),
    **dict.fromkeys(["assistant", "gpt", "bot", "model", "chatgpt"], "assistant"),
}


@dataclass(frozen=True)
class Document:
    """Token ids of one record and which of them count in the loss (lists, or arrays between processes)."""

    ids: Sequence[int]
    loss_mask: Sequence[int]


def _string(record: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _messages(
    record: dict[str, Any], list_field: str, role_field: str, text_field: str, where: str
) -> list[dict[str, str]]:
    turns = record.get(list_field)
    if turns is None:
        raise DataError(f"{where}: missing field {list_field!r} (fields present: {sorted(record)})")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {list_field!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {list_field}[{i}] must be an object, got {type(turn).__name__}")
        role = _string(turn, role_field, f"{where}: {list_field}[{i}]")
        if role.lower() not in ROLES:
            raise DataError(f"{where}: {list_field}[{i}]: unknown role {role!r} (known: {sorted(ROLES)})")
        messages.append(
            {"role": ROLES[role.lower()], "content": _string(turn, text_field, f"{where}: {list_field}[{i}]")}
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {list_field} has no assistant turn, so nothing to learn")
    return messages


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the same ids, with less per-call overhead
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _render(
    tokenizer: Any, messages: list[dict[str, str]], where: str, generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # templates raise their own errors, e.g. for a role they do not support
        raise DataError(f"{where}: the tokenizer's chat template refused this conversation ({err})") from None


def _chat_with_template(messages: list[dict[str, str]], tokenizer: Any, where: str) -> Document:
    """Render with the tokenizer's template; assistant spans are found by rendering growing prefixes."""
    spans, prefixes = [], []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prefixes += [
                _render(tokenizer, messages[:k], where, True),
                _render(tokenizer, messages[: k + 1], where),
            ]
            spans.append((len(prefixes[-2]), len(prefixes[-1])))
    text = _render(tokenizer, messages, where)
    if not all(text.startswith(prefix) for prefix in prefixes):
        raise DataError(
            f"{where}: the tokenizer's chat template renders earlier turns differently once later ones follow, "
            "so the assistant's tokens cannot be located; use a template without that behaviour"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [int(any(a <= begin < b for a, b in spans)) for begin, _ in encoded["offset_mapping"]]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)  # documents are separated by EOS in the packed stream
        mask.append(0)
    return Document(ids, mask)


def _chat_builtin(messages: list[dict[str, str]], tokenizer: Any) -> Document:
    """``<|role|>\\ncontent`` turns; each assistant turn ends with a learned EOS."""
    ids, mask = _bos(tokenizer), [0] * len(_bos(tokenizer))
    for message in messages:
        header = _encode(tokenizer, BUILTIN_TURN_HEADER.format(role=message["role"]))
        ids += header
        mask += [0] * len(header)
        if message["role"] == "assistant":
            body = _encode(tokenizer, message["content"]) + [tokenizer.eos_token_id]
            learned = 1
        else:
            body = _encode(tokenizer, message["content"] + "\n")
            learned = 0
        ids += body
        mask += [learned] * len(body)
    return Document(ids, mask)


def _chat(messages: list[dict[str, str]], tokenizer: Any, where: str) -> Document:
    if getattr(tokenizer, "chat_template", None):
        return _chat_with_template(messages, tokenizer, where)
    return _chat_builtin(messages, tokenizer)


def encode_record(
    record: dict[str, Any], fmt: str, fields: FieldNames, tokenizer: Any, where: str
) -> Document:
    """Tokenize one record in the source's format; prompts are masked out of the loss."""
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        ids = _bos(tokenizer) + _encode(tokenizer, _string(record, fields.text, where)) + eos
        return Document(ids, [1] * len(ids))
    if fmt == "chat":
        return _chat(_messages(record, fields.messages, fields.role, fields.content, where), tokenizer, where)
    if fmt == "sharegpt":
        messages = _messages(record, fields.conversations, fields.speaker, fields.value, where)
        return _chat(messages, tokenizer, where)
    instruction = _string(record, fields.instruction, where)
    extra = _string(record, fields.input, where, required=False)
    output = _string(record, fields.output, where)
    if getattr(tokenizer, "chat_template", None):
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return _chat_with_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": output}], tokenizer, where
        )
    template = PROMPT_TEMPLATE_WITH_INPUT if extra else PROMPT_TEMPLATE
    prompt = _bos(tokenizer) + _encode(tokenizer, template.format(instruction=instruction, input=extra))
    answer = _encode(tokenizer, output) + eos
    return Document(prompt + answer, [0] * len(prompt) + [1] * len(answer))
