"""The CPU memory setting a run makes before its first forward pass: ideep's per-shape matmul cache kept to one entry,
which lowers the heap that variable-length bf16 batches leave behind; a user's own value kept, and the environment of
the program that called the run left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe

import hf_finetune.engine as engine
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.system import cpu_has_bf16

# bf16 matmuls over 60 row counts (the shapes 60 sequence lengths give), then glibc's heap in use grown meanwhile
PROBE = """
import sys
import os
from hf_finetune.system import glibc_heap_mb
if sys.argv[1] == "ours":
    os.environ["LRU_CACHE_CAPACITY"] = "1"  # what a run sets while it starts (hf_finetune.device)
import torch
weight = torch.randn(64, 384, dtype=torch.bfloat16)
before = glibc_heap_mb()["in_use"]
for rows in range(32, 32 * 61, 32):
    torch.nn.functional.linear(torch.randn(rows, 384, dtype=torch.bfloat16), weight)
print(glibc_heap_mb()["in_use"] - before)
"""

@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 matmuls take ideep's cached path on CPUs with AMX/AVX512-BF16")
def test_one_entry_ideep_cache_keeps_less_heap_per_matmul_shape() -> None:
    def heap_growth(side: str) -> float:
        env = {k: v for k, v in os.environ.items() if k != "LRU_CACHE_CAPACITY"}
        if side == "default":
            env["LRU_CACHE_CAPACITY"] = "1024"  # torch's own default, spelled out
        done = subprocess.run(
            [sys.executable, "-c", PROBE, side], env=env, capture_output=True, text=True, check=True, timeout=120
        )
        return float(done.stdout.split()[-1])

    ours, default = heap_growth("ours"), heap_growth("default")
    # measured here: 17.8 MB against 33.0 MB, ~250 KB less per shape
    assert ours < 0.75 * default, (ours, default)  # MB


def cache_setting_at_first_forward(raw: dict) -> str | None:
    """LRU_CACHE_CAPACITY as the run's first training forward pass sees it."""
    run = engine.setup(recipe_from_dict(raw))
    seen = []
    handle = run.model.register_forward_pre_hook(lambda *_: seen.append(os.environ.get("LRU_CACHE_CAPACITY")))
    engine.finish(run, engine.fit(run))
    handle.remove()
    return seen[0]


def test_training_caps_ideep_cache_during_the_run_only_and_keeps_the_users_value(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    short = {"training.max_steps": 2}
    assert cache_setting_at_first_forward(tiny_recipe(tiny_bert, data_dir, tmp_path / "a", **short)) == "1"
    assert "LRU_CACHE_CAPACITY" not in os.environ  # the caller's environment is left as it was
    off = {**short, "training.cpu_tuning": "off"}
    assert cache_setting_at_first_forward(tiny_recipe(tiny_bert, data_dir, tmp_path / "b", **off)) is None
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    assert cache_setting_at_first_forward(tiny_recipe(tiny_bert, data_dir, tmp_path / "c", **short)) == "64"
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
