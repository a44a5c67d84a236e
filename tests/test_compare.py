"""`hf-finetune compare`: runs through `train`, a table equal to each results.json, reuse, failures as rows,
budget matching, plots."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe

import hf_finetune.engine as engine
from hf_finetune.cli import main
from hf_finetune.compare import compare, pareto


def recipe_file(model: Path, data: Path, tmp_path: Path, **extra: object) -> Path:
    raw = tiny_recipe(model, data, tmp_path / "cmp", **{"training.max_steps": 6, **extra})
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


class CountingTrain:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def __call__(self, recipe):
        self.calls.append((recipe.method.name, recipe.training.seed))
        if recipe.method.name == self.fail:
            raise RuntimeError(f"{self.fail} exploded")
        return engine.train(recipe, overwrite=True)


def test_two_methods_two_seeds_table_equals_results_and_reruns_reuse(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    counter = CountingTrain()
    done = compare(
        str(recipe), ["full", "lora"], [1, 2], per_method=["lora.training.lr=0.01"], train_fn=counter
    )
    assert sorted(counter.calls) == [("full", 1), ("full", 2), ("lora", 1), ("lora", 2)]
    root = tmp_path / "cmp"
    data = json.loads((root / "comparison.json").read_text())
    assert len(data["runs"]) == 4
    for row in data["runs"]:
        results = json.loads((root / row["method"] / f"seed{row['seed']}" / "results.json").read_text())
        assert results["method"] == row["method"] and results["seed"] == row["seed"]
        assert row["quality"] == results["metrics"]["accuracy"]
        assert row["validation/f1_macro"] == results["metrics"]["f1_macro"]
        for key in ("trainable_params", "train_runtime_s", "train_samples_per_s", "peak_memory_mb", "steps"):
            assert row[key] == results[key], key
        assert row["lr"] == (0.01 if row["method"] == "lora" else results["recipe"]["training"]["lr"])
    lora = next(s for s in data["summary"] if s["method"] == "lora")
    accs = [r["quality"] for r in data["runs"] if r["method"] == "lora"]
    assert lora["quality"] == pytest.approx(sum(accs) / 2) and lora["seeds"] == [1, 2]
    with (root / "comparison.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    md = (root / "comparison.md").read_text()
    assert md.startswith("# Method comparison") and "Command:" in md and "torch" in md
    # the t-interval holds the mean; the paired difference on all examples is the difference of the reported means
    assert lora["quality_ci"][0] <= lora["quality"] <= lora["quality_ci"][1]
    (paired,) = data["paired"]
    full = next(s for s in data["summary"] if s["method"] == "full")
    best, other = (full, lora) if full["quality"] >= lora["quality"] else (lora, full)
    assert (paired["against"], paired["method"], paired["seeds"], paired["examples"]) == (
        best["method"], other["method"], [1, 2], 64)
    assert paired["difference"] == pytest.approx(other["quality"] - best["quality"], abs=1e-12)
    assert paired["low"] <= paired["difference"] <= paired["high"]
    assert paired["verdict"] in md and paired["verdict"].startswith(f"{other['method']} vs {best['method']}: accuracy")
    for name in ("quality_vs_params", "quality_vs_time", "memory"):
        assert (root / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("results.json")}
    again = CountingTrain()
    done = compare(
        str(recipe), ["full", "lora"], [1, 2], per_method=["lora.training.lr=0.01"], train_fn=again
    )
    assert again.calls == [] and {r.status for r in done["runs"]} == {"reused"}
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("results.json")}

    # a changed hyperparameter is a different run: only that method retrains
    third = CountingTrain()
    compare(str(recipe), ["full", "lora"], [1, 2], per_method=["lora.training.lr=0.02"], train_fn=third)
    assert sorted(third.calls) == [("lora", 1), ("lora", 2)]


def test_a_failing_method_is_a_row_and_the_others_run(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    done = compare(str(recipe), ["lora", "prefix"], [1], train_fn=CountingTrain(fail="lora"))
    status = {r.method: (r.status, r.error) for r in done["runs"]}
    assert status["lora"] == ("failed", "RuntimeError: lora exploded") and status["prefix"][0] == "trained"
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["status"] for r in data["runs"]] == ["failed", "trained"]
    assert "lora exploded" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "lora" / "seed1" / "error.txt").exists()


def test_budget_matched_lora_and_adalora_train_the_same_number_of_parameters(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path, **{"method.r": 6})
    done = compare(str(recipe), ["lora", "adalora"], [1], budget_matched=True)
    counts = {r.method: r.results["trainable_params"] for r in done["runs"]}
    assert abs(counts["adalora"] - counts["lora"]) / counts["lora"] < 0.05, counts
    adalora = next(r for r in done["runs"] if r.method == "adalora")
    assert adalora.recipe.method.r == 6 and adalora.recipe.method.target_r == 4
    row = next(
        r
        for r in json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
        if r["method"] == "adalora"
    )
    assert row["final_trainable_params"] < row["trainable_params"]  # pruned ranks no longer count


def test_dry_run_trains_nothing_and_cli_exit_codes(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    # overrides after options, as users type them
    argv = [
        "compare",
        str(recipe),
        "--methods",
        "full,lora",
        "--seeds",
        "1,2",
        "--dry-run",
        "training.max_steps=3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "lora" in out and "seed 2" in out and " 3 steps" in out
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(recipe), "--methods", "full", "--set", "lora.training.lr=1"]) == 2
    assert "not among the methods" in capsys.readouterr().err
    assert main(["compare", str(recipe), "--seeds", "one"]) == 2


def test_dry_run_counts_steps_as_the_engine_does(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed LM blocks, not raw rows, and the launcher's process count: the dry run's steps are the run's."""
    from conftest import write_jsonl
    from test_language_modeling import lm_recipe, story

    from hf_finetune.recipe import recipe_from_dict
    from hf_finetune.scratch import Dims, write_scratch_model

    model = write_scratch_model(tmp_path / "gpt", "gpt2", story(100, 0), Dims(layers=1, d_model=16, heads=2,
                                max_positions=64, vocab_size=120, dropout=0.0))  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in story(90, 1)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in story(8, 2)])
    raw = lm_recipe(model, tmp_path, tmp_path / "cmp", **{"training.epochs": 1, "training.max_steps": None})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    trained = engine.train(recipe_from_dict({**raw, "output_dir": str(tmp_path / "single")}))["steps"]
    assert trained != -(-90 // 8)  # the rows packed into 32-token blocks make the batches, not the 90 rows
    capsys.readouterr()
    assert main(["compare", str(recipe), "--methods", "full", "--dry-run"]) == 0
    assert f" {trained} steps" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    assert main(["compare", str(recipe), "--methods", "full", "--dry-run"]) == 0
    assert f" {-(-trained // 2)} steps" in capsys.readouterr().out


def test_pareto_front() -> None:
    points = [("full", 1e6, 0.9), ("lora", 1e4, 0.88), ("prefix", 2e4, 0.85), ("ia3", 1e3, 0.7)]
    assert pareto(points) == {"full", "lora", "ia3"}


def test_a_run_failing_in_its_own_process_is_reported_with_its_error(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    done = compare(str(recipe), ["full", "lora"], [1], per_method=["lora.training.max_length=4096"])
    status = {r.method: (r.status, r.error) for r in done["runs"]}
    assert status["full"][0] == "trained"
    assert status["lora"][0] == "failed" and "InputError: training.max_length: 4096" in status["lora"][1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return fields[0], int(fields[1])


def _cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a process, in clock ticks (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> set[int]:
    return {int(p.name) for p in Path("/proc").glob("[0-9]*") if (_stat(int(p.name)) or ("", 0))[1] == pid}


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has ended; only its exit status waits to be read


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_isolated_run_ends_when_the_comparison_is_killed(tmp_path: Path) -> None:
    """`kill -9` of a comparison must not leave its current run training on its own."""
    script = "from hf_finetune.compare import run_isolated; import time; run_isolated(time.sleep, 300)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not (workers := _children(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers, "the pool worker never started"
        # let the worker import and run its initializer: its CPU time stops growing once it sleeps in the task
        # (a fixed wait is too short on a loaded machine)
        previous, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline:
            now = {w: _cpu_ticks(w) for w in workers}
            if now == previous:
                break
            previous = now
            time.sleep(0.5)
        workers = _children(parent.pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while (alive := {w for w in workers if _running(w)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"processes {alive} outlived the killed comparison"
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in workers | _children(parent.pid):  # reparented once the parent is gone: the recorded ones too
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_compute_matched_gives_each_method_the_steps_its_budget_buys(
    tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    recipe = recipe_file(tiny_bert_pretrained, data_dir, tmp_path)
    root = tmp_path / "cmp"
    for budget in ("tokens=2500", "time=1.5"):
        kind, amount = budget.split("=")
        compare(str(recipe), ["full", "lora"], [1], compute_matched=budget, train_fn=CountingTrain())
        data = json.loads((root / "comparison.json").read_text())
        assert data["compute_budget"]["kind"] == kind
        steps = {}
        for method in ("full", "lora"):
            probe = json.loads((root / "probe" / method / "results.json").read_text())
            assert probe["steps"] == 8 and "test_metrics" not in probe
            runtime = probe["train_runtime_s"]
            per_step = runtime / 8 if kind == "time" else round(probe["train_tokens_per_s"] * runtime) / 8
            steps[method] = max(1, math.floor(float(amount) / per_step))
            final = json.loads((root / method / "seed1" / "results.json").read_text())
            assert final["steps"] == steps[method] == data["compute_budget"]["methods"][method]["steps"]
        if kind == "tokens":  # the same data in the same order: the same tokens per step for every method
            assert steps["full"] == steps["lora"]
        assert "Compute-matched: every method trained for" in (root / "comparison.md").read_text()
    assert main(["compare", str(recipe), "--methods", "lora", "--compute-matched", "time=soon", "--dry-run"]) == 2
    assert "--compute-matched 'time=soon': expected time=SECONDS or tokens=N" in capsys.readouterr().err
