"""Two gloo processes through `accelerate launch --multi_gpu --num_processes 2` on this CPU machine: per-process batch
b trains exactly like one process with batch 2b (same loss curve within fp32 rounding, same evaluation, every
validation example counted once), for full fine-tuning and the PEFT methods that need care under DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from conftest import sentences, tiny_recipe, write_jsonl

from hf_finetune.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is unavailable",
    ),
]
BATCH = 8  # per process; the single-process reference uses 2 * BATCH
LRS = {"lora": 1e-2, "adalora": 2e-2, "prefix": 1e-3}


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dropout draws from each process's own RNG, so two processes cannot reproduce one process's masks; without it
    the runs must agree."""
    folder = tmp_path_factory.mktemp("no-dropout-bert")
    shutil.copytree(tiny_bert_pretrained, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(LRS))
def test_two_processes_match_one_with_twice_the_batch(
    method: str, no_dropout_bert: Path, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "train.jsonl", sentences(256, seed=1))
    # 70 rows: the last global evaluation batch (2 x 16) is short, so accelerate pads it and must drop the padding
    write_jsonl(tmp_path / "validation.jsonl", sentences(70, seed=2))
    raw = tiny_recipe(no_dropout_bert, tmp_path, tmp_path / "unused", **{
        "method.name": method, "method.dropout": 0.0, "training.lr": LRS[method], "training.max_steps": 10,
        "training.logging_every": 1, "training.save_every": 5,
    })  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(recipe), f"output_dir={one}", f"training.batch_size={2 * BATCH}"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "-m", "hf_finetune"]  # fmt: skip
    # its own session, so a hung worker can be killed with the launcher rather than outlive the test
    proc = subprocess.Popen(
        [*launch, "train", str(recipe), f"output_dir={two}", f"training.batch_size={BATCH}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(
            proc.pid, signal.SIGTERM
        )  # torchrun passes SIGTERM on to its workers, which run in their own groups
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = "", None
        pytest.fail(f"accelerate launch hung:\n{output[-3000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", output)
    assert done.returncode == 0, done.stderr[-3000:]

    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (r2["world_size"], r2["global_batch_size"]) == (2, 2 * BATCH)
    assert (r1["world_size"], r1["global_batch_size"]) == (1, 2 * BATCH)
    # only the main process writes: one line per step, not two
    l1, l2 = log(one), log(two)
    assert [r["step"] for r in l2] == [r["step"] for r in l1]
    losses1, losses2 = ([r["loss"] for r in lg if "loss" in r] for lg in (l1, l2))
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    # a duplicated tail would shift the mean loss and could flip counts
    assert r2["metrics"] == pytest.approx(r1["metrics"], rel=1e-4)
    assert r2["metrics"]["accuracy"] == r1["metrics"]["accuracy"]
    # each process wrote its own RNG state into the checkpoint, nothing else twice
    states = sorted(p.name for p in (two / "checkpoints" / "step_00000010").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
    if method == "adalora":
        saved = [
            json.loads((d / "model" / "adapter_config.json").read_text())["rank_pattern"] for d in (one, two)
        ]
        assert saved[1] and saved[1] == saved[0]


def test_shipped_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        path.stem: str(load_config_from_file(str(path)).distributed_type).rsplit(".", 1)[-1]
        for path in (ROOT / "scripts" / "accelerate").glob("*.yaml")
    }
    assert kinds == {
        "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp_full_shard": "FSDP", "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED", "multi_node": "MULTI_GPU",
    }  # fmt: skip


# Rank 1 alone gets SIGTERM with its step-4 log line: rank 0 must stop at the same step (or the collectives of the
# checkpoint would hang). A test wrapper run as the launched script, so the package has no test hook.
RANK_1_SIGNALLER = """
import os, signal, sys
import hf_finetune.checkpoint as checkpoint
write = checkpoint.MetricsLog.write
def signalling_write(self, record):
    write(self, record)
    if record["step"] == 4 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
checkpoint.MetricsLog.write = signalling_write
from hf_finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(
    no_dropout_bert: Path, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "train.jsonl", sentences(256, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", sentences(32, seed=2))
    out = tmp_path / "run"
    raw = tiny_recipe(no_dropout_bert, tmp_path, out, **{
        "method.name": "lora", "training.max_steps": 10, "training.logging_every": 1, "training.batch_size": BATCH,
    })  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    script = tmp_path / "signaller.py"
    script.write_text(RANK_1_SIGNALLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), str(script)]  # fmt: skip
    proc = subprocess.Popen([*launch, "train", str(recipe)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("accelerate launch hung after the signal")
    assert proc.returncode != 0, output[-3000:]
    # one line from each process (the two processes' stderr interleave, a progress bar may precede a line)
    stops = re.findall(r"hf-finetune: stopped by SIGTERM after step (\d+) of 10", output)
    assert stops == ["4", "4"], output[-3000:]
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    assert checkpoint.name == "step_00000004"
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert not (out / "results.json").exists()


def test_two_processes_weight_every_token_of_a_seq2seq_batch_alike(tmp_path: Path) -> None:
    """Each process's batch holds another number of target tokens: the loss is divided by the tokens of both."""
    from test_accumulation import uneven_pairs
    from test_seq2seq import DIMS, corpus, mt_recipe

    from hf_finetune.scratch import write_scratch_model

    model = write_scratch_model(tmp_path / "t5", "t5", corpus(), DIMS)
    write_jsonl(tmp_path / "train.jsonl", uneven_pairs(160, 1))
    write_jsonl(tmp_path / "validation.jsonl", uneven_pairs(8, 2))
    raw = mt_recipe(model, tmp_path, tmp_path / "unused", **{
        "method.name": "full", "training.lr": 3e-3, "data.columns.references": None, "training.max_steps": 4,
        "training.logging_every": 1, "training.warmup_ratio": 0.0, "training.group_by_length": False,
    })  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(recipe), f"output_dir={one}", f"training.batch_size={2 * BATCH}"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "-m", "hf_finetune"]  # fmt: skip
    done = subprocess.run([*launch, "train", str(recipe), f"output_dir={two}", f"training.batch_size={BATCH}"],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    losses1, losses2 = ([r["loss"] for r in log(d) if "loss" in r] for d in (one, two))
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    r1, r2 = (json.loads((d / "results.json").read_text())["metrics"] for d in (one, two))
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-4)
