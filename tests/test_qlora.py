"""QLoRA: LoRA adapters train over a frozen 4-bit NF4 base (bitsandbytes, on this CPU), the saved adapter reloads
to the same evaluation, `merge` writes a bf16 model close to the 4-bit one, and without bitsandbytes the method is
refused before any weights load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_language_modeling import lm_data, lm_recipe, logged_losses, story  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM

from hf_finetune.checkpoint import load_final
from hf_finetune.cli import main
from hf_finetune.engine import train
from hf_finetune.evaluation import evaluate_checkpoint
from hf_finetune.merging import merge_checkpoint
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.scratch import Dims, write_scratch_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dims = Dims(layers=2, d_model=64, heads=4, ffn=128, max_positions=64, vocab_size=200, dropout=0.0)
    return write_scratch_model(tmp_path_factory.mktemp("tiny-llama"), "llama", story(300, 0), dims)


def q_proj(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model().model.layers[0].self_attn.q_proj


def test_adapters_train_over_a_frozen_4bit_base_reload_and_merge_to_bf16(
    tiny_llama: Path, lm_data: Path, tmp_path: Path  # noqa: F811 (fixture)
) -> None:
    out = tmp_path / "run"
    raw = lm_recipe(tiny_llama, lm_data, out, **{"method.name": "qlora", "training.lr": 3e-3})
    results = train(recipe_from_dict(raw))
    losses = logged_losses(out)
    assert losses[-1] < losses[0] - 0.3, losses
    # and it learns as LoRA does over the same base in full precision (a random tiny base: slowly for both)
    lora = lm_recipe(tiny_llama, lm_data, tmp_path / "lora", **{"method.name": "lora", "training.lr": 3e-3})
    train(recipe_from_dict(lora))
    assert logged_losses(tmp_path / "lora")[-1] == pytest.approx(losses[-1], abs=0.1)

    _, model, _, info = load_final(out)
    layer = q_proj(model)
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.dtype == torch.uint8
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    assert layer.lora_B["default"].weight.abs().sum() > 0  # trained from its zero start
    # the base stayed frozen: its packed 4-bit bytes are those of a fresh 4-bit load of the checkpoint
    fresh = load_final(out)[1]
    base_bytes = {n: p for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert base_bytes and all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in base_bytes.items())
    # what was saved reloads to the run's own evaluation
    again = evaluate_checkpoint(recipe_from_dict(raw), str(out))
    assert again["metrics"]["perplexity"] == pytest.approx(results["metrics"]["perplexity"], rel=1e-6)

    # the model card's plain PEFT loader quantizes the base as training did
    from hf_finetune.card import plain_loading_code

    code = plain_loading_code(out / "model")
    assert "BitsAndBytesConfig(" in code and "quantization_config=quantization" in code
    names: dict = {}
    exec(code, names)
    assert isinstance(q_proj(names["model"]).base_layer, bnb.nn.Linear4bit)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 7]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits.float(), names["model"](input_ids=ids).logits.float()
    # without PEFT's k-bit preparation the norms compute in bf16, not fp32: close, not equal
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()

    merged_dir = merge_checkpoint(out, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert plain.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 7]])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits.float()
        folded = plain(input_ids=ids).logits.float()
    # the same function up to bf16 rounding of the merged weights
    assert torch.equal(quantized.argmax(-1), folded.argmax(-1))
    assert (quantized - folded).abs().max() < 0.05 * quantized.abs().max()


def test_a_classifier_head_stays_unquantized_and_trains_in_full(tmp_path: Path) -> None:
    from conftest import sentences, tiny_recipe, write_jsonl

    dims = Dims(layers=2, d_model=64, heads=4, ffn=128, max_positions=64, vocab_size=120, dropout=0.0)
    bert = write_scratch_model(tmp_path / "bert", "bert", [r["sentence"] for r in sentences(300, 0)], dims)
    write_jsonl(tmp_path / "train.jsonl", sentences(256, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", sentences(64, seed=2))
    raw = tiny_recipe(bert, tmp_path, tmp_path / "run", **{"method.name": "qlora", "training.lr": 1e-2})
    results = train(recipe_from_dict(raw))
    losses = logged_losses(tmp_path / "run")
    assert losses[-1] < losses[0], losses
    _, model, _, _ = load_final(tmp_path / "run")
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert isinstance(model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer, bnb.nn.Linear4bit)
    again = evaluate_checkpoint(recipe_from_dict(raw), str(tmp_path / "run"))
    assert again["metrics"] == pytest.approx(results["metrics"], rel=1e-6)


def test_without_bitsandbytes_it_is_refused_before_any_weights_load(
    tiny_llama: Path, lm_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys  # noqa: F811
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    import json

    import hf_finetune.tasks.language_modeling as lm

    loads = []
    monkeypatch.setattr(lm.LanguageModelingTask, "load_model", lambda self, path: loads.append(path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(lm_recipe(tiny_llama, lm_data, tmp_path / "run", **{"method.name": "qlora"})))
    assert main(["train", str(recipe)]) == 2
    assert "method qlora needs bitsandbytes (pip install 'bitsandbytes>=0.48')" in capsys.readouterr().err
    assert loads == []
