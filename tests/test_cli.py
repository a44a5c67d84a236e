"""The CLI end to end on a tiny model: train -> eval -> predict on a CSV with other column names and string labels,
merge refusals, and bad input giving one line on stderr with exit code 2 without touching earlier output."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import sentences

from hf_finetune.cli import main


def write_reviews(path: Path, n: int, seed: int) -> Path:
    rows = [{"review": r["sentence"], "verdict": {"pos": "thumbs up", "neg": "thumbs down"}[r["label"]]}
            for r in sentences(n, seed)]  # fmt: skip
    random.Random(seed).shuffle(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "verdict"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def csv_run(tiny_bert: Path, tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A recipe file plus overrides pointing it at CSVs with other column names; the run already trained."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "model": {"name_or_path": str(tiny_bert)}}))
    out = tmp_path / "run"
    overrides = [
        f"data.train.path={write_reviews(tmp_path / 'train.csv', 256, 1)}",
        f"data.validation.path={write_reviews(tmp_path / 'dev.csv', 64, 2)}",
        "data.columns.text=review",
        "data.columns.label=verdict",
        "method.name=full",
        "training.lr=3e-3",
        "training.epochs=4",
        "training.batch_size=16",
        "training.warmup_ratio=0",
        "training.max_length=32",
        f"output_dir={out}",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    return recipe, overrides, out


def test_train_eval_predict_round_trip(csv_run: tuple[Path, list[str], Path], tmp_path: Path, capsys) -> None:
    recipe, overrides, out = csv_run
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["accuracy"] >= 0.9
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "thumbs down", "1": "thumbs up"}

    capsys.readouterr()
    assert main(["eval", str(recipe), *overrides, f"checkpoint={out}"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["metrics"] == pytest.approx(results["metrics"])

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"review": "a great great wonderful movie"}\n{"review": "the awful bad plot"}\n')
    predictions = tmp_path / "out.jsonl"
    code = main(["predict", str(recipe), *overrides, f"checkpoint={out}", "--input", str(inputs), "--output", str(predictions)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["thumbs up", "thumbs down"]
    assert rows[0]["review"] == "a great great wonderful movie"
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["probability"] > 0.5 for r in rows)
    # the recipe's precision applies to predict as to training and eval: bf16 autocast moves the probabilities a bit
    code = main(["predict", str(recipe), *overrides, "training.precision=bf16", f"checkpoint={out}", "--input",
                 str(inputs), "--output", str(tmp_path / "bf16.jsonl")])  # fmt: skip
    assert code == 0
    bf16 = [json.loads(line) for line in (tmp_path / "bf16.jsonl").read_text().splitlines()]
    assert [r["label"] for r in bf16] == ["thumbs up", "thumbs down"]
    differences = [abs(a["probability"] - b["probability"]) for a, b in zip(rows, bf16, strict=True)]
    assert 0 < max(differences) < 0.05, differences

    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_bad_input_exits_2_with_one_line_and_keeps_outputs(csv_run, tmp_path: Path, capsys) -> None:
    recipe, overrides, out = csv_run
    before = (out / "results.json").read_bytes()
    capsys.readouterr()

    assert main(["train", str(recipe), *overrides, "training.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'training.lrr' (did you mean 'training.lr'?)" in err

    assert main(["train", str(recipe), *overrides, "data.columns.text=body"]) == 2
    assert "data.columns.text='body' not found" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"review": "fine"}\n{"text": "no review field"}\n')
    target = tmp_path / "pred.jsonl"
    code = main(["predict", str(recipe), *overrides, f"checkpoint={out}", "--input", str(bad), "--output", str(target)])  # fmt: skip
    assert code == 2
    assert "input row 1: missing field(s) review" in capsys.readouterr().err
    assert not target.exists()
    assert (out / "results.json").read_bytes() == before


def test_merge_refuses_prefix(tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    from conftest import tiny_recipe

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(
        tiny_bert, data_dir, tmp_path / "run", **{"method.name": "prefix", "training.max_steps": 2}
    )
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 2
    assert "method 'prefix' adds virtual tokens" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_merge_into_an_existing_output_is_refused_and_leaves_nothing_behind(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    from conftest import tiny_recipe

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{"method.name": "lora", "training.max_steps": 2})
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    taken = tmp_path / "merged"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "run"), "--output", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .merged.tmp left behind
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "config.json").is_file()


def test_help_lists_tasks_and_methods_and_module_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hf_finetune", "--help"], capture_output=True, text=True, check=True
    )
    assert "tasks: classification" in done.stdout
    assert "full, lora, adalora, prefix, prompt, ia3, dora" in done.stdout


def test_average_is_the_mean_of_the_last_saved_weights(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    from conftest import tiny_recipe
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{"method.name": "full", "training.max_steps": 6,
                                                          "training.save_every": 2})  # fmt: skip
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    # the final weights (step 6, also checkpoint step 6) and checkpoints 4 and 2
    assert main(["average", str(run), "--last", "3", "--output", str(tmp_path / "avg")]) == 0
    name = "bert.encoder.layer.0.attention.self.query.weight"
    saved = [load_file(run / "model" / "model.safetensors")[name]] + [
        load_file(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors")[name] for s in (4, 2)
    ]
    assert not torch.equal(saved[1], saved[2])  # the weights did move between checkpoints
    averaged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "avg").state_dict()[name]
    torch.testing.assert_close(averaged, sum(saved) / 3, rtol=0, atol=1e-7)
    info = json.loads((tmp_path / "avg" / "hf_finetune.json").read_text())
    assert len(info["averaged_from"]) == 3
    assert main(["eval", str(recipe), f"checkpoint={tmp_path / 'avg'}"]) == 0
    # refusals leave the existing output alone
    assert main(["average", str(run), "--last", "4", "--output", str(tmp_path / "avg4")]) == 2
    assert "fewer than 4" in capsys.readouterr().err and not (tmp_path / "avg4").exists()
    assert main(["average", str(run), "--last", "2", "--output", str(tmp_path / "avg")]) == 2
    assert "already exists" in capsys.readouterr().err
