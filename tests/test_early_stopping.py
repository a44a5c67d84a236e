"""Early stopping and the best checkpoint's model at the end. The validation metric is scripted (the real evaluation
runs, then its `accuracy` is replaced for the periodic evaluations) so that the expected stop is known exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

import hf_finetune.engine as engine
from hf_finetune.recipe import recipe_from_dict


def scripted(monkeypatch: pytest.MonkeyPatch, run: engine.Run, values: list[float]) -> None:
    """The next validation evaluations report `values` as accuracy; later ones (the final) keep the real figure."""
    real = run.task.evaluate

    def evaluate(*args, **kwargs):
        scores = real(*args, **kwargs)
        if values:
            scores["accuracy"] = values.pop(0)
        return scores

    monkeypatch.setattr(run.task, "evaluate", evaluate)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    common = set(a) & set(b)
    assert len(common) > 10
    return all(torch.equal(a[k], b[k]) for k in common)


def test_stops_after_patience_evaluations_and_ends_with_the_best_model(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{
        "method.name": "full", "training.lr": 1e-3, "training.max_steps": 40, "training.eval_every": 2,
        "training.early_stopping_patience": 3, "training.best_metric": "accuracy",
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    # evaluations at steps 2, 4, 6, 8, 10: the best at step 4, then three without improvement -> stop at step 10
    scripted(monkeypatch, run, [0.5, 0.7, 0.6, 0.7, 0.65])
    results = engine.finish(run, engine.fit(run))
    assert results["steps"] == 10
    assert results["early_stopping"]["stopped"] is True and results["early_stopping"]["best_score"] == 0.7
    assert results["best_checkpoint"] == {"checkpoint": "step_00000004", "score": 0.7}
    assert results["final_model"].startswith("step_00000004")
    # checkpoints written for the best model only: the best and the newest
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000010"]
    final = weights(out / "model")
    assert same_weights(final, weights(out / "checkpoints" / "step_00000004"))
    assert not same_weights(final, weights(out / "checkpoints" / "step_00000010"))
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("early_stopping" in r and r["step"] == 10 for r in log)


def test_a_gain_within_the_threshold_is_no_improvement(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{
        "training.max_steps": 40, "training.eval_every": 2, "training.early_stopping_patience": 2,
        "training.early_stopping_threshold": 0.05, "training.best_metric": "accuracy",
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    # 0.5 best; +0.04: one without; +0.06: best 0.56; +0.04: one without; lower: two without -> stop at step 10
    scripted(monkeypatch, run, [0.5, 0.54, 0.56, 0.60, 0.58])
    results = engine.finish(run, engine.fit(run))
    assert results["steps"] == 10 and results["early_stopping"]["best_score"] == 0.56


def test_a_finished_run_keeps_its_last_model_when_it_is_the_best(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{
        "method.name": "full", "training.lr": 1e-3, "training.max_steps": 8, "training.eval_every": 2,
        "training.load_best_at_end": True, "training.best_metric": "accuracy",
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    scripted(monkeypatch, run, [0.1, 0.2, 0.3, 1.0])  # steps 2, 4, 6, then the last step's own evaluation
    results = engine.finish(run, engine.fit(run))
    assert results["steps"] == 8 and "early_stopping" not in results
    assert results["final_model"].startswith("last step")
    assert not same_weights(weights(out / "model"), weights(out / "checkpoints" / "step_00000006"))


def test_a_finished_run_ends_with_an_earlier_checkpoint_that_beats_its_last_step(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{
        "method.name": "full", "training.lr": 1e-3, "training.max_steps": 8, "training.eval_every": 2,
        "training.load_best_at_end": True, "training.best_metric": "accuracy",
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    scripted(monkeypatch, run, [0.6, 0.9, 0.7, 0.8])
    results = engine.finish(run, engine.fit(run))
    assert results["final_model"].startswith("step_00000004")
    assert same_weights(weights(out / "model"), weights(out / "checkpoints" / "step_00000004"))
    # the final evaluation is the loaded model's own (real) one, and so are the saved predictions
    rows = [json.loads(x) for x in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert sum(r["scores"]["accuracy"] for r in rows) / len(rows) == pytest.approx(results["metrics"]["accuracy"])


def test_resume_keeps_the_count_of_evaluations_without_improvement(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{
        "method.name": "full", "training.lr": 1e-3, "training.max_steps": 40, "training.eval_every": 2,
        "training.save_every": 2, "training.early_stopping_patience": 2, "training.best_metric": "accuracy",
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    scripted(monkeypatch, run, [0.5, 0.7, 0.6, 0.65])  # best at step 4, stop at step 8
    first = engine.finish(run, engine.fit(run))
    assert first["steps"] == 8
    final = weights(out / "model")
    for step in (6, 8):  # as if the run had been killed after its step-4 checkpoint
        shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    raw["training"]["resume"] = True
    run = engine.setup(recipe_from_dict(raw))
    # from a fresh count, 0.6 would be a new best and the run would go on; the checkpoint says best 0.7, none without
    scripted(monkeypatch, run, [0.6, 0.65])
    again = engine.finish(run, engine.fit(run))
    assert again["steps"] == 8 and again["early_stopping"] == first["early_stopping"]
    assert same_weights(weights(out / "model"), final)
