"""compare --forgetting: the base model's own LM loss on general text before and after each run, through the
trained body with its method applied; zero for a method that leaves the body as it was, reused on a rerun, and a
clear reason where the base checkpoint has no LM head."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import sentences, tiny_recipe, write_jsonl
from test_language_modeling import tiny_gpt2  # noqa: F401 (fixture)

import hf_finetune.engine as engine
from hf_finetune.compare import compare
from hf_finetune.forgetting import after_lm, batches, corpus_texts, lm_loss, load_lm


def corpus(path: Path) -> Path:
    """Paragraphs of the synthetic sentences, 20 words or more each."""
    rng = random.Random(9)
    rows = [r["sentence"] for r in sentences(240, seed=9)]
    path.write_text("\n".join(" ".join(rng.sample(rows, 6)) for _ in range(40)) + "\n")
    return path


def in_process(recipe):
    return engine.train(recipe, overwrite=True)


def run_compare(model: Path, data: Path, tmp_path: Path, methods: list[str]) -> dict:
    write_jsonl(data / "train.jsonl", sentences(256, seed=1))
    write_jsonl(data / "validation.jsonl", sentences(64, seed=2))
    raw = tiny_recipe(model, data, tmp_path / "cmp", **{"training.max_steps": 6, "training.lr": 5e-3})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    compare(str(recipe), methods, [1], forgetting=str(corpus(tmp_path / "general.txt")), train_fn=in_process)
    return json.loads((tmp_path / "cmp" / "comparison.json").read_text())


def test_increase_per_method_is_zero_for_a_frozen_body_and_reruns_reuse(tiny_bert: Path, tmp_path: Path) -> None:
    data = run_compare(tiny_bert, tmp_path, tmp_path, ["full", "lora", "prefix"])
    header = data["forgetting"]
    assert header["objective"] == "masked" and header["not_measured"] is None and header["paragraphs"] == 40
    # the loss is the token-weighted mean of transformers' own masked-LM loss over the same batches
    scored = batches(str(tiny_bert), corpus_texts(str(tmp_path / "general.txt"), 200), 128, 16)
    model = load_lm(str(tiny_bert))
    with torch.no_grad():
        counts = [int((b["labels"] != -100).sum()) for b in scored]
        losses = [model(**b).loss.item() for b in scored]
    assert header["before"] == pytest.approx(sum(n * v for n, v in zip(counts, losses, strict=True)) / sum(counts))
    change = {r["method"]: r["forgetting"] for r in data["runs"]}
    # prefix tuning trains virtual tokens and a head: the body, and so its LM loss, is exactly as it was
    assert change["prefix"] == 0.0
    assert change["full"] != 0.0 and change["lora"] != 0.0
    run = next(r for r in data["runs"] if r["method"] == "full")
    assert run["lm_loss_after"] == pytest.approx(header["before"] + run["forgetting"])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Forgetting" in md and f"- full: {change['full']:+.4f}" in md
    assert "Forgetting: increase of the general-text LM loss" in (tmp_path / "cmp" / "report.html").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("forgetting.json")}
    assert len(stamps) == 3
    again = run_compare(tiny_bert, tmp_path, tmp_path, ["full", "lora", "prefix"])
    assert {r["method"]: r["forgetting"] for r in again["runs"]} == change
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("forgetting.json")}


def test_a_base_checkpoint_without_an_lm_head_says_so(tiny_bert_pretrained: Path, tmp_path: Path) -> None:
    data = run_compare(tiny_bert_pretrained, tmp_path, tmp_path, ["lora"])
    assert data["forgetting"]["not_measured"].startswith("the base checkpoint has no LM head (missing cls.")
    assert "forgetting" not in data["runs"][0]
    assert "Not measured: the base checkpoint has no LM head" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_causal_body_transplanted_unchanged_scores_the_same_and_a_changed_one_does_not(
    tiny_gpt2: Path,  # noqa: F811 (fixture)
) -> None:
    texts = ["the cat sat on the mat and the dog ran home ."] * 8
    scored = batches(str(tiny_gpt2), texts, 32, 4)
    base = load_lm(str(tiny_gpt2))
    before = lm_loss(base, scored, causal=True)
    assert lm_loss(after_lm(str(tiny_gpt2), base.base_model), scored, causal=True) == before
    with torch.no_grad():
        weight = base.base_model.h[0].mlp.c_fc.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    assert lm_loss(after_lm(str(tiny_gpt2), base.base_model), scored, causal=True) != before
    # transformers' own causal-LM loss on one batch equals ours
    with torch.no_grad():
        reference = load_lm(str(tiny_gpt2))(**scored[0]).loss.item()
    assert lm_loss(load_lm(str(tiny_gpt2)), scored[:1], causal=True) == pytest.approx(reference, rel=1e-5)


def test_a_missing_corpus_fails_before_any_run_trains(tiny_bert: Path, tmp_path: Path) -> None:
    from hf_finetune.errors import InputError

    raw = tiny_recipe(tiny_bert, tmp_path, tmp_path / "cmp", **{"training.max_steps": 2})
    write_jsonl(tmp_path / "train.jsonl", sentences(32, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", sentences(8, seed=2))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    trained = []
    with pytest.raises(InputError, match="forgetting corpus nowhere.txt: no such text file"):
        compare(str(recipe), ["full"], [1], forgetting="nowhere.txt", train_fn=trained.append)
    assert trained == [] and not (tmp_path / "cmp").exists()


def test_the_forgetting_flag_takes_no_value_and_the_corpus_has_its_own_option() -> None:
    from hf_finetune.cli import parse

    args = parse(["compare", "r.yaml", "--forgetting", "data.train.max_samples=40", "output_dir=o"])
    assert args.forgetting and args.forgetting_corpus is None
    assert sorted(args.overrides) == ["data.train.max_samples=40", "output_dir=o"]
    assert parse(["compare", "r.yaml", "--forgetting-corpus", "my.txt"]).forgetting_corpus == "my.txt"
