"""The output head applied apart from the body, at scored tokens only and in pieces (`losses.token_nll`): the same
losses, gradients, trained weights and perplexities as the model's own whole-batch loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_finetune import losses
from hf_finetune.engine import train
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.tasks.chat import ChatTask
from hf_finetune.tasks.language_modeling import LanguageModelingTask
from tests.test_chat import chat_data, chat_models, chat_recipe  # noqa: F401 - fixtures
from tests.test_language_modeling import lm_data, lm_recipe, logged_losses, tiny_bert_mlm, tiny_gpt2  # noqa: F401

SMALL = 200 * 24  # a piece of 24 tokens at the tiny models' 200-token vocabulary: a batch of 8 x 32 is 11 pieces


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = out / "model"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def both_ways(raw: dict, task_class: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """The run with the model's own loss over whole-batch logits, then with the head in pieces; their results."""
    results = {}
    for name, chunked in (("whole", False), ("pieces", True)):
        with monkeypatch.context() as patch:
            patch.setattr(task_class, "chunked_head", chunked)
            patch.setattr(losses, "CHUNK_LOGITS", SMALL if chunked else 2**62)
            calls: list[int] = []

            def counted(*args, calls=calls, original=losses._chunk_nll):  # noqa: ANN002, ANN202
                calls.append(1)
                return original(*args)

            patch.setattr(losses, "_chunk_nll", counted)
            raw["output_dir"] = str(tmp_path / name)
            results[name] = {**train(recipe_from_dict(raw)), "pieces": len(calls), "out": tmp_path / name}
    return results["whole"], results["pieces"]


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("causal_lm", {}),
        ("causal_lm", {"method.name": "lora", "training.lr": 1e-2}),
        ("causal_lm", {"training.label_smoothing": 0.1, "training.grad_accum": 2}),
        ("masked_lm", {}),
    ],
    ids=["gpt2-full", "gpt2-lora", "gpt2-smoothing-accumulation", "bert-mlm"],
)
def test_the_head_in_pieces_trains_and_evaluates_like_the_whole_batch(
    task: str, extra: dict, tiny_gpt2: Path, tiny_bert_mlm: Path, lm_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = tiny_gpt2 if task == "causal_lm" else tiny_bert_mlm
    raw = lm_recipe(model, lm_data, tmp_path, task=task, **{"training.max_steps": 12, "training.logging_every": 1,
                                                            **extra})  # fmt: skip
    whole, pieces = both_ways(raw, LanguageModelingTask, tmp_path, monkeypatch)
    assert whole["pieces"] == 0 and pieces["pieces"] > 12  # training and evaluation went through the pieces
    a, b = logged_losses(whole["out"]), logged_losses(pieces["out"])
    assert a[-1] < a[0]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    assert pieces["metrics"]["perplexity"] == pytest.approx(whole["metrics"]["perplexity"], rel=1e-5)
    wa, wb = weights(whole["out"]), weights(pieces["out"])
    assert wa.keys() == wb.keys()
    for key in wa:
        # Adam divides by the root of tiny second moments: summation-order noise of 1e-7 moves a weight by ~1e-6
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=2e-5)


def test_chat_in_pieces_scores_only_the_assistant_tokens_like_the_whole_batch(
    chat_models: dict[str, Path], chat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    raw = chat_recipe(chat_models["llama"], chat_data, tmp_path, **{"training.epochs": 1})
    whole, pieces = both_ways(raw, ChatTask, tmp_path, monkeypatch)
    assert pieces["pieces"] > 0
    torch.testing.assert_close(torch.tensor(logged_losses(pieces["out"])), torch.tensor(logged_losses(whole["out"])),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert pieces["metrics"]["perplexity"] == pytest.approx(whole["metrics"]["perplexity"], rel=1e-5)


def test_token_nll_gradients_equal_the_whole_batch_loss(tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    ids = torch.randint(0, 200, (4, 20))
    labels = ids.clone()
    labels[:, :5] = -100  # an unscored prompt
    own = model(input_ids=ids, labels=labels).loss
    own.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 200 * 7)
    head = losses.output_head(model)
    nll, aligned = losses.token_nll(model, {"input_ids": ids}, labels, True, head)
    loss = nll.sum() / (aligned != -100).sum()
    torch.testing.assert_close(loss, own)
    assert (nll[aligned == -100] == 0).all()
    loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    assert "forward" not in head.__dict__  # the head's own forward is back


def test_models_that_transform_logits_after_the_head_keep_the_whole_batch(tiny_bert_mlm: Path) -> None:
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_mlm)
    assert losses.output_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0  # Gemma-style soft-capping applied to the head's output
    assert losses.output_head(model) is None
