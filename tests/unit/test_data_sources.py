"""Source types (JSONL, Parquet, text, saved ``datasets``; files, globs, folders), record formats and their
loss masks (built-in and tokenizer chat templates), field-name mapping, and the data config keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import ConfigError, FieldNames, SourceConfig, check_paths, config_from_dict, load_config
from keeltune.data_pipeline.formats import encode_record
from keeltune.data_pipeline.prepare import DataError, prepare_source
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.sharding.model import load_tokenizer
from tests.conftest import base_config, write_config

RECORDS = [{"text": f"record {i}: " + "some words " * (i % 5 + 1)} for i in range(30)]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Which capital lies on the Seine?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And on the Thames?"},
    {"role": "assistant", "content": "London."},
]


@pytest.fixture(scope="module")
def tokenizer(assets: dict):
    return load_tokenizer(str(assets["model"]))


@pytest.fixture(scope="module")
def templated(tokenizer):
    with_template = copy.deepcopy(tokenizer)
    with_template.chat_template = TEMPLATE
    return with_template


def _prepare(tokenizer, out: Path, path, workers: int = 1, **source) -> dict:
    config = SourceConfig(name="src", path=str(path), **source)
    return prepare_source(config, out, tokenizer=tokenizer, seq_len=16, shard_samples=4, workers=workers)


def _checksums(index: dict) -> list[str]:
    return [s["sha256"] for s in index["shards"]]


def test_jsonl_parquet_and_saved_datasets_give_identical_shards(tokenizer, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS[:12]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[12:]), tmp_path / "part-1.parquet")
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "nested" / "saved"))
    reference = _prepare(tokenizer, tmp_path / "out-jsonl", jsonl)
    assert reference["num_documents"] == 30 and len(reference["shards"]) > 1
    parquet = _prepare(tokenizer, tmp_path / "out-parquet", tmp_path / "part-*.parquet")
    saved = _prepare(
        tokenizer, tmp_path / "out-saved", tmp_path / "nested"
    )  # a folder holding a saved dataset
    parallel = _prepare(tokenizer, tmp_path / "out-parallel", jsonl, workers=2)
    for other in (parquet, saved, parallel):
        assert _checksums(other) == _checksums(reference)
    assert [f["type"] for f in saved["recipe"]["files"]] == ["hf_disk"]


def test_plain_text_files_in_a_folder_are_one_document_each(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First file.\nTwo lines.")
    (folder / "sub" / "b.md").write_text("# Second file")
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # no text extension: not read
    (folder / ".draft.txt").write_text("hidden: not read")
    index = _prepare(tokenizer, tmp_path / "out", folder)
    as_jsonl = tmp_path / "same.jsonl"
    as_jsonl.write_text(
        json.dumps({"text": "First file.\nTwo lines."}) + "\n" + json.dumps({"text": "# Second file"})
    )
    assert index["num_documents"] == 2 and _checksums(index) == _checksums(
        _prepare(tokenizer, tmp_path / "o2", as_jsonl)
    )


def test_text_file_that_is_not_utf8_names_the_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}: not UTF-8"):
        _prepare(tokenizer, tmp_path / "out", path)


def test_a_path_without_readable_files_says_which_extensions_are_known(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: no files found \(known extensions: .jsonl"):
        _prepare(tokenizer, tmp_path / "out", tmp_path / "data.csv")
    (tmp_path / "data.log").write_text('{"text": "a log line read as JSONL"}\n')
    assert _prepare(tokenizer, tmp_path / "out", tmp_path / "data.log", type="jsonl")["num_documents"] == 1


def _learned_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)


def test_builtin_chat_template_learns_only_assistant_turns(tokenizer) -> None:
    doc = encode_record({"messages": CHAT}, "chat", FieldNames(), tokenizer, "x:1")
    learned = [t for t, m in zip(doc.ids, doc.loss_mask, strict=True) if m]
    assert learned == (
        tokenizer.encode("Paris.", add_special_tokens=False)
        + [tokenizer.eos_token_id]
        + tokenizer.encode("London.", add_special_tokens=False)
        + [tokenizer.eos_token_id]
    )
    assert "<|user|>\nWhich capital lies on the Seine?" in tokenizer.decode(doc.ids)


def test_tokenizer_chat_template_is_used_and_masks_prompts(templated) -> None:
    doc = encode_record({"messages": CHAT}, "chat", FieldNames(), templated, "x:1")
    text = templated.decode(doc.ids)
    assert text.startswith("<|system|>\nBe brief.<|user|>") and doc.ids[-1] == templated.eos_token_id
    learned = _learned_text(templated, doc.ids, doc.loss_mask)
    assert "Paris." in learned and "London." in learned
    assert "Seine" not in learned and "Thames" not in learned and "brief" not in learned
    instruction = encode_record(
        {"instruction": "Name a capital.", "output": "Rome."}, "instruction", FieldNames(), templated, "x:2"
    )
    assert templated.decode(instruction.ids).startswith("<|user|>\nName a capital.<|assistant|>\nRome.")
    assert "Rome." in _learned_text(templated, instruction.ids, instruction.loss_mask)
    assert "Name" not in _learned_text(templated, instruction.ids, instruction.loss_mask)


def test_chat_templates_that_refuse_or_rewrite_turns_are_reported(templated) -> None:
    refusing = copy.deepcopy(templated)
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    )
    with pytest.raises(
        DataError, match=r"x:1: the tokenizer's chat template refused this conversation \(no system"
    ):
        encode_record({"messages": CHAT}, "chat", FieldNames(), refusing, "x:1")
    rewriting = copy.deepcopy(templated)
    rewriting.chat_template = TEMPLATE.replace(
        "{{ m['content'] }}", "{{ m['content'] if loop.last else '...' }}"
    )
    with pytest.raises(
        DataError, match="x:1: the tokenizer's chat template renders earlier turns differently"
    ):
        encode_record({"messages": CHAT}, "chat", FieldNames(), rewriting, "x:1")


def test_sharegpt_with_renamed_fields_matches_chat(tokenizer) -> None:
    renamed = [{"speaker": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "text": m["content"]} for m in CHAT]  # fmt: skip
    fields = FieldNames(conversations="dialog", speaker="speaker", value="text")
    sharegpt = encode_record({"dialog": renamed}, "sharegpt", fields, tokenizer, "x:1")
    assert sharegpt == encode_record({"messages": CHAT}, "chat", FieldNames(), tokenizer, "x:1")
    mapped = encode_record({"question": "Q?", "answer": "A."}, "instruction", FieldNames(instruction="question", output="answer"), tokenizer, "x:2")  # fmt: skip
    assert sum(mapped.loss_mask) == len(tokenizer.encode("A.", add_special_tokens=False)) + 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "hi"}, "x:3: field 'messages' must be a non-empty list of turns"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "x:3: messages has no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "x:3: messages[0]: unknown role 'wizard'"),
        (
            {"messages": [{"role": "user", "content": 7}]},
            "x:3: messages[0]: field 'content' must be a string",
        ),
        ({"conversation": []}, "x:3: missing field 'messages' (fields present: ['conversation'])"),
    ],
)
def test_malformed_conversations_name_the_record(tokenizer, record: dict, message: str) -> None:
    with pytest.raises(DataError) as err:
        encode_record(record, "chat", FieldNames(), tokenizer, "x:3")
    assert message in str(err.value)


def test_chat_source_prepares_with_prompt_tokens_masked(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(5)))
    index = _prepare(tokenizer, tmp_path / "out", path, format="chat")
    dataset = PackedDataset(tmp_path / "out")
    ids, mask = dataset.get(np.arange(len(dataset)))
    doc = encode_record({"messages": CHAT}, "chat", FieldNames(), tokenizer, "x")
    assert index["num_target_tokens"] == 5 * sum(doc.loss_mask) == int(mask[:, 1:].sum())


def test_data_config_keys_are_checked_with_their_full_name(assets: dict, tmp_path: Path) -> None:
    def with_train(**source) -> dict:
        config = base_config(assets, tmp_path)
        config["data"]["train"] = [{"name": "task", "path": str(assets["task"]), **source}]
        return config

    with pytest.raises(ConfigError, match=r"data.train.0.weight: must be > 0"):
        config_from_dict(with_train(weight=0))
    with pytest.raises(ConfigError, match=r"data.train.0.fields.outptu: unknown key \(did you mean data.train.0.fields.output\?\)"):  # fmt: skip
        config_from_dict(with_train(fields={"outptu": "answer"}))
    with pytest.raises(
        ConfigError, match=r"data.train.0.on_error: 'skipp' is not one of .*did you mean 'skip'"
    ):
        config_from_dict(with_train(on_error="skipp"))
    with pytest.raises(ConfigError, match=r"data.train.0.type: 'csv' is not one of"):
        config_from_dict(with_train(type="csv"))
    mixed = base_config(assets, tmp_path)
    mixed["data"]["train"] = [
        {"name": "task", "path": str(assets["task"]), "format": "instruction", "weight": 0.123457},
        {"name": "replay", "path": str(assets["general"]), "weight": 0.3},
    ]
    with pytest.raises(
        ConfigError, match=r"data.train weights .* repeats only every 423457 samples; use rounder"
    ):
        config_from_dict(mixed)


def test_globs_resolve_from_the_config_folder_and_are_checked_at_train_time(
    assets: dict, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    config = base_config(assets, tmp_path / "runs")
    config["data"]["train"] = [{"name": "text", "path": "data/*.jsonl"}]
    loaded = load_config(write_config(tmp_path / "cfg.yaml", config))
    assert loaded.data.train[0].path == str(tmp_path / "data" / "*.jsonl")
    check_paths(loaded)
    config["data"]["train"] = [{"name": "text", "path": "data/*.parquet"}]
    with pytest.raises(
        ConfigError, match=r"data.train.0.path: .*data/\*.parquet does not exist \(a file, a glob"
    ):
        check_paths(load_config(write_config(tmp_path / "cfg.yaml", config)))


def test_where_data_is_prepared_may_change_on_resume_but_not_the_mixing(assets: dict, tmp_path: Path) -> None:
    from keeltune.config import resume_differences

    saved = config_from_dict(base_config(assets, tmp_path)).to_dict()
    moved = base_config(assets, tmp_path)
    moved["data"].update(
        prepared_dir=str(tmp_path / "elsewhere"), shard_samples=64, verify_checksums="always"
    )
    assert resume_differences(saved, config_from_dict(moved).to_dict()) == []
    moved["data"]["train"][0]["weight"] = 2.0
    assert resume_differences(saved, config_from_dict(moved).to_dict()) == [
        "  data.train.0.weight: 1.0 -> 2.0"
    ]
