"""One live run per output_dir: a second `train` into a folder a live run holds exits 2 naming its process and touches
nothing; the lock of a process that is gone is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from test_bad_inputs import expect_exit_2, snapshot

from hf_finetune.cli import main
from hf_finetune.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent
# Holds the run after its step-2 log line: touches READY and sleeps, a live run in mid-training. A test wrapper, so
# the package has no test hook.
PAUSER = """
import os, sys, time
import hf_finetune.checkpoint as checkpoint
write = checkpoint.MetricsLog.write
def pausing_write(self, record):
    write(self, record)
    if record["step"] >= 2:
        open(os.environ["READY"], "w").close()
        time.sleep(300)
checkpoint.MetricsLog.write = pausing_write
from hf_finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def recipe(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> Path:
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{"training.max_steps": 6, "training.logging_every": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_second_run_into_a_live_runs_folder_exits_2_and_touches_nothing(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "READY": str(ready), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", PAUSER, "train", str(recipe)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before step 2"
            time.sleep(0.2)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
        before = snapshot(out)
        for extra in ([], ["--overwrite"], ["training.resume=true"]):
            line = expect_exit_2(["train", str(recipe), *extra], capsys, ["output_dir", f"process {first.pid}"])
            assert "in use by another run" in line
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # its process is gone: the lock is stale, taken over by the next run and removed when that one ends
    assert (out / LOCK_NAME).exists()
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert not (out / LOCK_NAME).exists() and (out / "results.json").is_file()


def test_a_lock_held_on_another_machine_is_respected(recipe: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": 12345, "host": socket.gethostname() + "-other", "since": "2026-01-01T00:00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    expect_exit_2(["train", str(recipe)], capsys, ["process 12345 on " + holder["host"], LOCK_NAME])
    assert not (out / "results.json").exists()
