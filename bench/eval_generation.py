"""Generation throughput of keeltune's batched task evaluation vs a per-item loop and lm-evaluation-harness.

keeltune: ``prepare_task`` + ``run_task`` on a ``generate`` task (format ``instruction``) with ``HFTaskModel`` and a
one-process ``ParallelEnv``: items sorted by length, left padding, KV cache, ``--batch-size`` items per
``generate`` call. Baselines, in this process, on the same prompts, model and settings (greedy, the same
``max_new_tokens`` and stop strings):

- per item: ``model.generate`` on one prompt at a time (batch 1, KV cache on, the same stop-string check as
  keeltune's), the naive loop. Goal: keeltune >= 5x.
- lm-eval: ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=..., batch_size=--batch-size)`` and its
  ``generate_until`` on ``Instance`` requests whose context strings decode to keeltune's prompt ids (checked).
  Goal: keeltune >= 1x.

The model is the demo's base architecture at random init (or ``--model larger``: an 8-layer, hidden-512 Llama, 26M parameters)
with the demo's tokenizer (byte-level BPE, 2048, trained on ``pydoc_data.topics``). So that every method
generates exactly ``--max-new-tokens`` tokens per item, the special tokens' (tied) embedding rows are zeroed:
their logit is 0 while the largest of the others is always > 0, so greedy decoding never ends at EOS; the
stop string never occurs. The generated tokens are counted per item for every method (tokens/s uses the
counts) and the methods' outputs compared. Repeats are interleaved, the order rotating (keeltune, per item,
lm-eval; per item, lm-eval, keeltune; ...), and medians compared.

    python bench/eval_generation.py [--items 96] [--max-new-tokens 32] [--batch-size 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from keeltune.config.schema import EvalConfig, TaskConfig, TaskGenerationConfig
from keeltune.demo.recipe import DEFAULT, ModelShape, llama_config
from keeltune.demo.tokenizer import train_tokenizer
from keeltune.distributed import ParallelEnv
from keeltune.eval.tasks import HFTaskModel, prepare_task, run_task

STOP = "\u2603 end \u2603"  # a stop string the model never produces: fixed-length generations
TEMPLATES = (
    "Explain the Python topic '{title}'.",
    "What does the Python documentation say about '{title}'? Answer in one sentence.",
)
LARGER = ModelShape(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376
)


def task_records(count: int, excerpt_words: int) -> list[dict[str, str]]:
    """``count`` instruction items built from pydoc topic titles, each with an excerpt of the topic (0 to
    ``excerpt_words`` words) as its input: prompts of varied length."""
    from pydoc_data.topics import topics

    titles = sorted(topics)
    records = []
    for k in range(count):
        title = titles[k % len(titles)]
        words = re.sub(r"\s+", " ", topics[title]).strip().split(" ")
        excerpt = " ".join(words[: (k * 37) % (excerpt_words + 1)])
        template = TEMPLATES[(k // len(titles)) % len(TEMPLATES)]
        records.append(
            {"instruction": template.format(title=title), "input": excerpt, "answer": title, "id": str(k)}
        )
    return records


def build_model(kind: str, tokenizer: Any) -> Any:
    from transformers import LlamaForCausalLM

    recipe = DEFAULT if kind == "demo" else dataclasses.replace(DEFAULT, model=LARGER)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(recipe, tokenizer)).eval()
    with torch.no_grad():  # greedy never picks a special token (tied: output logit 0), see the docstring
        for special in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
            model.get_input_embeddings().weight[special] = 0.0
    return model


def new_tokens(out: torch.Tensor, width: int, specials: set[int]) -> list[list[int]]:
    """Each row's generated tokens: special ids (EOS, and pad after a row ended) are never generated here."""
    return [[t for t in row if t not in specials] for row in out[:, width:].tolist()]


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]


class CountingTaskModel(HFTaskModel):
    """``HFTaskModel`` that records each prompt's generated tokens (after the timed call's own work)."""

    def __init__(self, model: Any, specials: set[int]) -> None:
        super().__init__(model, None)
        self.specials, self.generated = specials, {}

    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        out = super().generate(input_ids, **options)
        rows = unpadded(input_ids, options["attention_mask"])
        for prompt, tokens in zip(rows, new_tokens(out, input_ids.shape[1], self.specials), strict=True):
            self.generated[prompt] = tokens
        return out


class StopStrings:
    """Stops a batch-1 generation once its new text holds a stop string (what keeltune's check does per row)."""

    def __init__(self, tokenizer: Any, stops: list[str], width: int) -> None:
        self.tokenizer, self.stops, self.width = tokenizer, stops, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stops)], device=input_ids.device)


@torch.no_grad()
def per_item(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int, specials: set[int]
) -> list[list[int]]:
    from transformers import StoppingCriteriaList

    generated = []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopStrings(tokenizer, [STOP], ids.shape[1])]),
        )
        generated.append(new_tokens(out, ids.shape[1], specials)[0])
    return generated


def make_lm_eval(model: Any, tokenizer: Any, batch_size: int, specials: set[int]) -> Any:
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        """HFLM that records each prompt's generated tokens (after the timed call's own work)."""

        def _model_generate(self, context, max_length, stop, **kwargs):  # noqa: ANN001, ANN202
            out = super()._model_generate(context, max_length, stop, **kwargs)
            rows = unpadded(context, kwargs["attention_mask"])
            for prompt, tokens in zip(rows, new_tokens(out, context.shape[1], specials), strict=True):
                self.generated[prompt] = tokens
            return out

    lm = CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.generated = {}
    return lm


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine spent busy (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=EvalConfig().task_batch_size,
        help="eval.task_batch_size (default: keeltune's) and lm-eval's batch_size",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--excerpt-words",
        type=int,
        default=40,
        help="longest topic excerpt in a prompt (sets prompt lengths)",
    )
    parser.add_argument("--model", choices=("demo", "larger"), default="demo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        from pydoc_data.topics import topics

        tokenizer = train_tokenizer(list(topics.values()), DEFAULT.vocab_size, Path(tmp) / "tokenizer")
        model = build_model(args.model, tokenizer)
        specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        path = Path(tmp) / "task.jsonl"
        path.write_text(
            "".join(json.dumps(r) + "\n" for r in task_records(args.items, args.excerpt_words)),
            encoding="utf-8",
        )
        task = TaskConfig(
            name="pydoc_gen",
            path=str(path),
            kind="generate",
            format="instruction",
            generation=TaskGenerationConfig(max_new_tokens=args.max_new_tokens, stop=[STOP]),
        )
        max_length = model.config.max_position_embeddings
        prepared = prepare_task(task, tokenizer, max_length=max_length)
        prompts = prepared.prompts
        lengths = sorted(len(p) for p in prompts)
        if any(p[0] != tokenizer.bos_token_id for p in prompts):  # prepare_task cut a prompt's start
            raise SystemExit(
                f"prompts longer than {max_length - args.max_new_tokens} tokens: lower --excerpt-words"
            )
        contexts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]  # starts with <|bos|>
        lm = make_lm_eval(model, tokenizer, args.batch_size, specials)
        if any(lm.tok_encode(c) != p for c, p in zip(contexts, prompts, strict=True)):
            raise SystemExit("lm-eval would not see keeltune's prompt ids")
        if len(set(map(tuple, prompts))) != len(prompts):
            raise SystemExit("prompts must be distinct (outputs are matched by prompt)")

        from lm_eval.api.instance import Instance

        until = {"until": [STOP], "max_gen_toks": args.max_new_tokens, "do_sample": False}
        requests = [
            Instance(request_type="generate_until", doc={}, arguments=(c, dict(until)), idx=0)
            for c in contexts
        ]
        ours = CountingTaskModel(model, specials)
        parallel = ParallelEnv()
        results: dict[str, Any] = {}

        def keeltune_run() -> None:  # the task is read and tokenized again, as lm-eval tokenizes its strings
            again = prepare_task(task, tokenizer, max_length=max_length)
            results["keeltune"] = run_task(
                ours, again, tokenizer, parallel, batch_size=args.batch_size, bootstrap_iters=0
            )

        def per_item_run() -> None:
            results["per_item"] = per_item(model, tokenizer, prompts, args.max_new_tokens, specials)

        def lm_eval_run() -> None:
            results["lm_eval"] = lm.generate_until(requests, disable_tqdm=True)

        methods = {"keeltune": keeltune_run, "per_item": per_item_run, "lm_eval": lm_eval_run}
        # warm-up: each method once on a slice of the work (kernels, caches, lazy imports)
        warm = dataclasses.replace(
            prepared, items=prepared.items[: args.batch_size], prompts=prompts[: args.batch_size]
        )
        run_task(ours, warm, tokenizer, parallel, batch_size=args.batch_size, bootstrap_iters=0)
        per_item(model, tokenizer, prompts[:2], args.max_new_tokens, specials)
        lm.generate_until(requests[: args.batch_size], disable_tqdm=True)
        times: dict[str, list[float]] = {name: [] for name in methods}
        load_before = os.getloadavg()
        busy_before, own_before = busy_cpu_s(), own_cpu_s()
        started_all = time.perf_counter()
        names = list(methods)
        for repeat in range(args.repeats):  # each method first, second and third in turn
            for name in names[repeat % 3 :] + names[: repeat % 3]:
                method = methods[name]
                {"keeltune": ours.generated, "lm_eval": lm.generated}.get(name, {}).clear()
                started = time.perf_counter()
                method()
                times[name].append(time.perf_counter() - started)
        total_s = time.perf_counter() - started_all
        others = busy_cpu_s() - busy_before - (own_cpu_s() - own_before)
        load_after = os.getloadavg()

    # generated tokens of each method, item by item (the last repeat's)
    generated = {
        "keeltune": [ours.generated[tuple(p)] for p in prompts],
        "per_item": results["per_item"],
        "lm_eval": [lm.generated[tuple(p)] for p in prompts],
    }
    texts_keeltune = [r["generation"] for r in results["keeltune"].items]
    texts_lm_eval = results["lm_eval"]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; other "
        f"processes used {max(0.0, others) / total_s / (os.cpu_count() or 1):.0%} of the cores during the timed runs"
    )
    print(
        f"model: {args.model} ({params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, vocab {model.config.vocab_size}), random init, fp32, "
        f"attention {model.config._attn_implementation}"
    )
    print(
        f"task: {len(prompts)} items, prompts {lengths[0]} to {lengths[-1]} tokens (median "
        f"{statistics.median(lengths):.0f}), greedy, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats ({total_s:.0f} s)"
    )
    print()
    print("| method | generated tokens | median s | tokens/s | items/s | repeats (s) |")
    print("|---|---|---|---|---|---|")
    rates = {}
    labels = {
        "keeltune": f"keeltune `run_task` (batch {args.batch_size})",
        "per_item": "per-item `model.generate` (batch 1)",
        "lm_eval": f"lm-eval `HFLM.generate_until` (batch {args.batch_size})",
    }
    for name in methods:
        count = sum(len(t) for t in generated[name])
        median = statistics.median(times[name])
        rates[name] = count / median
        repeats = ", ".join(f"{t:.2f}" for t in times[name])
        print(
            f"| {labels[name]} | {count} | {median:.2f} | {count / median:,.0f} | {len(prompts) / median:.1f} | "
            f"{repeats} |"
        )
    print()
    print(f"ratio keeltune / per-item = {rates['keeltune'] / rates['per_item']:.2f}x  (goal >= 5x)")
    print(f"ratio keeltune / lm-eval  = {rates['keeltune'] / rates['lm_eval']:.2f}x  (goal >= 1x)")
    short = {name: sum(len(t) < args.max_new_tokens for t in generated[name]) for name in methods}
    print(f"items with fewer than {args.max_new_tokens} generated tokens: {short}")

    def same(a: str, b: str) -> int:
        return sum(x == y for x, y in zip(generated[a], generated[b], strict=True))

    print(
        f"identical generated tokens, of {len(prompts)} items: keeltune vs per-item {same('keeltune', 'per_item')}, "
        f"lm-eval vs per-item {same('lm_eval', 'per_item')}, keeltune vs lm-eval {same('keeltune', 'lm_eval')}; "
        f"identical texts keeltune vs lm-eval "
        f"{sum(a == b for a, b in zip(texts_keeltune, texts_lm_eval, strict=True))}"
    )


if __name__ == "__main__":
    main()
