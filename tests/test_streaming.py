"""`data.train.streaming`: blocks packed on the fly equal the packed split's, a stream resumed at a checkpointed
position continues with exactly the blocks the unbroken stream would give, and a run killed mid-stream and resumed
ends bit-identical to an unbroken one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import sentences, tiny_recipe, write_jsonl
from datasets import Dataset
from test_bad_inputs import expect_exit_2
from test_language_modeling import lm_data, lm_recipe, story, tiny_bert_mlm, tiny_gpt2  # noqa: F401 (fixtures)
from test_resume import KILLER, ROOT, assert_same_run

from hf_finetune.cli import main
from hf_finetune.data import load_split
from hf_finetune.device import Padding
from hf_finetune.recipe import SplitConfig, recipe_from_dict
from hf_finetune.streaming import PackedStream
from hf_finetune.tasks import get_task


def uneven_texts(n: int) -> list[dict]:
    """Rows from one word to several blocks long, blank ones among them."""
    rows = []
    for i, text in enumerate(story(n, 5)):
        rows.append({"text": " ".join([text] * (i % 7))})
    return rows


def task_and_stream(model: Path, data: Path, tmp_path: Path, task: str = "causal_lm"):
    raw = lm_recipe(model, data, tmp_path / "run", task=task, **{"lm.block_size": 16})
    lm = get_task(recipe_from_dict(raw))
    from transformers import AutoTokenizer

    lm.setup(AutoTokenizer.from_pretrained(model), Padding())
    stream = load_split(SplitConfig(path=str(data / "train.jsonl"), streaming=True), "data.train")
    return lm, stream


@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_streamed_blocks_equal_the_packed_split(task: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue("tiny_gpt2" if task == "causal_lm" else "tiny_bert_mlm")
    write_jsonl(tmp_path / "train.jsonl", uneven_texts(60))
    lm, stream = task_and_stream(model, tmp_path, tmp_path, task)
    lm.join = "eos"
    whole = Dataset.from_list(uneven_texts(60))
    packed = lm.pack(whole.map(lambda b: lm._tokenise(b["text"]), batched=True, remove_columns=["text"]))
    blocks = PackedStream(stream, "text", lm._tokenise, 16)
    got = []
    for block in blocks:
        got.append(block)
        if len(got) == len(packed):
            break
    assert [b["input_ids"] for b in got] == packed["input_ids"]
    if task == "masked_lm":
        assert [b["special_tokens_mask"] for b in got] == packed["special_tokens_mask"]


def test_a_stream_resumed_at_a_recorded_position_continues_exactly(tiny_gpt2: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", uneven_texts(40))
    lm, stream = task_and_stream(tiny_gpt2, tmp_path, tmp_path)
    unbroken = PackedStream(stream, "text", lm._tokenise, 16)
    reader, first = iter(unbroken), []
    for _ in range(90):  # past the end of the first pass: the stream starts over
        first.append(next(reader)["input_ids"])
    for k in (1, 7, 33, 60, 85):
        resumed = PackedStream(stream, "text", lm._tokenise, 16)
        resumed.resume(unbroken.position_of(k), k)
        again = iter(resumed)
        assert [next(again)["input_ids"] for _ in range(5)] == first[k : k + 5], k


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_a_run_killed_mid_stream_resumes_bit_identical(task: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    settings = {"data.train.streaming": True, "training.max_steps": 12, "training.batch_size": 4,
                "training.save_every": 4, "training.logging_every": 1, "training.lr": 1e-3}  # fmt: skip
    if task == "causal_lm":
        write_jsonl(tmp_path / "train.jsonl", uneven_texts(120))
        write_jsonl(tmp_path / "validation.jsonl", uneven_texts(10))
        raw = lm_recipe(request.getfixturevalue("tiny_gpt2"), tmp_path, tmp_path / "unused",
                        **{**settings, "lm.block_size": 16})  # fmt: skip
    else:  # 30 rows: the 12 steps of 4 make a second pass
        write_jsonl(tmp_path / "train.jsonl", sentences(30, 1))
        write_jsonl(tmp_path / "validation.jsonl", sentences(10, 2))
        raw = tiny_recipe(request.getfixturevalue("tiny_bert"), tmp_path, tmp_path / "unused", **settings)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": "6", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, "train", str(recipe), f"output_dir={killed}"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state = json.loads((killed / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["stream"][0] == 0 and state["stream"][1] > 0  # mid-way through the first pass
    assert main(["train", str(recipe), f"output_dir={killed}", "training.resume=true"]) == 0
    assert_same_run(straight, killed)


def test_streaming_needs_max_steps_and_a_task_that_streams(
    tiny_gpt2: Path, lm_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(lm_recipe(tiny_gpt2, lm_data, tmp_path / "run", **{"data.train.streaming": True})))
    expect_exit_2(["train", str(recipe), "training.max_steps=null"], capsys, ["'data.train.streaming'", "max_steps"])
    expect_exit_2(["train", str(recipe), "task=question_answering", "training.max_steps=4"], capsys,
                  ["'data.train.streaming'", "does not stream", "causal_lm"])  # fmt: skip
    expect_exit_2(["train", str(recipe), "training.max_steps=4", "data.validation.streaming=true"], capsys,
                  ["'data.validation.streaming'", "only the training split"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_streamed_classification_rows_equal_the_split_and_a_later_bad_row_exits_2_naming_it(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoTokenizer

    from hf_finetune.tasks import classification

    rows = sentences(60, 1)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", sentences(10, 2))
    raw = tiny_recipe(tiny_bert, tmp_path, tmp_path / "run", **{"data.train.streaming": True,
                                                                "training.max_steps": 6, "training.batch_size": 8})
    task = get_task(recipe_from_dict(raw))
    task.setup(AutoTokenizer.from_pretrained(tiny_bert), Padding())
    splits = {"train": load_split(SplitConfig(path=str(tmp_path / "train.jsonl"), streaming=True), "data.train"),
              "validation": load_split(SplitConfig(path=str(tmp_path / "validation.jsonl")), "data.validation")}
    from datasets import DatasetDict

    task.prepare(DatasetDict(splits))
    assert task.labels == ["neg", "pos"]
    encoded = task.preprocess(DatasetDict(splits))
    whole = task.preprocess(DatasetDict({"train": Dataset.from_list(rows)}))["train"]
    streamed = [row for _, row in zip(range(len(rows)), encoded["train"], strict=False)]
    assert [r["input_ids"] for r in streamed] == whole["input_ids"]
    assert [r["labels"] for r in streamed] == whole["labels"]

    # a label outside those of the first rows (and validation), found mid-training, names its row
    monkeypatch.setattr(classification, "STREAM_CHECK_ROWS", 20)
    rows[40]["label"] = "meh"
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    expect_exit_2(["train", str(recipe)], capsys, ["data.train row 40", "'meh'", "first 20 rows"])
