"""The chat template saved with a trained tokenizer renders (and tokenizes) exactly what the built-in formats
train on, and evaluation prompts (``prompt_ids``) are the part of a training record before its answer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from keeltune.config import DataConfig, FieldNames, SourceConfig
from keeltune.data_pipeline.formats import (
    CHAT_TEMPLATE,
    INSTRUCTION_TEMPLATE,
    encode_record,
    prompt_ids,
    save_tokenizer,
    training_chat_template,
)
from keeltune.data_pipeline.prepare import DataError, tokenizer_fingerprint
from keeltune.demo.tokenizer import train_tokenizer
from keeltune.sharding.model import load_tokenizer
from tests.conftest import _general_texts

FIELDS = FieldNames()
CHAT = [
    {"role": "system", "content": "Be brief, and answer in one line."},
    {"role": "user", "content": "Which capital lies on the Seine?\nOne word, please."},
    {"role": "assistant", "content": "Paris. It is also the largest city.\n\nAnything else?"},
    {"role": "user", "content": " And on the Thames? (leading space)"},
    {"role": "assistant", "content": "London:\n    the capital of England."},
]
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = {"conversations": [{"from": SPEAKERS[m["role"]], "value": m["content"]} for m in CHAT]}
INSTRUCTIONS = [
    {"instruction": "Name the type of the value 3.", "input": "", "output": "It is an int."},
    {
        "instruction": "Convert the value with str.",
        "input": "x = 42\nprint(x)",
        "output": "str(42) gives '42':\n\n    a string.",
    },
]
# a template of the tokenizer's own, as a model's tokenizer can carry
OWN_TEMPLATE = (
    "{% for m in messages %}{{ '[' + m['role'] + ']\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\\n' }}{% endif %}"
)


def _data(*formats: str) -> DataConfig:
    sources = [SourceConfig(name=f"s{i}", path="x.jsonl", format=f) for i, f in enumerate(formats)]
    return DataConfig(train=sources)


def _instruction_messages(record: dict, answer: bool = True) -> list[dict[str, str]]:
    user = {"role": "user", "content": record["instruction"], "input": record["input"]}
    return [user, {"role": "assistant", "content": record["output"]}] if answer else [user]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The suite's byte-level BPE (the one ``assets`` trains), without the model."""
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(_general_texts(), 512, folder)
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def own_template(tokenizer):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = OWN_TEMPLATE
    return templated


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tokenizer saved by a chat run and by an instruction run, loaded back as inference would."""
    root = tmp_path_factory.mktemp("saved")
    loaded = {}
    for name, data in (("chat", _data("text", "chat")), ("instruction", _data("instruction", "text"))):
        save_tokenizer(tokenizer, root / name, data)
        loaded[name] = AutoTokenizer.from_pretrained(root / name)
    return loaded


def test_saved_turn_template_tokenizes_conversations_as_training(tokenizer, saved) -> None:
    loaded = saved["chat"]
    assert loaded.chat_template == CHAT_TEMPLATE
    for record, fmt in (
        ({"messages": CHAT}, "chat"),
        ({"messages": CHAT[1:3]}, "chat"),
        (SHAREGPT, "sharegpt"),
    ):
        messages = record.get("messages", CHAT)
        trained = list(encode_record(record, fmt, FIELDS, tokenizer, "r").ids)
        assert trained[0] == tokenizer.bos_token_id and trained[-1] == tokenizer.eos_token_id
        assert loaded.apply_chat_template(messages, return_dict=False) == trained
        # the saved tokenizer, used for training or held-out sets again, encodes as the run that saved it
        assert list(encode_record(record, fmt, FIELDS, loaded, "r").ids) == trained
    for k in (2, 4):  # the generation prompt before each assistant turn
        expected = prompt_ids({"messages": CHAT[:k]}, "chat", FIELDS, tokenizer, "r")
        assert loaded.apply_chat_template(CHAT[:k], add_generation_prompt=True, return_dict=False) == expected
        text = loaded.apply_chat_template(CHAT[:k], tokenize=False, add_generation_prompt=True)
        assert text.endswith("\n<|assistant|>\n")


def test_saved_instruction_template_tokenizes_records_as_training(tokenizer, saved) -> None:
    loaded = saved["instruction"]
    assert loaded.chat_template == INSTRUCTION_TEMPLATE
    for record in INSTRUCTIONS:
        trained = list(encode_record(record, "instruction", FIELDS, tokenizer, "r").ids)
        assert loaded.apply_chat_template(_instruction_messages(record), return_dict=False) == trained
        assert list(encode_record(record, "instruction", FIELDS, loaded, "r").ids) == trained
        prompt = loaded.apply_chat_template(
            _instruction_messages(record, answer=False), add_generation_prompt=True, return_dict=False
        )
        assert prompt == prompt_ids(record, "instruction", FIELDS, tokenizer, "r")
    system = {"role": "system", "content": "Answer briefly."}
    text = loaded.apply_chat_template(
        [system, *_instruction_messages(INSTRUCTIONS[1], answer=False)],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|bos|>Answer briefly.\n\n### Instruction:\nConvert the value with str.\n\n"
        "### Input:\nx = 42\nprint(x)\n\n### Response:\n"
    )
    with pytest.raises(TemplateError, match="unknown role tool"):
        loaded.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)


@pytest.mark.parametrize("templated", [False, True], ids=["builtin", "own-template"])
def test_prompt_ids_are_the_training_ids_before_the_answer(tokenizer, own_template, templated: bool) -> None:
    tok = own_template if templated else tokenizer
    cases = [
        ({"text": "plain text, learned from the first token"}, "text", ""),
        *((record, "instruction", record["output"]) for record in INSTRUCTIONS),
        ({"messages": CHAT}, "chat", CHAT[-1]["content"]),
        (SHAREGPT, "sharegpt", CHAT[-1]["content"]),
    ]
    for record, fmt, answer in cases:
        doc = encode_record(record, fmt, FIELDS, tok, "r")
        prompt = prompt_ids(record, fmt, FIELDS, tok, "r")
        assert list(doc.ids[: len(prompt)]) == prompt
        rest = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        assert list(doc.ids[len(prompt) :]) == rest
        if fmt == "instruction":  # single-turn: the prompt is exactly what the loss masks out
            assert list(doc.loss_mask) == [0] * len(prompt) + [1] * len(rest)


def test_prompt_ids_take_open_conversations_and_name_bad_records(tokenizer) -> None:
    for k in (3, 5):  # a trailing answer is left out
        open_ended = prompt_ids({"messages": CHAT[: k - 1]}, "chat", FIELDS, tokenizer, "r")
        assert prompt_ids({"messages": CHAT[:k]}, "chat", FIELDS, tokenizer, "r") == open_ended
    with pytest.raises(DataError, match="no assistant turn"):  # training still needs an answer
        encode_record({"messages": CHAT[:2]}, "chat", FIELDS, tokenizer, "r")
    no_output = {"instruction": "Say hi."}
    assert prompt_ids(no_output, "instruction", FIELDS, tokenizer, "r") == prompt_ids(
        {**no_output, "output": "hi"}, "instruction", FIELDS, tokenizer, "r"
    )
    for record, fmt, message in (
        ({"output": "x"}, "instruction", r"eval\.jsonl:3: missing field 'instruction'"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "chat",
            r"eval\.jsonl:3: messages\[0\]: unknown role",
        ),
        ({"messages": []}, "chat", r"eval\.jsonl:3: field 'messages' must be a non-empty list"),
        ({"text": 3}, "text", r"eval\.jsonl:3: field 'text' must be a string"),
    ):
        with pytest.raises(DataError, match=message):
            prompt_ids(record, fmt, FIELDS, tokenizer, "eval.jsonl:3")


def test_which_template_a_run_saves(tokenizer, own_template, saved, tmp_path: Path) -> None:
    assert training_chat_template(_data("text"), tokenizer) is None
    assert training_chat_template(_data("instruction", "sharegpt"), tokenizer) == CHAT_TEMPLATE
    assert training_chat_template(_data("instruction"), own_template) is None
    # a tokenizer saved by an earlier keeltune run gets the template of this run's data
    assert training_chat_template(_data("chat"), saved["instruction"]) == CHAT_TEMPLATE

    fingerprint = tokenizer_fingerprint(tokenizer)
    save_tokenizer(tokenizer, tmp_path / "text", _data("text"))
    assert AutoTokenizer.from_pretrained(tmp_path / "text").chat_template is None
    save_tokenizer(own_template, tmp_path / "own", _data("chat"))
    assert AutoTokenizer.from_pretrained(tmp_path / "own").chat_template == OWN_TEMPLATE
    assert own_template.chat_template == OWN_TEMPLATE
    # the live tokenizer, which training keeps encoding with, is as it was after saving with a template
    assert tokenizer.chat_template is None and tokenizer_fingerprint(tokenizer) == fingerprint
