"""`training.gradient_checkpointing`: every task and method trains to the same losses and weights as without it (the
recomputed forward replays dropout's RNG), and prefix tuning, which cannot, is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from test_bad_inputs import expect_exit_2
from test_engine import LRS
from test_language_modeling import lm_data, lm_recipe, tiny_bert_mlm, tiny_gpt2  # noqa: F401 (fixtures)
from test_question_answering import qa_data, qa_recipe, tiny_qa_bert  # noqa: F401 (fixtures)
from test_seq2seq import mt_data, mt_recipe, tiny_models  # noqa: F401 (fixtures)
from test_token_classification import ner_bert, ner_data, ner_recipe  # noqa: F401 (fixtures)

import hf_finetune.engine as engine
from hf_finetune.recipe import recipe_from_dict


def losses_and_weights(raw: dict, checkpointing: bool, out: Path) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    raw = json.loads(json.dumps(raw))
    raw["output_dir"] = str(out)
    raw["training"].update(max_steps=4, logging_every=1, gradient_checkpointing=checkpointing)
    run = engine.setup(recipe_from_dict(raw))
    base = run.unwrapped.get_base_model() if hasattr(run.unwrapped, "get_base_model") else run.unwrapped
    active = base.is_gradient_checkpointing
    state = engine.fit(run)
    trained = {n: p.detach().clone() for n, p in run.unwrapped.named_parameters() if p.requires_grad}
    engine.finish(run, state)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in log if "loss" in r], trained, active


def check_same_training(raw: dict, tmp_path: Path) -> None:
    plain, plain_weights, off = losses_and_weights(raw, False, tmp_path / "plain")
    checked, checked_weights, on = losses_and_weights(raw, True, tmp_path / "checkpointed")
    assert on and not off
    assert len(plain) == 4 and checked == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert checked_weights.keys() == plain_weights.keys()
    # recomputed activations may sum in another order; Adam scales an element's last-bit gradient difference by
    # 1/sqrt(v), so a weight moves by up to a few 1e-5 apart after 4 steps (T5 LoRA: 1.4e-5 in 1 of 1,024 elements)
    for name, value in plain_weights.items():
        torch.testing.assert_close(checked_weights[name], value, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method", [m for m in LRS if m != "prefix"])
def test_every_method_trains_the_same_with_checkpointing(
    method: str, tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "unused", **{"method.name": method, "training.lr": LRS[method]})
    check_same_training(raw, tmp_path)


@pytest.mark.parametrize("task", ["causal_lm", "masked_lm", "question_answering", "token_classification",
                                  "translation", "summarization"])  # fmt: skip
def test_every_task_trains_the_same_with_checkpointing(task: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture = request.getfixturevalue
    lora = {"method.name": "lora", "training.lr": 1e-2}
    if task == "causal_lm":
        raw = lm_recipe(fixture("tiny_gpt2"), fixture("lm_data"), tmp_path / "unused", **lora)
    elif task == "masked_lm":
        raw = lm_recipe(fixture("tiny_bert_mlm"), fixture("lm_data"), tmp_path / "unused", task="masked_lm", **lora)
    elif task == "question_answering":
        raw = qa_recipe(fixture("tiny_qa_bert"), fixture("qa_data"), tmp_path / "unused", **lora)
    elif task == "token_classification":
        raw = ner_recipe(fixture("ner_bert"), fixture("ner_data"), tmp_path / "unused", **lora)
    else:  # t5 for translation, bart for summarization: both encoder-decoder families
        family = "t5" if task == "translation" else "bart"
        raw = mt_recipe(fixture("tiny_models")[family], fixture("mt_data"), tmp_path / "unused", **lora)
        if task == "summarization":
            raw["task"] = "summarization"
    check_same_training(raw, tmp_path)


def test_prefix_tuning_refuses_checkpointing_before_writing(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "prefix"})))
    expect_exit_2(["train", str(recipe), "training.gradient_checkpointing=true"], capsys,
                  ["training.gradient_checkpointing", "method prefix"])  # fmt: skip
    assert not out.exists()
