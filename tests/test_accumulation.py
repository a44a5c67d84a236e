"""Gradient accumulation of token-level losses: grad_accum 4 x batch 8 trains exactly like batch 32 (within fp
rounding), on examples whose scored-token counts differ tenfold, because each micro-batch's summed token loss is
divided by the tokens of the whole window, not averaged as per-micro-batch means."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_engine import no_dropout_copy
from test_language_modeling import lm_recipe
from test_seq2seq import LEXICON, mt_recipe, tiny_models  # noqa: F401 (fixture)
from test_token_classification import ner_bert, ner_recipe, ner_rows  # noqa: F401 (fixture)

import hf_finetune.engine as engine
from hf_finetune.recipe import recipe_from_dict


def uneven_pairs(n: int, seed: int) -> list[dict]:
    """Lexicon 'translations' of 1 to 24 words: targets of very different lengths in every batch."""
    rng = random.Random(seed)
    words = list(LEXICON)
    rows = []
    for _ in range(n):
        src = rng.choices(words, k=rng.choice([1, 2, 3, 20, 24]))
        rows.append({"en": " ".join(src), "de": " ".join(LEXICON[w] for w in src)})
    return rows


def train_with(raw: dict, out: Path, batch: int, accum: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    raw = json.loads(json.dumps(raw))
    raw["output_dir"] = str(out)
    raw["training"].update(batch_size=batch, grad_accum=accum, max_steps=4, logging_every=1, warmup_ratio=0.0,
                           group_by_length=False)  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    engine.finish(run, engine.fit(run))
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {n: p.detach().clone() for n, p in run.unwrapped.named_parameters() if p.requires_grad}
    return [r["loss"] for r in log if "loss" in r], weights


def check_accumulation_equals_one_big_batch(raw: dict, tmp_path: Path) -> None:
    big_losses, big = train_with(raw, tmp_path / "big", batch=32, accum=1)
    acc_losses, accumulated = train_with(raw, tmp_path / "accumulated", batch=8, accum=4)
    assert acc_losses == pytest.approx(big_losses, rel=1e-4)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_seq2seq_accumulation_weights_every_token_alike(family: str, request: pytest.FixtureRequest, tmp_path: Path):
    models = request.getfixturevalue("tiny_models")
    write_jsonl(tmp_path / "train.jsonl", uneven_pairs(160, 1))
    write_jsonl(tmp_path / "validation.jsonl", uneven_pairs(8, 2))
    raw = mt_recipe(models[family], tmp_path, tmp_path / "unused", **{
        "method.name": "full", "training.lr": 3e-3, "data.columns.references": None,
    })  # fmt: skip
    check_accumulation_equals_one_big_batch(raw, tmp_path)


def test_causal_lm_accumulation_equals_one_big_batch(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Packed blocks hold equal token counts but for the last: this guards the shifted labels' count."""
    models = request.getfixturevalue("tiny_models")
    texts = [r["de"] for r in uneven_pairs(200, 3)]
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in texts[:8]])
    raw = lm_recipe(models["gpt2"], tmp_path, tmp_path / "unused", **{
        "method.name": "full", "training.lr": 3e-3, "lm.block_size": 16,
    })  # fmt: skip
    check_accumulation_equals_one_big_batch(raw, tmp_path)


def test_token_classification_accumulation_equals_one_big_batch(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    base = request.getfixturevalue("ner_bert")
    rows = ner_rows(200, 4)
    for i, row in enumerate(rows):  # every other sentence four times as long: tagged-word counts differ widely
        if i % 2:
            row["tokens"], row["ner_tags"] = row["tokens"] * 4, row["ner_tags"] * 4
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", ner_rows(8, 5))
    model = no_dropout_copy(base, tmp_path / "model")
    raw = ner_recipe(model, tmp_path, tmp_path / "unused", **{"method.name": "full", "training.lr": 3e-3})
    check_accumulation_equals_one_big_batch(raw, tmp_path)
