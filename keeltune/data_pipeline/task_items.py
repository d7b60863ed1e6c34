"""Evaluation task files: JSONL items read and checked (every error names the file and line), no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeltune.config import ConfigError, TaskConfig


@dataclass(frozen=True)
class TaskItem:
    """One item of a task: its record (prompt fields, rendered later by the task's format), where it came
    from, and what it is scored against."""

    index: int  # position in the file (0-based), the item's id in per-item outputs
    line: int
    record: dict[str, Any]
    choices: tuple[str, ...] = ()  # multiple_choice
    gold: int = -1  # multiple_choice
    references: tuple[str, ...] = ()  # generate


def _prompt_field(task: TaskConfig) -> str:
    fields = task.fields
    return {
        "text": fields.text,
        "instruction": fields.instruction,
        "chat": fields.messages,
        "sharegpt": fields.conversations,
    }[task.format]


def _check_item(task: TaskConfig, record: Any, where: str, index: int, line: int) -> TaskItem:
    fields = task.fields
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: an item must be a JSON object, got {type(record).__name__}")
    prompt = _prompt_field(task)
    if prompt not in record:
        raise ConfigError(
            f"{where}: missing field {prompt!r} (the prompt of format {task.format}; fields present: "
            f"{sorted(record)}; rename with eval.tasks[].fields)"
        )
    if task.kind == "multiple_choice":
        choices, gold = record.get(fields.choices), record.get(fields.gold)
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(
                f"{where}: field {fields.choices!r} must be a list of at least two non-empty strings (acc_norm "
                f"divides by a choice's length), got {choices!r}"
            )
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise ConfigError(
                f"{where}: field {fields.gold!r} must be the index of the right choice, got {gold!r}"
            )
        if not 0 <= gold < len(choices):
            raise ConfigError(
                f"{where}: {fields.gold!r} = {gold} is out of range for {len(choices)} choices (0 to "
                f"{len(choices) - 1})"
            )
        return TaskItem(index, line, record, choices=tuple(choices), gold=gold)
    if task.kind == "generate":
        answer = record.get(fields.answer)
        references = [answer] if isinstance(answer, str) else answer
        if (
            not isinstance(references, list)
            or not references
            or not all(isinstance(r, str) for r in references)
        ):
            raise ConfigError(
                f"{where}: field {fields.answer!r} must be a reference string or a non-empty list of them, "
                f"got {answer!r}"
            )
        return TaskItem(index, line, record, references=tuple(references))
    return TaskItem(index, line, record)


def load_task_items(task: TaskConfig, key: str = "eval.tasks") -> list[TaskItem]:
    """Every item of ``task`` (the first ``max_items``), checked; ``key`` names the task in errors."""
    path = Path(task.path)
    if not path.is_file():
        raise ConfigError(
            f"{key} ({task.name}).path: {path} is not a file (a JSONL file of items is expected)"
        )
    items: list[TaskItem] = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            items.append(_check_item(task, record, where, len(items), number))
            if task.max_items is not None and len(items) == task.max_items:
                break
    if not items:
        raise ConfigError(f"{key} ({task.name}): {path} has no items; a task needs at least one")
    return items
