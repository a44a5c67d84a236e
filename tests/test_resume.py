"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bit-identical to an uninterrupted one; checkpoint
rotation keeps the last K plus the best; a NaN loss stops the run (or the batch is skipped); output_dir refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

import hf_finetune.engine as engine
from hf_finetune.cli import main
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parent.parent
# Kills the process with SIGKILL right after the metrics line of step >= KILL_AT is written: no cleanup, no flush
# of anything else, exactly like an OOM kill or a pre-empted node. A test wrapper, so the package has no test hook.
KILLER = """
import os, signal, sys
import hf_finetune.checkpoint as checkpoint
write = checkpoint.MetricsLog.write
def killing_write(self, record):
    write(self, record)
    if record["step"] >= int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.MetricsLog.write = killing_write
from hf_finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The final model's saved tensors: the whole model, or the adapter and head for PEFT methods."""
    (file,) = (out / "model").glob("*.safetensors")
    return load_file(str(file))


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ after resume: {different}"
    assert (
        json.loads((a / "results.json").read_text())["metrics"]
        == json.loads((b / "results.json").read_text())["metrics"]
    )
    assert losses(a) == losses(b)


@pytest.fixture(params=["full", "lora", "adalora"])
def resume_recipe(request: pytest.FixtureRequest, tiny_bert: Path, data_dir: Path, tmp_path: Path) -> Path:
    # 256 rows, batch 16: 16 steps an epoch, 2 epochs. Checkpoints every 5 steps, log lines every 3 and evaluations
    # every 10, so a checkpoint falls between log lines (the running loss must survive) and mid-epoch.
    # The model keeps BERT's dropout 0.1: bit-identity needs the RNG states restored, not merely the weights.
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "unused", **{
        "method.name": request.param, "training.lr": 1e-3, "training.epochs": 2, "training.save_every": 5,
        "training.logging_every": 3, "training.eval_every": 10,
    })  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sigkill_mid_epoch_then_resume_is_bit_identical(resume_recipe: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", str(resume_recipe), f"output_dir={straight}"]) == 0

    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": "21", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, "train", str(resume_recipe), f"output_dir={killed}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (killed / "results.json").exists()
    # step 21 is in the second epoch (16 steps each); the newest checkpoint is step 20, 4 batches into that epoch
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*")) == [
        f"step_{s:08d}" for s in (5, 10, 15, 20)
    ]
    assert losses(killed)[-1]["step"] == 21

    by_path = tmp_path / "by_path"
    shutil.copytree(killed, by_path)
    assert main(["train", str(resume_recipe), f"output_dir={killed}", "training.resume=true"]) == 0
    assert_same_run(straight, killed)

    # an explicit checkpoint folder, here one in the first epoch, rewinds to it
    step_10 = by_path / "checkpoints" / "step_00000010"
    assert main(["train", str(resume_recipe), f"output_dir={by_path}", f"training.resume={step_10}"]) == 0
    assert_same_run(straight, by_path)


def test_save_total_limit_keeps_last_and_best(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{
        "method.name": "full", "training.lr": 1e-3, "training.max_steps": 12, "training.save_every": 2,
        "training.eval_every": 2, "training.save_total_limit": 2, "training.best_metric": "accuracy",
    })  # fmt: skip
    real_evaluate = ClassificationTask.evaluate
    # accuracy as seen at steps 2, 4, ..., 10 and at the end: it peaks at step 4, whose checkpoint must outlive rotation
    fake = iter([0.5, 0.9, 0.6, 0.7, 0.8, 0.55])

    def evaluate(self, model, loader, accelerator, split="validation", records=None):
        return {**real_evaluate(self, model, loader, accelerator, split, records), "accuracy": next(fake)}

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    results = engine.train(recipe_from_dict(raw))
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000010", "step_00000012"]
    assert results["best_checkpoint"] == {"checkpoint": "step_00000004", "score": 0.9}
    assert not list((out / "checkpoints").glob(".*"))  # no temporary folder left behind


def nan_at(call: int):
    """A forward hook for every module (torch's global hook: the package has no test switch) turning the loss of the
    `call`-th training forward into NaN."""
    calls = {"n": 0}

    def hook(module, args, output):
        # only the model's own output carries the loss
        if module.training and isinstance(output, dict) and output.get("loss") is not None:
            calls["n"] += 1
            if calls["n"] == call:
                output["loss"] = output["loss"] * float("nan")
        return output

    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "full", "training.save_every": 3})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    handle = nan_at(7)
    try:
        assert main(["train", str(recipe)]) == 2
    finally:
        handle.remove()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-finetune: error")]
    assert len(errors) == 1 and "training step 7: loss is nan" in errors[0] and "step_00000006" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    assert not (out / "results.json").exists()

    # skipping instead: the run finishes, the bad step is logged, and weights stay finite
    raw["output_dir"] = str(tmp_path / "skip")
    raw["training"].update(skip_nonfinite_batches=True, max_steps=10)
    handle = nan_at(7)
    try:
        results = engine.train(recipe_from_dict(raw))
    finally:
        handle.remove()
    assert results["steps"] == 10
    assert any(r.get("skipped_nonfinite_batch") and r["step"] == 7 for r in losses(tmp_path / "skip"))
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "skip").values())


def test_output_dir_of_another_run_is_refused_unless_overwrite(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "full", "training.max_steps": 2})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["train", str(recipe), "training.max_steps=3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert main(["train", str(recipe), "training.max_steps=3", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 3


# Sends this process SIGNAL (COUNT times in a row) right after the metrics line of step >= SIGNAL_AT: a pre-emption
# notice or Ctrl-C arriving mid-run. A test wrapper, so the package has no test hook.
SIGNALLER = """
import os, signal, sys
import hf_finetune.checkpoint as checkpoint
write = checkpoint.MetricsLog.write
sent = []
def signalling_write(self, record):
    write(self, record)
    if record["step"] >= int(os.environ["SIGNAL_AT"]) and not sent:
        sent.append(1)
        for _ in range(int(os.environ["COUNT"])):
            os.kill(os.getpid(), int(os.environ["SIGNAL"]))
checkpoint.MetricsLog.write = signalling_write
from hf_finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def signalled_run(recipe: Path, out: Path, signum: int, count: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGNAL_AT": "8", "SIGNAL": str(int(signum)), "COUNT": str(count),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", SIGNALLER, "train", str(recipe), f"output_dir={out}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_resume_equals_the_unbroken_run(
    signum: int, tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    # log lines every 3 steps, checkpoints every 5: the signal comes with the step-9 line, between checkpoints
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "unused", **{
        "method.name": "lora", "training.lr": 1e-3, "training.epochs": 2, "training.save_every": 5,
        "training.logging_every": 3,
    })  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0

    done = signalled_run(recipe, stopped, signum, count=1)
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    message = [x for x in done.stderr.splitlines() if x.startswith("hf-finetune: stopped by")]
    assert len(message) == 1 and "after step 9 of 32" in message[0] and "training.resume=true" in message[0]
    assert sorted(p.name for p in (stopped / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000009"]
    assert not (stopped / "results.json").exists() and not (stopped / ".hf_finetune.lock").exists()
    assert main(["train", str(recipe), f"output_dir={stopped}", "training.resume=true"]) == 0
    assert_same_run(straight, stopped)


def test_a_second_signal_aborts_at_once(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "unused", **{"training.save_every": 5,
                                                                    "training.logging_every": 3})  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    done = signalled_run(recipe, tmp_path / "run", signal.SIGTERM, count=2)
    assert done.returncode == -signal.SIGTERM, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000005"]
