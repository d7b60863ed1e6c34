"""``keeltune review create`` and ``results`` on the session's tiny run (the page in a real browser:
test_review_page.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from keeltune.cli import main
from tests.conftest import SharedRun, keeltune, wandb_history, write_jsonl


def _other_model(assets: dict[str, Path], folder: Path) -> Path:
    """A tiny Llama with a tokenizer of its own (another vocabulary than the run's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from keeltune.demo.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in assets["general"].read_text().splitlines()]
    tokenizer = train_tokenizer(texts, 320, folder)
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_review_of_three_models_with_their_own_tokenizers_on_one_and_two_ranks(
    ddp_run: SharedRun, assets: dict[str, Path], tmp_path: Path
) -> None:
    """Every prompt × pair of the run, its base and a model with another tokenizer; each answers through its own
    tokenizer, the same on 2 local ranks as on one; the results and the W&B Table come from the votes."""
    from keeltune.review.store import VoteLog, load_review
    from keeltune.training.review_answers import answer_prompts, generate_answers, load_prompts, review_models

    run = ddp_run.copy(tmp_path)
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    saved["logging"]["wandb"] = {"mode": "offline", "project": "review-test"}
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    other = _other_model(assets, tmp_path / "other-model")
    done = keeltune(
        "review", "create", str(run.run_dir), "--against", "base", "--against", str(other),
        "--n", "3", "--max-new-tokens", "5", "--name", "r1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    review = load_review(run.run_dir, "r1")
    assert review.models == ["test", "base", "other-model"] and len(review.items) == 3 * 3
    assert [m["tokenizer"] for m in review.key["models"]] == [
        str(run.run_dir / "final"), str(assets["model"]), str(other)
    ]  # fmt: skip

    from keeltune.distributed import ParallelEnv

    # the run's generate task (qa), drawn as create drew with its seed (a random one, recorded in the key)
    prompts = load_prompts(run.run_dir, None, None, 3, review.key["seed"], 5)
    models = review_models(run.run_dir, ["base", str(other)])
    own = answer_prompts(
        other, str(other), prompts, max_length=64, batch_size=16, precision="fp32", parallel=ParallelEnv()
    )
    on_ranks = generate_answers(run.run_dir, models, prompts, nproc=2)
    for item in review.keyed_items():
        k = review.key["prompt_index"][item["id"]]
        for side, model in item["models"].items():
            assert item["answers"][side] == on_ranks[model][k]  # 2 ranks: the answers of one process
            if model == 2:
                assert item["answers"][side] == own[k]  # the other model read the prompt with its tokenizer
    assert any(answer for answer in own)

    log = VoteLog(review.folder)  # two reviewers: ann prefers the run, bob always says tie
    for item in review.keyed_items():
        run_side = next((side for side, model in item["models"].items() if model == 0), "A")
        log.append({"vote_id": "a" + item["id"], "reviewer": "ann", "item": item["id"], "choice": run_side,
                    "criteria": {"helpful": run_side}, "comment": ""})  # fmt: skip
        log.append({"vote_id": "b" + item["id"], "reviewer": "bob", "item": item["id"], "choice": "tie",
                    "criteria": {}, "comment": "same"})  # fmt: skip
    log.close()
    done = keeltune("review", "results", str(run.run_dir), "--name", "r1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    vs = {row["opponent"]: row for row in results["vs"]}
    assert vs["base"]["wins"] == 3 and vs["base"]["ties"] == 3 and vs["base"]["losses"] == 0
    assert vs["base"]["rate"] == pytest.approx(0.75)  # (3 wins + 3 ties / 2) / 6 decisive votes
    strengths = {row["model"]: row["strength"] for row in results["bradley_terry"]}
    assert strengths["test"] > strengths["base"] and strengths["test"] > strengths["other-model"]
    out = review.folder / "results"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "75.0%" in (out / "results.md").read_text() or "0.75" in (out / "results.md").read_text()
    offline = sorted((run.run_dir / "wandb").glob("offline-run-*"))
    tables = list((offline[-1] / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 1 and "review/r1" in str(tables[0])
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 18 and {"reviewer", "choice", "winner", "answer_a"} <= set(table["columns"])
    assert wandb_history(next(offline[-1].glob("*.wandb")))  # the run's own W&B run, resumed


def test_review_bad_input_is_refused_before_any_generation(
    ddp_run: SharedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ddp_run.copy(tmp_path)

    def refused(*args: str) -> str:
        assert main(["review", *args]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "has no items" in refused("create", str(run.run_dir), "--prompts", str(empty))
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"instruction": "hi"}, {"question": "where?"}])
    message = refused("create", str(run.run_dir), "--prompts", str(no_field), "--format", "instruction")
    assert f"{no_field}:2: missing field 'instruction'" in message
    assert "neither a file nor a task" in refused("create", str(run.run_dir), "--prompts", "nope")
    assert "--name" in refused("create", str(run.run_dir), "--name", "../escape")
    assert "neither a run folder" in refused("create", str(run.run_dir), "--against", str(tmp_path))
    assert "no review named 'r9'" in refused("serve", str(run.run_dir), "--name", "r9")
    shutil.rmtree(run.run_dir / "final")
    shutil.rmtree(run.run_dir / "checkpoints")
    message = refused("create", str(run.run_dir))
    assert "no final model (final/) and no usable checkpoint" in message and "train it first" in message
    assert not (run.run_dir / "review").exists()
