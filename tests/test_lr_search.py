"""`compare --lr-search`: short trials per method scored on validation, the best rate used by every final run,
successive halving, reuse, test figures for the chosen settings, the plan and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import sentences, tiny_recipe, write_jsonl

import hf_finetune.engine as engine
from hf_finetune.cli import main
from hf_finetune.compare import compare


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int | None]] = []

    def __call__(self, recipe):
        t = recipe.training
        self.calls.append((recipe.method.name, t.lr, t.max_steps))
        return engine.train(recipe, overwrite=True)


def recipe_file(model: Path, data: Path, tmp_path: Path, **extra: object) -> Path:
    write_jsonl(data / "test.jsonl", sentences(48, seed=5))
    raw = tiny_recipe(model, data, tmp_path / "cmp", **{"training.max_steps": 6, **extra})
    raw["data"]["test"] = {"path": str(data / "test.jsonl")}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))
    return path


def best(trials: list[dict], center: float) -> float:
    """The highest validation accuracy among the trials' own results.json files; a tie goes to the rate nearest
    the method's own."""
    scored = [(t["lr"], json.loads((Path(t["out"]) / "results.json").read_text())["metrics"]["accuracy"]) for t in trials]
    top = max(s for _, s in scored)
    return min((lr for lr, s in scored if s == top), key=lambda lr: abs(math.log(lr / center)))


def test_each_method_runs_at_its_best_validation_trial_and_a_rerun_trains_nothing(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    grids = {"full": [1e-5, 2e-3], "lora": [1e-4, 2e-2]}
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path,
                         **{"compare.lr_search": {"lrs": grids, "budget": 0.5}})  # fmt: skip
    recorder = Recorder()
    done = compare(str(recipe), ["full", "lora"], [1, 2], train_fn=recorder)
    trials = [c for c in recorder.calls if c[2] == 3]
    assert sorted(trials) == sorted((m, lr, 3) for m, lrs in grids.items() for lr in lrs)
    root = tmp_path / "cmp"
    data = json.loads((root / "comparison.json").read_text())
    search = data["lr_search"]
    for method in grids:
        entry = search["methods"][method]
        assert [t["lr"] for t in entry["trials"]] == grids[method] and {t["steps"] for t in entry["trials"]} == {3}
        for trial in entry["trials"]:
            results = json.loads((Path(trial["out"]) / "results.json").read_text())
            # one seed, validation only: the search never sees the test split
            assert results["seed"] == 1 and "test_metrics" not in results
            assert trial["score"] == results["metrics"]["accuracy"]
        assert entry["chosen"] == best(entry["trials"], entry["center"])
        finals = [r for r in done["runs"] if r.method == method]
        assert {r.results["recipe"]["training"]["lr"] for r in finals} == {entry["chosen"]}
        assert {r.results["steps"] for r in finals} == {6}
    # rates were chosen on validation, so the table reports the test split for them
    assert data["quality_split"] == "test"
    for row in data["runs"]:
        results = json.loads((root / row["method"] / f"seed{row['seed']}" / "results.json").read_text())
        assert row["quality"] == results["test_metrics"]["accuracy"]
    md = (root / "comparison.md").read_text()
    assert "Quality is test `accuracy`" in md and "## Learning-rate search" in md
    assert f"**{search['methods']['lora']['chosen']:g} (3)" in md
    assert (root / "lr_search.png").read_bytes()[:4] == b"\x89PNG"

    again = Recorder()
    compare(str(recipe), ["full", "lora"], [1, 2], train_fn=again)
    assert again.calls == []


def test_successive_halving_keeps_the_better_half_at_double_the_steps(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path, **{"training.max_steps": 8})
    recorder = Recorder()
    compare(str(recipe), ["lora"], [3], overrides=["compare.lr_search.rungs=3", "compare.lr_search.budget=0.25"],
            train_fn=recorder)  # fmt: skip
    entry = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["lr_search"]["methods"]["lora"]
    rungs = [[t for t in entry["trials"] if t["rung"] == k] for k in range(3)]
    # five rates 10x each way around LoRA's own at 2 steps, the best three at 4, the best two at 8
    assert [len(r) for r in rungs] == [5, 3, 2]
    assert [{t["steps"] for t in r} for r in rungs] == [{2}, {4}, {8}]
    assert entry["grid"][0] == pytest.approx(entry["center"] / 10, rel=1e-2)
    assert entry["grid"][-1] == pytest.approx(entry["center"] * 10, rel=1e-2)
    for earlier, later in zip(rungs, rungs[1:], strict=False):
        kept = {t["lr"] for t in later}
        assert kept <= {t["lr"] for t in earlier}
        assert min(t["score"] for t in earlier if t["lr"] in kept) >= max(t["score"] for t in earlier if t["lr"] not in kept)
    assert entry["chosen"] == best(rungs[2], entry["center"])
    assert recorder.calls[-1] == ("lora", entry["chosen"], 8)  # the final run


def test_dry_run_lists_the_trials_and_bad_settings_exit_2(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    assert main(["compare", str(recipe), "--methods", "lora", "--lr-search", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr search on seed" in out and "at 2 of 6 steps" in out and "then, at each method's chosen lr" in out
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(recipe), "--methods", "lora", "compare.lr_search.budget=0", "--dry-run"]) == 2
    assert "'compare.lr_search.budget': must be in (0, 1]" in capsys.readouterr().err
    assert main(["compare", str(recipe), "--methods", "lora", "compare.lr_search.lrs.lroa=[1e-3]", "--dry-run"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
