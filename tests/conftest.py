"""Offline fixtures: a tiny BERT built from a config with a WordPiece tokenizer trained here (`make-tiny`'s builder),
and a learnable synthetic classification data set."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# before huggingface_hub is imported: it reads these once (a bare `pytest` run is offline too, not only `make test`)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_finetune.scratch import Dims, write_scratch_model

WORDS = (
    "the a movie film plot actor scene story was is very quite rather really and but so this that it".split()
)
CUES = {"pos": "good great wonderful".split(), "neg": "bad awful boring".split()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on a shared 2-core machine


def sentences(n: int, seed: int) -> list[dict]:
    """Sentences whose label is the polarity of the cue words they contain, learnable even through the frozen
    random features of a tiny model (cues make up about half of the words), and not by length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        words = rng.choices(WORDS, k=rng.randint(2, 6))
        for _ in range(rng.randint(2, 4)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT saved as a plain HF folder, tokenizer trained on the synthetic corpus."""
    corpus = [r["sentence"] for r in sentences(500, seed=0)]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), corpus, vocab_size=120, max_positions=64)


def build_tiny_bert(folder: Path, corpus: list[str], vocab_size: int, max_positions: int) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer trained on `corpus`, saved as a plain HF folder by the same
    builder as `hf-finetune make-tiny --arch bert`."""
    dims = Dims(layers=2, d_model=32, heads=4, ffn=64, max_positions=max_positions, vocab_size=vocab_size)
    return write_scratch_model(folder, "bert", corpus, dims, seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", sentences(256, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", sentences(64, seed=2))
    return tmp_path


def tiny_recipe(model: Path, data: Path, out: Path, **extra: object) -> dict:
    """A recipe dict for the tiny model and synthetic data; `extra` holds dotted overrides."""
    from hf_finetune.recipe import apply_override

    raw: dict = {
        "task": "classification",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": {"path": str(data / "train.jsonl")},
            "validation": {"path": str(data / "validation.jsonl")},
            "columns": {"text": "sentence", "label": "label"},
        },
        "training": {
            "epochs": 3,
            "batch_size": 16,
            "max_length": 32,
            "logging_every": 4,
            "warmup_ratio": 0.0,
        },
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


@pytest.fixture(scope="session")
def tiny_bert_pretrained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT after a short supervised warm-up on the synthetic cues, saved without its head: methods that
    freeze the body (prefix, prompt, IA3) need features that carry the signal, as a real checkpoint's do."""
    folder = tmp_path_factory.mktemp("tiny-bert-pretrained")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = sentences(512, seed=3)  # not the tests' train/validation rows
    for step in range(96):
        chunk = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        batch = tokenizer([r["sentence"] for r in chunk], padding=True, return_tensors="pt")
        labels = torch.tensor([int(r["label"] == "pos") for r in chunk])
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
