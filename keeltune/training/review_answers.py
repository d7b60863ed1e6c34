"""``keeltune review create``: the answers of a run and of the models it is compared with to held-out prompts,
through task evaluation's batched generation (any backend's run: a checkpoint is exported first, QLoRA merged),
on this process or on local ranks (``--nproc``; every rank generates its share of the batches)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeltune.config import ConfigError, FieldNames, TaskConfig, TaskGenerationConfig, load_config
from keeltune.data_pipeline.formats import prompt_ids, prompt_text
from keeltune.data_pipeline.task_items import load_task_items
from keeltune.distributed import ParallelEnv, exit_rank, rank_of_job, run_job_on_ranks
from keeltune.eval.tasks import HFTaskModel, cut_at_stop, generate_ids
from keeltune.run_folder import CONFIG_FILE, FINAL_MODEL_DIR
from keeltune.sharding.model import autocast_dtype, load_causal_lm, load_tokenizer
from keeltune.training.run_eval import model_folder, resolve_target

BASE = "base"


@dataclass(frozen=True)
class ReviewModel:
    """A model whose answers are reviewed: a run (its final model, else its newest checkpoint) or a folder."""

    label: str
    source: Path  # a run folder or a Hugging Face model folder
    tokenizer: str  # each model answers through its own tokenizer

    @contextlib.contextmanager
    def folder(self) -> Iterator[Path]:
        """A Hugging Face folder of the model (a checkpoint is exported to a temporary one)."""
        final = self.source / FINAL_MODEL_DIR
        if not (self.source / CONFIG_FILE).is_file():
            yield self.source
        elif (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
            yield final
        else:
            with model_folder(resolve_target(self.source)) as folder:
                yield folder


@dataclass(frozen=True)
class Prompts:
    """The held-out prompts: records of one format, and how answers are generated."""

    source: str
    records: list[dict[str, Any]]
    wheres: list[str]  # file:line of each record
    format: str
    fields: FieldNames
    generation: TaskGenerationConfig


def _model(path: Path, run_config_dir: Path, against: str) -> ReviewModel:
    if against == BASE:
        config = load_config(run_config_dir / CONFIG_FILE)
        return ReviewModel(BASE, Path(config.model.path), config.model.tokenizer_path)
    if (path / CONFIG_FILE).is_file():
        final = path / FINAL_MODEL_DIR
        has_final = (final / "config.json").is_file() and not (final / "adapter_config.json").is_file()
        if not has_final:
            try:
                resolve_target(path)
            except Exception as err:  # CheckpointError and its kin: say what to do
                raise ConfigError(
                    f"{path}: no final model ({FINAL_MODEL_DIR}/) and no usable checkpoint ({err}); train it "
                    "first (keeltune train / launch) or name another run"
                ) from None
        tokenizer = (
            str(final)
            if has_final
            else load_config(path / CONFIG_FILE).with_extended_base().model.tokenizer_path
        )
        return ReviewModel(path.name, path, tokenizer)
    if (path / "config.json").is_file():
        return ReviewModel(path.name, path, str(path))
    raise ConfigError(
        f"--against {against}: {path} is neither a run folder ({CONFIG_FILE}), a Hugging Face model folder "
        "(config.json) nor 'base'"
    )


def review_models(run_dir: Path, against: list[str]) -> list[ReviewModel]:
    """The run under review first, then each ``--against`` (default: the run's base model); labels unique."""
    run_dir = run_dir.resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    models = [_model(run_dir, run_dir, "run")]
    models += [_model(Path(name).resolve(), run_dir, name) for name in (against or [BASE])]
    seen: dict[str, int] = {}
    labelled = []
    for model in models:
        seen[model.label] = seen.get(model.label, 0) + 1
        label = model.label if seen[model.label] == 1 else f"{model.label}-{seen[model.label]}"
        labelled.append(dataclasses.replace(model, label=label))
    return labelled


def load_prompts(
    run_dir: Path, prompts: str | None, fmt: str | None, n: int, seed: int, max_new_tokens: int | None
) -> Prompts:
    """``prompts``: a task of the run's ``eval.tasks`` (its format and generation settings), a JSONL file (in
    ``fmt``, default the validation set's format), or None: the first generate task, else ``data.validation``.
    ``n`` of them are drawn with ``seed`` (all when there are fewer), kept in file order."""
    config = load_config(run_dir / CONFIG_FILE).stage_view(-1)  # a staged run: its last stage's data
    tasks = {task.name: task for task in config.eval.tasks}
    held_out = config.data.validation
    generation = TaskGenerationConfig(max_new_tokens=max_new_tokens or 128, stop=[])
    if prompts in tasks or (prompts is None and any(t.kind == "generate" for t in tasks.values())):
        task = tasks[prompts] if prompts else next(t for t in tasks.values() if t.kind == "generate")
        path, fields, fmt = task.path, task.fields, fmt or task.format
        if task.kind == "generate":
            generation = task.generation
            if max_new_tokens:
                generation = dataclasses.replace(generation, max_new_tokens=max_new_tokens)
        source = f"eval.tasks {task.name} ({path})"
    elif prompts is not None:
        if not Path(prompts).is_file():
            raise ConfigError(
                f"--prompts {prompts}: neither a file nor a task of this run (eval.tasks: {sorted(tasks) or 'none'})"
            )
        path, fields, source = prompts, held_out.fields if held_out else FieldNames(), prompts
        fmt = fmt or (held_out.format if held_out else config.data.train[0].format)
    elif held_out is not None:
        path, fields, fmt, source = held_out.path, held_out.fields, fmt or held_out.format, "data.validation"
    else:
        raise ConfigError(
            f"{run_dir}: the run has no generate task and no data.validation: give --prompts (a JSONL file or a "
            "task name)"
        )
    if n < 1:
        raise ConfigError(f"--n: must be >= 1, got {n}")
    spec = TaskConfig(name="prompts", path=str(path), kind="loglikelihood", format=fmt, fields=fields)
    items = load_task_items(
        spec, key="--prompts"
    )  # names file and line of a bad record; refuses an empty file
    if len(items) > n:
        items = sorted(random.Random(seed).sample(items, n), key=lambda item: item.index)
    wheres = [f"{path}:{item.line}" for item in items]
    return Prompts(source, [item.record for item in items], wheres, fmt, fields, generation)


def answer_prompts(
    model_dir: Path, tokenizer_path: str, prompts: Prompts, *, max_length: int, batch_size: int,
    precision: str, parallel: ParallelEnv,
) -> list[str]:  # fmt: skip
    """The model's answer to each prompt (greedy unless the prompts' settings sample), on this rank's share of
    the batches; every rank returns all answers."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = HFTaskModel(
        load_causal_lm(str(model_dir)).to(parallel.device).eval(), autocast_dtype(precision, parallel.device)
    )
    room = max(1, max_length - prompts.generation.max_new_tokens)
    ids = [
        prompt_ids(record, prompts.format, prompts.fields, tokenizer, where)[-room:]
        for record, where in zip(prompts.records, prompts.wheres, strict=True)
    ]
    generated = generate_ids(model, ids, prompts.generation, tokenizer, batch_size, parallel)
    stops = prompts.generation.stop
    return [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stops).strip() for t in generated]


def display_texts(prompts: Prompts) -> list[str]:
    """Each prompt as the reviewer reads it (no template markup)."""
    return [
        prompt_text(record, prompts.format, prompts.fields, where)
        for record, where in zip(prompts.records, prompts.wheres, strict=True)
    ]


def pair_items(
    texts: list[str], answers: list[list[str]], seed: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], dict[str, int]]:
    """Items of every prompt × pair of models (two models: one pair), in an order shuffled with ``seed`` and
    each with its sides drawn, under random ids: (items as the page shows them, each item's side -> model, its
    prompt index)."""
    pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
    work = [(k, pair) for k in range(len(texts)) for pair in pairs]
    rng = random.Random(seed)
    rng.shuffle(work)
    items, sides, prompt_index, ids = [], {}, {}, set()
    for k, (i, j) in work:
        a, b = (j, i) if rng.random() < 0.5 else (i, j)
        item_id = secrets.token_hex(8)  # not from the seed: an id must not let anyone recompute the sides
        while item_id in ids:
            item_id = secrets.token_hex(8)
        ids.add(item_id)
        items.append({"id": item_id, "prompt": texts[k], "answers": {"A": answers[a][k], "B": answers[b][k]}})
        sides[item_id], prompt_index[item_id] = {"A": a, "B": b}, k
    return items, sides, prompt_index


def generate_answers(
    run_dir: Path, models: list[ReviewModel], prompts: Prompts, *, nproc: int = 1
) -> list[list[str]]:
    """Every model's answers to ``prompts``, on this process or ``nproc`` local ranks."""
    config = load_config(run_dir / CONFIG_FILE)
    settings = {
        "max_length": config.data.seq_len,
        "batch_size": config.eval.task_batch_size,
        "precision": config.training.precision,
    }
    answers = []
    for model in models:
        started = time.monotonic()
        with model.folder() as folder:
            if nproc == 1:
                found = answer_prompts(folder, model.tokenizer, prompts, **settings, parallel=ParallelEnv())
            else:
                found = _answer_on_ranks(folder, model.tokenizer, prompts, settings, nproc)
        print(
            f"review: {model.label}: {len(found)} answers in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        answers.append(found)
    return answers


def check_review(
    run_dir: Path, *, against: list[str], prompts: str | None, fmt: str | None, n: int, seed: int,
    max_new_tokens: int | None, nproc: int = 1,
) -> tuple[list[ReviewModel], Prompts]:  # fmt: skip
    """The models and the drawn prompts of ``keeltune review create``'s options, or a ConfigError saying what
    is wrong (before any model is loaded or any job waits in a queue)."""
    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    return review_models(run_dir, against), load_prompts(run_dir, prompts, fmt, n, seed, max_new_tokens)


def review_items(run_dir: Path, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A review's items (what the page shows) and its key (the models, and which wrote each side): every
    model's answers to the drawn prompts, paired. ``options`` are ``check_review``'s."""
    models, drawn = check_review(run_dir, **options)
    texts = display_texts(drawn)
    answers = generate_answers(run_dir, models, drawn, nproc=options.get("nproc", 1))
    items, sides, prompt_index = pair_items(texts, answers, options["seed"])
    key = {
        "models": [{"label": m.label, "source": str(m.source), "tokenizer": m.tokenizer} for m in models],
        "seed": options["seed"],
        "prompts": {"source": drawn.source, "format": drawn.format, "count": len(texts)},
        "generation": dataclasses.asdict(drawn.generation),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sides": sides,
        "prompt_index": prompt_index,
    }
    return items, key


def _answer_on_ranks(
    folder: Path, tokenizer: str, prompts: Prompts, settings: dict[str, Any], nproc: int
) -> list[str]:
    job = {
        "model_dir": str(folder),
        "tokenizer": tokenizer,
        "prompts": dataclasses.asdict(prompts),
        **settings,
    }
    return run_job_on_ranks(nproc, "keeltune.training.review_answers", job, "keeltune review create")


def _answer_job(job: dict[str, Any], parallel: ParallelEnv) -> list[str]:
    spec = job["prompts"]
    prompts = Prompts(
        spec["source"],
        spec["records"],
        spec["wheres"],
        spec["format"],
        FieldNames(**spec["fields"]),
        TaskGenerationConfig(**spec["generation"]),
    )
    return answer_prompts(
        Path(job["model_dir"]), job["tokenizer"], prompts, max_length=job["max_length"],
        batch_size=job["batch_size"], precision=job["precision"], parallel=parallel,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """One generation rank under torch's launcher (``keeltune review create --nproc N`` starts them)."""
    return rank_of_job(argv, _answer_job)


if __name__ == "__main__":
    exit_rank(main())
