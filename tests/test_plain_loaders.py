"""Output folders load with plain transformers and PEFT, on any machine: an adapter names its base model as the
recipe gave it, and the loaded model scores exactly as `hf-finetune` does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_recipe
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from hf_finetune.checkpoint import load_final
from hf_finetune.engine import train
from hf_finetune.recipe import recipe_from_dict

TEXTS = ["good great film", "the plot was boring and bad", "it"]


def our_logits(out: Path, raw: dict) -> torch.Tensor:
    _, model, tokenizer, _ = load_final(out, recipe_from_dict(raw))
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits


def test_a_lora_folder_loads_with_auto_peft_and_names_its_base_model_as_given(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForSequenceClassification

    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "lora", "training.max_steps": 3})
    train(recipe_from_dict(raw))
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = plain(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, our_logits(out, raw))


def test_a_full_folder_loads_with_auto_model_and_pipeline_under_the_runs_labels(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "full", "training.max_steps": 3})
    train(recipe_from_dict(raw))
    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = plain(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, our_logits(out, raw))
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    expected = [plain.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert [r["label"] for r in classify(TEXTS)] == expected
