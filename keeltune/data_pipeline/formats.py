"""Records -> token ids + loss mask, for raw text, instruction, chat (``messages``) and ShareGPT records.

Conversations use the tokenizer's chat template when it has one, a simple built-in template otherwise. Only
assistant turns (and the EOS that ends them) are learned; system, user and prompt tokens are masked out.

The built-in formats are encoded piece by piece (header, content, ...). ``CHAT_TEMPLATE`` and
``INSTRUCTION_TEMPLATE`` render the same text, for the saved tokenizer (``save_tokenizer``), so inference formats
prompts as training did. A template's text is tokenized in one piece, which gives the same ids wherever the
pre-tokenizer splits at the pieces' boundaries anyway. For byte-level BPE with the GPT-2 split pattern that holds
unless a content starts with two or more whitespace characters or a system/user content ends in whitespace: such
whitespace runs are split differently at the boundary, which changes ids where the vocabulary merges them.
Tokenizers that prepend a space marker to every encoded piece (SentencePiece ``Metaspace``, ``add_prefix_space``)
differ at every piece. A tokenizer carrying one of these two templates is still encoded piece by piece here,
exactly as by the run that saved it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeltune.config import DataConfig, FieldNames
from keeltune.data_pipeline.sources import DataError

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
BUILTIN_TURN_HEADER = "<|{role}|>\n"
ROLES = {  # the names datasets use -> the roles chat templates know
    **dict.fromkeys(["system"], "system"),
    **dict.fromkeys(["user", "human"], "user"),
    **dict.fromkeys(["assistant", "gpt", "bot", "model", "chatgpt"], "assistant"),
}
_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
_ROLE_CHECK = (
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': the model knows system, user and assistant') }}"
    "{% endif %}"
)
# _chat_builtin as a Jinja template: BOS, then ``<|role|>\n`` + content + ``\n`` for system and user turns,
# content + EOS for assistant turns; the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    _BOS + "{% for message in messages %}" + _ROLE_CHECK + "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# PROMPT_TEMPLATE(_WITH_INPUT) as a Jinja template: a user turn is the instruction (its optional ``input`` key the
# ``### Input:`` section), ``### Response:\n`` opens each assistant turn (and is the generation prompt), which ends
# with EOS. A system turn, which instruction records do not have, becomes a preamble: its content and a blank line.
INSTRUCTION_TEMPLATE = (
    _BOS + "{% for message in messages %}" + _ROLE_CHECK + "{% if message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% if message['input'] %}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{% endif %}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


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
    record: dict[str, Any],
    list_field: str,
    role_field: str,
    text_field: str,
    where: str,
    need_answer: bool = True,
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
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {list_field} has no assistant turn, so nothing to learn")
    return messages


def _record_messages(
    record: dict[str, Any], fmt: str, fields: FieldNames, where: str, need_answer: bool = True
) -> list[dict[str, str]]:
    if fmt == "chat":
        return _messages(record, fields.messages, fields.role, fields.content, where, need_answer)
    return _messages(record, fields.conversations, fields.speaker, fields.value, where, need_answer)


def own_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template other than keeltune's, which render as the built-in formats."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template not in (CHAT_TEMPLATE, INSTRUCTION_TEMPLATE)


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
    if own_chat_template(tokenizer):
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
    if fmt in ("chat", "sharegpt"):
        return _chat(_record_messages(record, fmt, fields, where), tokenizer, where)
    output = _string(record, fields.output, where)
    if own_chat_template(tokenizer):
        messages = [_instruction_user(record, fields, where), {"role": "assistant", "content": output}]
        return _chat_with_template(messages, tokenizer, where)
    prompt = _instruction_prompt(record, fields, tokenizer, where)
    answer = _encode(tokenizer, output) + eos
    return Document(prompt + answer, [0] * len(prompt) + [1] * len(answer))


def _instruction_user(record: dict[str, Any], fields: FieldNames, where: str) -> dict[str, str]:
    """An instruction record's prompt as a user turn, for a tokenizer's own chat template."""
    instruction = _string(record, fields.instruction, where)
    extra = _string(record, fields.input, where, required=False)
    return {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}


def _instruction_prompt(record: dict[str, Any], fields: FieldNames, tokenizer: Any, where: str) -> list[int]:
    """BOS and the Alpaca-style prompt of an instruction record, up to ``### Response:\\n``."""
    instruction = _string(record, fields.instruction, where)
    extra = _string(record, fields.input, where, required=False)
    template = PROMPT_TEMPLATE_WITH_INPUT if extra else PROMPT_TEMPLATE
    return _bos(tokenizer) + _encode(tokenizer, template.format(instruction=instruction, input=extra))


def prompt_ids(record: dict[str, Any], fmt: str, fields: FieldNames, tokenizer: Any, where: str) -> list[int]:
    """Token ids of an evaluation item's prompt, rendered as training renders what precedes the answer.

    ``text``: BOS and the text (no EOS). ``instruction``: the prompt up to ``### Response:\\n`` (the output field
    may be absent). ``chat``/``sharegpt``: the turns, less a trailing assistant turn, then the generation prompt;
    a conversation without an assistant turn is valid here. For a training record, ``encode_record`` gives these
    ids followed by the answer's tokens and EOS (with a tokenizer's own template: as far as that template
    renders the prompt as a prefix of the whole conversation).
    """
    if fmt == "text":
        return _bos(tokenizer) + _encode(tokenizer, _string(record, fields.text, where))
    if fmt == "instruction":
        if own_chat_template(tokenizer):
            return _encode(
                tokenizer, _render(tokenizer, [_instruction_user(record, fields, where)], where, True)
            )
        return _instruction_prompt(record, fields, tokenizer, where)
    messages = _record_messages(record, fmt, fields, where, need_answer=False)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if own_chat_template(tokenizer):
        return _encode(tokenizer, _render(tokenizer, messages, where, True))
    header = _encode(tokenizer, BUILTIN_TURN_HEADER.format(role="assistant"))
    return list(_chat_builtin(messages, tokenizer).ids) + header


def prompt_text(record: dict[str, Any], fmt: str, fields: FieldNames, where: str) -> str:
    """What a person reads of an item's prompt (a review page): the text, the instruction and its input, or
    the turns before a trailing answer as ``role: content`` — no template markup."""
    if fmt == "text":
        return _string(record, fields.text, where)
    if fmt == "instruction":
        return _instruction_user(record, fields, where)["content"]
    messages = _record_messages(record, fmt, fields, where, need_answer=False)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def training_chat_template(data: DataConfig, tokenizer: Any) -> str | None:
    """The chat template that renders what ``data.train`` is trained on, for the saved tokenizer.

    None when the tokenizer has its own template (training used it; it is kept) or every train source is text.
    ``CHAT_TEMPLATE`` when any source is chat or sharegpt, also in a run that mixes in instruction sources (whose
    records were trained in the Alpaca format, which that template does not render); ``INSTRUCTION_TEMPLATE`` when
    the sources are instruction (and text).
    """
    if own_chat_template(tokenizer):
        return None
    formats = {source.format for source in data.train}
    if formats & {"chat", "sharegpt"}:
        return CHAT_TEMPLATE
    if "instruction" in formats:
        return INSTRUCTION_TEMPLATE
    return None


def save_tokenizer(tokenizer: Any, folder: Path, data: DataConfig) -> None:
    """``tokenizer.save_pretrained(folder)``, the saved copy with ``training_chat_template`` as its chat template;
    the tokenizer object itself is left as it was."""
    template = training_chat_template(data, tokenizer)
    if template is None:
        tokenizer.save_pretrained(folder)
        return
    kept = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = kept
