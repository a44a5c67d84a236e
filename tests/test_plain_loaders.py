"""Output folders load with plain transformers and PEFT, on any machine: an adapter names its base model as the
recipe gave it, the model card's own loading code (the one a new user copies) loads every task's adapter and merged
folder, and the loaded model computes exactly what `hf-finetune` does."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import sentences, tiny_recipe, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from hf_finetune.checkpoint import load_final
from hf_finetune.engine import train
from hf_finetune.merging import merge_checkpoint
from hf_finetune.recipe import recipe_from_dict
from tests.test_classification_kinds import multi_data, score_data  # noqa: F401 (fixtures)
from tests.test_language_modeling import lm_data, lm_recipe, tiny_bert_mlm, tiny_gpt2  # noqa: F401
from tests.test_question_answering import qa_data, qa_recipe, tiny_qa_bert  # noqa: F401
from tests.test_seq2seq import mt_data, mt_recipe, tiny_models  # noqa: F401
from tests.test_token_classification import ner_bert, ner_data, ner_recipe  # noqa: F401

TEXTS = ["good great film", "the plot was boring and bad", "it"]


def our_logits(out: Path, raw: dict) -> torch.Tensor:
    _, model, tokenizer, _ = load_final(out, recipe_from_dict(raw))
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits


def card_code(folder: Path) -> dict:
    """Run the model card's Python block as a user would paste it; its names (model, tokenizer, pipe)."""
    card = (folder / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", card, re.S)
    assert block, card
    names: dict = {}
    exec(block.group(1), names)  # the card's code, which names the folder by its absolute path here
    return names


def three_labels(folder: Path) -> Path:
    """Single-label rows with three classes (PEFT's loaders assume two unless told)."""
    folder.mkdir()
    for split, n, seed in (("train", 96, 1), ("validation", 32, 2)):
        rows = sentences(n, seed)
        for i, row in enumerate(rows):
            row["label"] = "meh" if i % 3 == 0 else row["label"]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


# each case: recipe dict for (tmp_path, method), and the inputs the two models are compared on
Case = tuple[Callable[..., dict], Callable[[AutoTokenizer], dict]]


def text_inputs(tokenizer) -> dict:
    return dict(tokenizer(["the cat sat on the mat by the old road"], return_tensors="pt"))


def qa_inputs(tokenizer) -> dict:
    return dict(tokenizer(["which city is named here"], ["the river by paris runs north"], return_tensors="pt"))


def seq2seq_inputs(tokenizer) -> dict:
    enc = dict(tokenizer(["the cat sees the dog"], return_tensors="pt"))
    enc["decoder_input_ids"] = enc["input_ids"][:, :3]
    return enc


@pytest.fixture
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Callable[[str], dict], Callable]:
    """(method -> recipe dict, inputs for a forward pass) of the named task."""
    name = request.param
    get = request.getfixturevalue
    out = tmp_path / "run"
    steps = {"training.max_steps": 2}
    if name == "single_label":
        data = three_labels(tmp_path / "three")
        return (lambda m: tiny_recipe(get("tiny_bert"), data, out, **{"method.name": m, **steps})), text_inputs
    if name in ("multi_label", "regression"):
        data = get("multi_data" if name == "multi_label" else "score_data")
        return (lambda m: tiny_recipe(get("tiny_bert"), data, out, **{"method.name": m, **steps})), text_inputs
    if name == "token_classification":
        return (lambda m: ner_recipe(get("ner_bert"), get("ner_data"), out, **{"method.name": m, **steps})), text_inputs
    if name == "question_answering":
        return (lambda m: qa_recipe(get("tiny_qa_bert"), get("qa_data"), out, **{"method.name": m, **steps})), qa_inputs
    if name in ("causal_lm", "masked_lm"):
        model = get("tiny_gpt2" if name == "causal_lm" else "tiny_bert_mlm")
        return (lambda m: lm_recipe(model, get("lm_data"), out, name, **{"method.name": m, **steps})), text_inputs
    family = name.split("_")[1]  # translation_t5, translation_gpt2
    model = get("tiny_models")[family]
    inputs = seq2seq_inputs if family == "t5" else text_inputs
    return (lambda m: mt_recipe(model, get("mt_data"), out, **{"method.name": m, **steps})), inputs


CASES = ["single_label", "multi_label", "regression", "token_classification", "question_answering", "causal_lm",
         "masked_lm", "translation_t5", "translation_gpt2"]  # fmt: skip


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(**inputs)
    return output.start_logits if hasattr(output, "start_logits") else output.logits


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_the_cards_code_loads_each_tasks_adapter_and_merged_folder_as_hf_finetune_does(
    case: tuple[Callable[[str], dict], Callable], tmp_path: Path
) -> None:
    make, inputs_of = case
    raw = make("lora")
    out = Path(raw["output_dir"])
    train(recipe_from_dict(raw))
    _, ours, our_tokenizer, _ = load_final(out)
    inputs = inputs_of(our_tokenizer)
    expected = forward(ours, inputs)

    plain = card_code(out / "model")
    assert type(plain["model"]).__module__.startswith("peft")
    assert plain["tokenizer"](["the cat"])["input_ids"] == our_tokenizer(["the cat"])["input_ids"]
    torch.testing.assert_close(forward(plain["model"], inputs), expected)
    if hasattr(ours, "config") and ours.config.num_labels > 1 and raw["task"] != "question_answering":
        assert plain["model"].config.id2label == ours.config.id2label

    merged = merge_checkpoint(out, tmp_path / "merged")
    (merged / "README.md").unlink(missing_ok=True)
    plain = card_code_for(merged)
    assert type(plain["model"]).__module__.startswith("transformers")
    torch.testing.assert_close(forward(plain["model"], inputs), expected, rtol=1e-4, atol=1e-5)
    if "pipe" in plain:
        check_pipeline(plain["pipe"], ours, our_tokenizer)


def check_pipeline(pipe, ours: torch.nn.Module, tokenizer) -> None:
    """The merged folder's pipeline answers as our model's logits say."""
    text = "the cat sat on the mat by the old road"
    logits = forward(ours, dict(tokenizer([text], return_tensors="pt")))[0]
    names = ours.config.id2label
    if pipe.task == "text-classification":
        assert pipe(text)[0]["label"] == names[int(logits.argmax())]
    elif pipe.task == "token-classification":
        found = pipe(text)
        assert [t["entity"] for t in found] == [names[int(logits[t["index"]].argmax())] for t in found]
    elif pipe.task == "fill-mask":
        assert len(pipe(f"the cat {tokenizer.mask_token} on the mat", top_k=2)) == 2
    else:
        assert pipe("the cat", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("the cat")


def card_code_for(folder: Path) -> dict:
    from hf_finetune.card import plain_loading_code

    names: dict = {}
    exec(plain_loading_code(folder), names)
    return names


def test_a_lora_folder_names_its_base_model_as_given(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "lora", "training.max_steps": 3})
    train(recipe_from_dict(raw))
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert)


def test_a_full_folder_loads_with_auto_model_and_pipeline_under_the_runs_labels(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "full", "training.max_steps": 3})
    train(recipe_from_dict(raw))
    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = plain(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, our_logits(out, raw))
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    expected = [plain.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert [r["label"] for r in classify(TEXTS)] == expected
    # and the card's code is that same loading
    assert [r["label"] for r in card_code(out / "model")["pipe"](TEXTS)] == expected
