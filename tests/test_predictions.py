"""Saved predictions (`output_dir/predictions/<split>.jsonl`): one row per example, and their per-example values add
up to the split's reported metrics. `check_predictions` is called by one training test of every task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hf_finetune.checkpoint import load_final, write_jsonl_atomic
from hf_finetune.engine import train
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.tasks import TASKS
from tests.conftest import tiny_recipe


def read_predictions(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"{split}.jsonl").read_text().splitlines()]


def rows_in(path: Path) -> int:
    return len(path.read_text().splitlines())


def check_predictions(out: Path, sizes: dict[str, int | None]) -> dict[str, list[dict]]:
    """Each split in `sizes` has that many rows with distinct ids, and each metric they carry per example (`scores`:
    means; `counts`: entity and token sums; `loss`/`tokens`: perplexity) equals results.json's figure."""
    results = json.loads((out / "results.json").read_text())
    found = {}
    for split, size in sizes.items():
        rows = read_predictions(out, split)
        metrics = results["metrics" if split == "validation" else "test_metrics"]
        size = size or len(rows)  # None: a count the test cannot know beforehand (language-model blocks)
        assert len(rows) == size > 0, (split, len(rows), size)
        assert len({json.dumps(r["id"]) for r in rows}) == size
        for key in rows[0].get("scores", {}):
            mean = sum(r["scores"][key] for r in rows) / size
            assert mean == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), (split, key)
        if "counts" in rows[0]:
            total = {k: sum(r["counts"][k] for r in rows) for k in rows[0]["counts"]}
            f1 = 2 * total["correct_entities"] / max(total["predicted_entities"] + total["gold_entities"], 1)
            assert f1 == pytest.approx(metrics["f1"], abs=1e-9)
            assert total["correct_tokens"] / total["tokens"] == pytest.approx(metrics["accuracy"], abs=1e-9)
        if "loss" in rows[0]:
            loss = sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
            assert math.exp(loss) == pytest.approx(metrics["perplexity"], rel=1e-5)
        else:
            assert all("prediction" in r and "reference" in r for r in rows)
        # the paired bootstrap of `compare` recomputes the ranking metric from these rows: on all of them, as reported
        primary = results["primary_metric"]
        scored = [r for r in rows if primary in r.get("scores", {})] or rows
        resampled = TASKS[results["task"]].resampled(scored, primary)
        if resampled is not None:
            value = resampled(np.arange(len(scored))[None, :])[0]
            assert value == pytest.approx(metrics[primary], rel=1e-5, abs=1e-6), (split, primary)
        found[split] = rows
    return found


def test_single_label_predictions_name_the_text_and_their_accuracy_is_the_metric(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    (data_dir / "test.jsonl").write_text((data_dir / "validation.jsonl").read_text())
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"data.test.path": str(data_dir / "test.jsonl"),
                                                   "training.max_steps": 8})  # fmt: skip
    train(recipe_from_dict(raw))
    rows = check_predictions(out, {"validation": 64, "test": 64})
    source = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines()]
    # each row is its own example: the split's order, its text, its label (the loader reads them by length)
    assert [r["id"] for r in rows["validation"]] == list(range(64))
    assert [(r["sentence"], r["reference"]) for r in rows["validation"]] == [(s["sentence"], s["label"]) for s in source]
    assert all(r["prediction"] in ("neg", "pos") and 0.5 <= r["probability"] <= 1 for r in rows["validation"])
    # and its prediction is the model's for that text
    task, model, _, _ = load_final(out, recipe_from_dict(raw))
    predicted = task.predict(model, [{"sentence": s["sentence"]} for s in source])
    assert [p["label"] for p in predicted] == [r["prediction"] for r in rows["validation"]]
    # the test split equals validation here, so its rows do too
    assert [r["prediction"] for r in rows["test"]] == [r["prediction"] for r in rows["validation"]]


def test_a_replaced_run_leaves_no_predictions_of_the_old_one(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (data_dir / "test.jsonl").write_text((data_dir / "validation.jsonl").read_text())
    with_test = tiny_recipe(tiny_bert, data_dir, out, **{"data.test.path": str(data_dir / "test.jsonl"),
                                                         "training.max_steps": 2})  # fmt: skip
    train(recipe_from_dict(with_test))
    assert (out / "predictions" / "test.jsonl").is_file()
    train(recipe_from_dict(tiny_recipe(tiny_bert, data_dir, out, **{"training.max_steps": 2})), overwrite=True)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["validation.jsonl"]


def test_predictions_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "predictions" / "validation.jsonl"
    write_jsonl_atomic(path, [{"id": 0, "prediction": "é"}])
    write_jsonl_atomic(path, [{"id": 1}, {"id": 2}])
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"id": 1}, {"id": 2}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["validation.jsonl"]
