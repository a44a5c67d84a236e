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
import torch
import torch.distributed as dist
import yaml
from conftest import sentences, tiny_recipe, write_jsonl
from test_language_modeling import tiny_gpt2  # noqa: F401 (fixture)

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


def launch(args: list[str], flags: tuple[str, ...] = ("--multi_gpu", "--num_processes", "2"), script: Path | None = None,
           timeout: int = 240) -> subprocess.CompletedProcess:  # fmt: skip
    """`accelerate launch FLAGS -m hf_finetune ARGS` (or `SCRIPT ARGS`) on this CPU, stdout and stderr together. It
    runs in its own session, so that a hung launch is killed with its workers instead of outliving the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "hf_finetune"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--main_process_port", str(free_port()),
               *target, *args]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes SIGTERM on to its workers, in their own groups
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"accelerate launch hung:\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


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
    done = launch(["train", str(recipe), f"output_dir={two}", f"training.batch_size={BATCH}"])
    assert done.returncode == 0, done.stdout[-3000:]

    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (r2["world_size"], r2["global_batch_size"], r2["distributed_type"]) == (2, 2 * BATCH, "MULTI_CPU")
    assert (r1["world_size"], r1["global_batch_size"], r1["distributed_type"]) == (1, 2 * BATCH, "NO")
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
        "deepspeed_zero3": "DEEPSPEED", "multi_node": "MULTI_GPU", "fsdp_cpu": "FSDP",
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
    done = launch(["train", str(recipe)], script=script)
    output = done.stdout
    assert done.returncode != 0, output[-3000:]
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
    done = launch(["train", str(recipe), f"output_dir={two}", f"training.batch_size={BATCH}"])
    assert done.returncode == 0, done.stdout[-3000:]
    losses1, losses2 = ([r["loss"] for r in log(d) if "loss" in r] for d in (one, two))
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    r1, r2 = (json.loads((d / "results.json").read_text())["metrics"] for d in (one, two))
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-4)


# ---- FSDP2 on two CPU processes -------------------------------------------------------------------------------------

FSDP_CPU = ("--config_file", str(ROOT / "scripts" / "accelerate" / "fsdp_cpu.yaml"))
FSDP_CASES = {
    ("classification", "full"): 3e-3, ("classification", "lora"): 1e-2, ("classification", "prefix"): 1e-2,
    ("causal_lm", "full"): 3e-3, ("causal_lm", "lora"): 1e-2,
}  # fmt: skip


@pytest.mark.parametrize(("task", "method"), list(FSDP_CASES))
def test_fsdp_on_two_cpu_processes_trains_like_one_and_saves_a_plain_model(
    task: str, method: str, no_dropout_bert: Path, tiny_gpt2: Path, tmp_path: Path  # noqa: F811 (fixture)
) -> None:
    from test_language_modeling import lm_recipe, story

    from hf_finetune.evaluation import evaluate_checkpoint
    from hf_finetune.recipe import recipe_from_dict

    settings = {"method.name": method, "method.dropout": 0.0, "training.lr": FSDP_CASES[task, method],
                "training.max_steps": 6, "training.logging_every": 1, "training.save_every": 3}  # fmt: skip
    if task == "classification":
        write_jsonl(tmp_path / "train.jsonl", sentences(256, seed=1))
        write_jsonl(tmp_path / "validation.jsonl", sentences(40, seed=2))
        raw = tiny_recipe(no_dropout_bert, tmp_path, tmp_path / "unused", **settings)
    else:
        write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in story(160, 1)])
        write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in story(24, 2)])
        raw = lm_recipe(tiny_gpt2, tmp_path, tmp_path / "unused", **settings)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(recipe), f"output_dir={one}", f"training.batch_size={2 * BATCH}"]) == 0
    done = launch(["train", str(recipe), f"output_dir={two}", f"training.batch_size={BATCH}"], FSDP_CPU)
    assert done.returncode == 0, done.stdout[-3000:]
    # the checkpoint is FSDP's own (accelerate's full state dict of the sharded model), not DDP's safetensors
    assert (two / "checkpoints" / "step_00000003" / "pytorch_model_fsdp.bin").is_file()
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (r2["world_size"], r2["global_batch_size"], r2["distributed_type"]) == (2, 2 * BATCH, "FSDP")
    losses1, losses2 = ([r["loss"] for r in log(d) if "loss" in r] for d in (one, two))
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    assert r2["metrics"] == pytest.approx(r1["metrics"], rel=1e-4)
    # model/ holds the gathered full state: it loads in one plain process and scores what the sharded model did
    again = evaluate_checkpoint(recipe_from_dict(raw), str(two))
    assert again["metrics"] == pytest.approx(r2["metrics"], rel=1e-5)

    if (task, method) == ("classification", "full"):
        # a checkpoint written under FSDP resumes exactly: the last three steps again from step 3
        resumed = tmp_path / "resumed"
        shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("step_00000006", "model", "results.json"))
        lines = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
        (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        done = launch(["train", str(recipe), f"output_dir={resumed}", f"training.batch_size={BATCH}",
                       "training.resume=true"], FSDP_CPU)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:]
        assert [r["loss"] for r in log(resumed) if "loss" in r] == losses2
        assert json.loads((resumed / "results.json").read_text())["metrics"] == r2["metrics"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, DeepSpeed runs")
def test_deepspeed_without_a_gpu_is_refused_before_anything_is_written(
    no_dropout_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """What `accelerate launch --config_file scripts/accelerate/deepspeed_zero2.yaml` sets in each process; accelerate
    1.15 would run DeepSpeed on CPU processes as plain DDP, silently."""
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        config = load_config_from_file(str(ROOT / "scripts" / "accelerate" / f"{name}.yaml"))
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    write_jsonl(tmp_path / "train.jsonl", sentences(64, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", sentences(16, seed=2))
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(no_dropout_bert, tmp_path, out, **{"training.max_steps": 2})))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-finetune: error: accelerate launch --use_deepspeed: no GPU here")
    assert "scripts/accelerate/fsdp_cpu.yaml" in err[-1]
    assert not out.exists()
