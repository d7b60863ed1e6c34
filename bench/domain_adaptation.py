"""Domain adaptation with scarce task data: what continued pretraining (CPT) on raw domain text buys before
supervised fine-tuning (SFT), what a domain vocabulary adds, and what both cost in forgetting.

The demo's setting (the pretrained tiny base on Python's documentation, standard-library Q&A answered from
docstrings), with the task data cut to ``--fractions`` (10% and 25%) of the instruction set's train split and
raw domain text = the standard library's own source files (docstrings and code, each chunk headed by its file
path). ``INSTRUCTION_MODULES`` are split deterministically: every ``HELD_OUT_EVERY``-th module is **held out**
of the CPT text, the others are **in CPT**. The Q&A answers quote the docstrings, so CPT on a module's source
has seen the answers' text: the held-out modules' numbers are the honest ones. Two validation sets (the
instruction set's val records by module: ``data.validation`` = held out, a retention set in instruction format
= in CPT) and two ``stdlib_mc`` variants ("which module defines X", by the defining module) are scored.

Methods, each at every data size and seed, in one run per cell (``stages`` for the CPT ones):

    sft            SFT alone (the baseline every ratio is taken against: same size, same seed)
    cpt-sft        CPT stage on the source text, then SFT
    cpt-vocab-sft  the same with model.extend_vocabulary (new tokens learned from the CPT text)
    cpt-replay-sft the same as cpt-sft with 20% of the CPT stream replaced by general text (first seed only)

Task loss is compared in bits per byte (a domain vocabulary changes the tokens, not the bytes); forgetting is
the rise of the general retention set's bits per byte over the original base (what the trainer's
``forgetting_bpb_pct`` measures, with a domain vocabulary too; computed here from each run's bpb), and
``docs_cloze`` accuracy. Finished runs are kept in ``ROOT/results.json`` and not run again.

    python bench/domain_adaptation.py [--root /tmp/keeltune-domain] [--seeds 0 1] [--fractions 0.1 0.25]
        [--cpt-steps 40] [--sft-steps 30] [--batch-size 16] [--new-tokens 256] [--mc-items 100]
        [--plot docs/domain_adaptation.png] [--report-only] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from keeltune.config.schema import EXTENDED_BASE_DIR
from keeltune.demo import corpora
from keeltune.demo.recipe import DEFAULT, SMOKE, Recipe
from keeltune.demo.run import DemoFiles, ensure_base, phase_config, train, write_datasets
from keeltune.training.report import read_metrics

HELD_OUT_EVERY = 4  # every 4th module of INSTRUCTION_MODULES is held out of the CPT text
REPLAY_SHARE = 0.2
GENERAL = "python-docs"  # the general retention set (held-out documentation)
VAL_HELD, VAL_IN = "qa-heldout", "qa-in-cpt"  # task validation: data.validation, and a retention set
MC_HELD, MC_IN, CLOZE = "stdlib_mc_heldout", "stdlib_mc_in_cpt", "docs_cloze"
METHODS = ("sft", "cpt-sft", "cpt-vocab-sft", "cpt-replay-sft")
BASELINE = "sft"


def module_of(qualname: str) -> str:
    """The INSTRUCTION_MODULES entry an object's qualified name starts with (the longest: ``json.decoder``)."""
    return max((m for m in corpora.INSTRUCTION_MODULES if qualname.startswith(m + ".")), key=len)


def module_split() -> tuple[list[str], list[str]]:
    """(in CPT, held out): every ``HELD_OUT_EVERY``-th module of ``INSTRUCTION_MODULES`` is held out."""
    modules = list(corpora.INSTRUCTION_MODULES)
    held = [m for i, m in enumerate(modules) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [m for m in modules if m not in held], held


def instruction_records() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """The demo's instruction set (``corpora.instruction_dataset``) with each record's module:
    ``{"train", "val"}`` lists of (module, record), in the same order."""
    splits: dict[str, list[tuple[str, dict[str, str]]]] = {"train": [], "val": []}
    for qualname, obj, kind in corpora._documented_objects():
        module = module_of(qualname)
        splits[corpora._split_of(qualname)] += [(module, r) for r in corpora._records(qualname, obj, kind)]
    return splits


def source_documents(modules: list[str], chunk_chars: int = 3000) -> list[str]:
    """The source files of ``modules`` (docstrings and code), cut at blank lines into documents of about
    ``chunk_chars``, each headed by its path under the standard library (``# json/decoder.py``), as code corpora
    usually carry it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                path = Path(inspect.getsourcefile(importlib.import_module(name)))
            except (ImportError, TypeError):
                continue
        header = f"# {path.relative_to(stdlib) if path.is_relative_to(stdlib) else path.name}\n"
        text = path.read_text(encoding="utf-8", errors="replace")
        documents += [header + chunk for chunk in corpora._chunks(corpora._clean(text), chunk_chars)]
    return documents


@dataclass(frozen=True)
class DomainFiles:
    demo: DemoFiles
    cpt_text: Path
    task_train: dict[float, Path]  # by fraction
    val_in: Path
    val_held: Path
    mc_in: Path
    mc_held: Path
    counts: dict[str, Any]


def write_domain_data(folder: Path, demo: DemoFiles, fractions: list[float], mc_items: int) -> DomainFiles:
    """The CPT text, the task train subsets, and the two validation sets and quiz variants."""
    in_cpt, held = module_split()
    records = instruction_records()
    train = [r for _, r in records["train"]]
    # the cut: a stable hash of each record, so the 10% subset is inside the 25% one
    ranked = sorted(train, key=lambda r: corpora._stable(json.dumps(r, sort_keys=True)))
    task_train = {
        f: corpora.write_jsonl(
            folder / f"task_train_{round(f * 100)}pct.jsonl", ranked[: round(f * len(ranked))]
        )
        for f in fractions
    }
    val_in = [r for m, r in records["val"] if m in in_cpt]
    val_held = [r for m, r in records["val"] if m in held]
    quiz = corpora.module_quiz(100_000, [r["instruction"] for r in train])  # every candidate item

    def defining_module(item: dict[str, Any]) -> str:
        return item["choices"][item["gold"]].rsplit("`", 2)[-2]

    mc_in = [q for q in quiz if defining_module(q) in in_cpt][:mc_items]
    mc_held = [q for q in quiz if defining_module(q) in held][:mc_items]
    cpt = source_documents(in_cpt)
    return DomainFiles(
        demo=demo,
        cpt_text=corpora.write_jsonl(folder / "cpt_stdlib_source.jsonl", cpt),
        task_train=task_train,
        val_in=corpora.write_jsonl(folder / "val_in_cpt.jsonl", val_in),
        val_held=corpora.write_jsonl(folder / "val_heldout.jsonl", val_held),
        mc_in=corpora.write_jsonl(folder / f"{MC_IN}.jsonl", mc_in),
        mc_held=corpora.write_jsonl(folder / f"{MC_HELD}.jsonl", mc_held),
        counts={
            "modules_in_cpt": len(in_cpt),
            "modules_held_out": len(held),
            "held_out_modules": held,
            "cpt_documents": len(cpt),
            "cpt_chars": sum(map(len, cpt)),
            "task_train_records": {str(f): round(f * len(ranked)) for f in fractions},
            "task_train_records_full": len(ranked),
            "val_in_cpt": len(val_in),
            "val_heldout": len(val_held),
            "mc_in_cpt": len(mc_in),
            "mc_heldout": len(mc_held),
        },
    )


def warmup(steps: int, total: int) -> int:
    """The demo's warmup, at most a fifth of a stage's steps (a shortened stage keeps its warmup share)."""
    return max(1, min(steps, total // 5))


class Bench:
    def __init__(self, root: Path, recipe: Recipe, args: argparse.Namespace, console: Console) -> None:
        self.root, self.recipe, self.args, self.console = root, recipe, args, console
        demo = write_datasets(root / "data", min(recipe.task_items, args.mc_items))  # docs_cloze items
        self.files = write_domain_data(root / "data", demo, args.fractions, args.mc_items)
        self.base, self.base_info = ensure_base(
            recipe,
            demo,
            root,
            Path(os.environ.get("KEELTUNE_CACHE", "~/.cache/keeltune")).expanduser(),
            console,
        )
        self.results_file = root / "results.json"
        self.results: dict[str, dict[str, Any]] = (
            json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        )

    def tasks(self) -> list[dict[str, Any]]:
        every = self.args.cpt_steps + self.args.sft_steps  # step 0, the stage boundary and the end only
        mc = {"kind": "multiple_choice", "format": "instruction", "every_steps": every}
        return [
            {"name": MC_HELD, "path": str(self.files.mc_held), **mc},
            {"name": MC_IN, "path": str(self.files.mc_in), **mc},
            {
                "name": CLOZE,
                "path": str(self.files.demo.docs_cloze),
                "kind": "multiple_choice",
                "format": "text",
                "retention": True,
                "every_steps": every,
            },
        ]

    def overrides(self, method: str, fraction: float, seed: int) -> dict[str, Any]:
        args = self.args
        tree: dict[str, Any] = {
            "data": {
                "validation": {"name": VAL_HELD, "path": str(self.files.val_held), "format": "instruction"},
                "retention": [
                    {"name": GENERAL, "path": str(self.files.demo.retention)},
                    {"name": VAL_IN, "path": str(self.files.val_in), "format": "instruction"},
                ],
            },
            "training": {
                "seed": seed,
                "checkpoint": {"every_steps": args.cpt_steps + args.sft_steps, "keep_last": 1},
            },
            "logging": {"wandb": {"mode": "disabled"}},
        }
        if method == "sft":
            return tree
        cpt = {"name": "stdlib-source", "path": str(self.files.cpt_text), "format": "text"}
        train = [cpt]
        if method == "cpt-replay-sft":
            general = {
                "name": "python-docs-replay",
                "path": str(self.files.demo.general_train),
                "format": "text",
            }
            train = [{**cpt, "weight": 1 - REPLAY_SHARE}, {**general, "weight": REPLAY_SHARE}]
        schedule = self.recipe.finetune
        tree["stages"] = [
            {
                "name": "cpt",
                "data": {"train": train},
                "training": {
                    "max_steps": args.cpt_steps,
                    "lr": args.cpt_lr,
                    "warmup_steps": warmup(schedule.warmup_steps, args.cpt_steps),
                },
            },
            {"name": "sft"},
        ]
        if method == "cpt-vocab-sft":
            tree["model"] = {"extend_vocabulary": {"new_tokens": args.new_tokens}}
        return tree

    def run(self, method: str, fraction: float, seed: int) -> dict[str, Any]:
        key = f"{method}@{fraction:g}@{seed}"
        if key in self.results:
            return self.results[key]
        name = f"da-{method}-{round(fraction * 100)}pct-s{seed}"
        self.console.print(f"[bold]{key}[/]: {name}")
        shutil.rmtree(self.root / name, ignore_errors=True)
        started = time.perf_counter()
        task = {
            "name": f"stdlib-qa-{round(fraction * 100)}pct",
            "path": str(self.files.task_train[fraction]),
            "format": "instruction",
        }
        batch = self.args.batch_size or self.recipe.finetune.batch_size
        schedule = dataclasses.replace(
            self.recipe.finetune,
            steps=self.args.sft_steps,
            eval_every=self.args.cpt_steps + self.args.sft_steps,
            warmup_steps=warmup(self.recipe.finetune.warmup_steps, self.args.sft_steps),
            batch_size=batch,
            micro_batch_size=min(batch, self.recipe.finetune.micro_batch_size),
        )
        config = phase_config(
            name,
            self.root,
            self.base,
            schedule,
            self.recipe,
            task,
            self.files.demo,
            overrides=self.overrides(method, fraction, seed),
            tasks=self.tasks(),
        )
        summary = train(config)
        shutil.rmtree(summary.run_dir / "checkpoints", ignore_errors=True)
        records = read_metrics(summary.run_dir)
        evals = [r for r in records if "val/loss" in r]
        result = {
            "run_dir": str(summary.run_dir),
            "steps": summary.steps,
            "seconds": round(time.perf_counter() - started, 1),
            "first": _held_out(summary.first_eval),
            "last": _held_out(summary.last_eval),
            "boundary": _held_out(evals[-2]) if method != "sft" and len(evals) >= 3 else None,
            "tokens_per_s": summary.tokens_per_s,
        }
        if method == "cpt-vocab-sft":
            result["vocabulary"] = _vocabulary_report(summary.run_dir)
        self.results[key] = result
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.results_file)
        last = result["last"]
        self.console.print(
            f"  held-out bpb {last.get('val/bpb', float('nan')):.4f}, in-CPT bpb "
            f"{last.get(f'retention/{VAL_IN}/bpb', float('nan')):.4f}, mc held/in "
            f"{last.get(f'task/{MC_HELD}/acc', float('nan')):.3f}/{last.get(f'task/{MC_IN}/acc', float('nan')):.3f}, "
            f"forgetting {last.get(f'retention/{GENERAL}/forgetting_bpb_pct', float('nan')):+.1f}% per byte "
            f"({result['seconds']:.0f} s)"
        )
        return result


def _held_out(values: dict[str, Any]) -> dict[str, float]:
    """The numbers the bench reads from one evaluation."""
    keep = ("val/", "retention/", "task/")
    return {k: v for k, v in values.items() if k.startswith(keep) and isinstance(v, int | float)}


def _vocabulary_report(run_dir: Path) -> dict[str, Any]:
    """What the trainer wrote about the domain vocabulary (tokens per document before and after), if anything."""
    path = run_dir / EXTENDED_BASE_DIR / "keeltune_vocabulary.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "tokens_per_document": report.get("tokens_per_document"),
        "added": len(report.get("tokens", [])),
        "examples": [t["text"] for t in report.get("tokens", [])[:12]],
    }


# --------------------------------------------------------------------------- report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


COLUMNS = (  # (label, key, format)
    ("stdlib_mc held out", f"task/{MC_HELD}/acc", "acc"),
    ("stdlib_mc in CPT", f"task/{MC_IN}/acc", "acc"),
    ("task bpb held out", "val/bpb", "bpb"),
    ("task bpb in CPT", f"retention/{VAL_IN}/bpb", "bpb"),
    ("forgetting (bpb)", "forgetting", "pct"),
    ("docs_cloze", f"task/{CLOZE}/acc", "acc"),
)


def final(results: dict[str, dict[str, Any]], key: str, metric: str) -> float:
    """A run's last evaluated ``metric``; ``forgetting``: the rise of the general set's bits per byte over the
    original base (step 0 of SFT alone of the same size and seed). The trainer's own ``forgetting_bpb_pct`` is
    against the run's step 0, which with a domain vocabulary is the extended base (its new rows untrained)."""
    values = results[key]["last"]
    if metric != "forgetting":
        return values.get(metric, float("nan"))
    method, rest = key.split("@", 1)
    bpb = f"retention/{GENERAL}/bpb"
    return 100 * (values[bpb] / results[f"{BASELINE}@{rest}"]["first"][bpb] - 1)


def table(
    results: dict[str, dict[str, Any]], fractions: list[float], seeds: list[int]
) -> list[dict[str, Any]]:
    """One row per (fraction, method): each column's mean over the seeds run and its ratio against SFT alone
    of the same fraction and seeds (accuracy and bpb: ratio; forgetting: difference in points)."""
    rows = []
    for fraction in fractions:
        for method in METHODS:
            ran = [s for s in seeds if f"{method}@{fraction:g}@{s}" in results]
            if not ran:
                continue
            row: dict[str, Any] = {"fraction": fraction, "method": method, "seeds": ran}
            for _label, key, kind in COLUMNS:
                mine = [final(results, f"{method}@{fraction:g}@{s}", key) for s in ran]
                base = [final(results, f"{BASELINE}@{fraction:g}@{s}", key) for s in ran]
                row[key] = _mean(mine)
                row[key + ":spread"] = (max(mine) - min(mine)) / 2
                row[key + ":vs"] = _mean(mine) - _mean(base) if kind == "pct" else _mean(mine) / _mean(base)
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, kind: str, method: str) -> str:
    value, spread, versus = row[key], row[key + ":spread"], row[key + ":vs"]
    if kind == "acc":
        text = f"{100 * value:.1f}% (±{100 * spread:.1f})"
    elif kind == "bpb":
        text = f"{value:.3f} (±{spread:.3f})"
    else:
        text = f"{value:+.1f}% (±{spread:.1f})"
    if method == BASELINE:
        return text
    return text + (f" **{versus:+.1f} pts**" if kind == "pct" else f" **x{versus:.3f}**")


def plot(rows: list[dict[str, Any]], base: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    panels = (  # title, [(key, legend)], scale
        (
            "task loss, bits per byte (lower is better)",
            [("val/bpb", "held-out modules"), (f"retention/{VAL_IN}/bpb", "in-CPT modules")],
            1.0,
        ),
        (
            "stdlib_mc accuracy, % (chance 25%)",
            [(f"task/{MC_HELD}/acc", "held-out modules"), (f"task/{MC_IN}/acc", "in-CPT modules")],
            100.0,
        ),
        (
            "forgetting: general docs bpb rise over the base, %",
            [("forgetting", "python-docs")],
            1.0,
        ),
        ("retention: docs_cloze accuracy, %", [(f"task/{CLOZE}/acc", "docs_cloze")], 100.0),
    )
    labels = [f"{round(r['fraction'] * 100)}% {r['method']}" for r in rows]
    x = list(range(len(rows)))
    for ax, (title, keys, scale) in zip(axes, panels, strict=True):
        width = 0.8 / len(keys)
        values = []
        for j, (key, name) in enumerate(keys):
            heights = [r[key] * scale for r in rows]
            values += heights
            ax.bar(
                [i + (j - (len(keys) - 1) / 2) * width for i in x],
                heights,
                width,
                yerr=[r[key + ":spread"] * scale for r in rows],
                label=name,
                color=f"C{j}",
            )
            if key in base and "forgetting" not in key:
                ax.axhline(base[key] * scale, ls=":", lw=1.2, color=f"C{j}", label=f"{name}: base")
                values.append(base[key] * scale)
        if "bits per byte" in title:
            low, high = min(values), max(values)
            ax.set_ylim(low - 0.15 * (high - low), high + 0.1 * (high - low))
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    figure.suptitle(
        "Domain adaptation with scarce task data: SFT alone vs CPT -> SFT (mean of seeds, half-range as bars)"
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/keeltune-domain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--replay-seeds", type=int, nargs="+", help="seeds of cpt-replay-sft (default: the first)"
    )
    parser.add_argument("--cpt-steps", type=int, default=40)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--cpt-lr", type=float, default=5e-4)
    parser.add_argument(
        "--batch-size", type=int, help="sequences per step, both stages (default: the demo fine-tune's 16)"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--mc-items", type=int, default=100, help="items of each stdlib_mc variant and of docs_cloze"
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/domain_adaptation.png"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the table and plot of the runs already in ROOT/results.json (a run cut short)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="the demo's seconds-long recipe, 1 seed, few steps"
    )
    args = parser.parse_args()
    recipe = DEFAULT
    if args.smoke:
        recipe = SMOKE
        args.seeds, args.cpt_steps, args.sft_steps, args.mc_items = args.seeds[:1], 6, 4, 24
        args.batch_size = None
        args.new_tokens = min(args.new_tokens, 32)
        if args.root == parser.get_default("root"):
            args.root = Path("/tmp/keeltune-domain-smoke")
        if args.plot == parser.get_default("plot"):
            args.plot = args.root / "domain_adaptation.png"
    args.fractions = sorted(args.fractions)
    replay_seeds = args.replay_seeds or args.seeds[:1]
    console = Console(width=220)
    started = time.perf_counter()
    bench = Bench(args.root.resolve(), recipe, args, console)
    console.print(f"data: {json.dumps(bench.files.counts)}")
    # the order of priority, so that a run cut short has whole comparisons: the first seed's SFT / CPT / vocabulary
    # grid, then per data size the replay variant and the other seeds
    core = [m for m in args.methods if m != "cpt-replay-sft"]
    plan = [(m, f, args.seeds[0]) for f in args.fractions for m in core]
    for fraction in args.fractions:
        if "cpt-replay-sft" in args.methods:
            plan += [("cpt-replay-sft", fraction, s) for s in replay_seeds]
        plan += [(m, fraction, s) for s in args.seeds[1:] for m in core]
    for method, fraction, seed in [] if args.report_only else plan:
        if method != BASELINE:
            bench.run(BASELINE, fraction, seed)
        bench.run(method, fraction, seed)

    rows = table(bench.results, args.fractions, args.seeds)
    first = bench.results[f"{BASELINE}@{args.fractions[0]:g}@{args.seeds[0]}"]["first"]
    console.print(
        f"\nbase model (step 0): task bpb held out {first.get('val/bpb', float('nan')):.3f}, in CPT "
        f"{first.get(f'retention/{VAL_IN}/bpb', float('nan')):.3f}; stdlib_mc held out "
        f"{100 * first.get(f'task/{MC_HELD}/acc', float('nan')):.1f}%, in CPT "
        f"{100 * first.get(f'task/{MC_IN}/acc', float('nan')):.1f}%; docs_cloze "
        f"{100 * first.get(f'task/{CLOZE}/acc', float('nan')):.1f}%; {GENERAL} bpb "
        f"{first.get(f'retention/{GENERAL}/bpb', float('nan')):.3f}"
    )
    console.print(
        "\nmean over seeds (± half the range); bold: ratio to SFT alone of the same data size and seeds "
        "(forgetting: difference in points)"
    )
    console.print("| task data | method | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |")
    console.print("|---" * (3 + len(COLUMNS)) + "|")
    for row in rows:
        cells = [_cell(row, key, kind, row["method"]) for _, key, kind in COLUMNS]
        console.print(
            f"| {round(row['fraction'] * 100)}% | {row['method']} | {','.join(map(str, row['seeds']))} | "
            + " | ".join(cells)
            + " |"
        )
    boundary = [
        (k, r["boundary"]) for k, r in bench.results.items() if r.get("boundary") and k.startswith("cpt-sft@")
    ]
    for key, values in boundary[:1]:
        console.print(
            f"after the CPT stage alone ({key}): task bpb held out {values.get('val/bpb', float('nan')):.3f}, "
            f"in CPT {values.get(f'retention/{VAL_IN}/bpb', float('nan')):.3f}, forgetting "
            f"{values.get(f'retention/{GENERAL}/forgetting_bpb_pct', float('nan')):+.1f}% per byte"
        )
    for key, result in bench.results.items():
        if result.get("vocabulary"):
            console.print(f"vocabulary ({key}): {json.dumps(result['vocabulary'])[:400]}")
            start = result["first"]
            console.print(
                "  the extended base at step 0 (new rows = mean of their pieces): "
                + ", ".join(
                    f"{name} bpb {start[k]:.3f} ({100 * (start[k] / first[k] - 1):+.1f}% over the base)"
                    for name, k in (
                        (GENERAL, f"retention/{GENERAL}/bpb"),
                        ("task held out", "val/bpb"),
                        ("task in CPT", f"retention/{VAL_IN}/bpb"),
                    )
                )
            )
            break
    plot(rows, first, args.plot)
    console.print(f"plot: {args.plot}")
    seconds = sum(r["seconds"] for r in bench.results.values())
    console.print(
        f"{len(bench.results)} runs ({seconds:.0f} s of training and evaluation) on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}; this invocation {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
