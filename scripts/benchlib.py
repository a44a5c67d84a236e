"""What the benchmark scripts share: a training run in a fresh `hf-finetune train` process, and any command's own
peak resident set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_results(recipe: Path, out: Path, overrides: list[str]) -> dict:
    """results.json of `hf-finetune train RECIPE output_dir=OUT --overwrite OVERRIDES...` run in a fresh process (so
    its peak memory is its own); the run's stderr tail on failure."""
    cmd = [sys.executable, "-m", "hf_finetune", "train", str(recipe), f"output_dir={out}", "--overwrite", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def last_loss(out: Path) -> float:
    """The last training loss a run logged."""
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Peak resident set (MB) and wall time of one command, and its stdout. The peak comes from the kernel (wait4's
    ru_maxrss): the largest of the process and of the child processes it waited for (a datasets.map's workers)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.read()[-3000:]}")
        return usage.ru_maxrss / 1024, time.perf_counter() - start, stdout.read()
