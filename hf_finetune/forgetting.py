"""`compare --forgetting`: how much of its general language modelling a model lost to fine-tuning, as PEFT's
method comparison measures it: the base checkpoint's own LM loss on a held-out sample of general text (masked-LM
loss for encoders, causal-LM loss for decoders), before and after, through the trained body with the method applied
(adapters merged; virtual-token methods leave the body as it was) under the base checkpoint's LM head.

The masked positions are drawn once, with a fixed seed, and the same batches score every model, so two models that
share weights score the same loss to the bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
)

from hf_finetune.data import resolve_path
from hf_finetune.errors import InputError


class NotMeasured(Exception):
    """Why a model's forgetting cannot be measured (no LM head in the base checkpoint, an encoder-decoder)."""


def corpus_texts(path: str, samples: int, min_words: int = 20) -> list[str]:
    """The first `samples` paragraphs of at least `min_words` words of a text file (WikiText's `= heading =` lines
    skipped): a fixed, ordered sample."""
    local = resolve_path(path)
    if local is None or not local.is_file():
        raise InputError(f"forgetting corpus {path}: no such text file (relative paths are looked up in ../shared/data)")
    texts = []
    with local.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("=") and len(line.split()) >= min_words:
                texts.append(line)
                if len(texts) == samples:
                    break
    if not texts:
        raise InputError(f"--forgetting {path}: no paragraph of {min_words} words or more")
    return texts


def objective_of(base: str) -> str:
    config = AutoConfig.from_pretrained(base)
    if config.is_encoder_decoder:
        raise NotMeasured("an encoder-decoder model: no single LM objective for its body")
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return "masked"
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal"
    raise NotMeasured(f"{config.model_type} has neither a masked- nor a causal-LM class in transformers")


def load_lm(base: str) -> torch.nn.Module:
    """The base checkpoint with its own LM head; a checkpoint saved without one (sentence-transformers exports drop
    BERT's `cls.predictions`) would get a random head, and its loss would measure nothing."""
    cls = AutoModelForMaskedLM if objective_of(base) == "masked" else AutoModelForCausalLM
    model, info = cls.from_pretrained(base, output_loading_info=True)
    if info["missing_keys"]:
        raise NotMeasured(f"the base checkpoint has no LM head (missing {sorted(info['missing_keys'])[0]})")
    return model.eval()


def batches(base: str, texts: list[str], max_length: int, batch_size: int, seed: int = 0) -> list[dict]:
    """The scored batches: tokenised text with its labels (every next token, or 15% masked positions drawn once)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    masked = objective_of(base) == "masked"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=masked, mlm_probability=0.15)
    out = []
    torch.manual_seed(seed)  # the collator draws its masks from torch's generator
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(encoded["input_ids"]))]
        out.append(dict(collator(rows)))
    return out


@torch.no_grad()
def lm_loss(model: torch.nn.Module, scored: list[dict], causal: bool) -> float:
    """Mean cross-entropy per scored token over every batch (not a mean of batch means)."""
    total, tokens = 0.0, 0
    for batch in scored:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((labels != -100).sum())
    return total / tokens


def body_of(model: torch.nn.Module, virtual_tokens: bool) -> torch.nn.Module:
    """The trained task model's transformer body with the method applied: PEFT adapters merged into it; a
    virtual-token method's frozen body as it is (its prompt only exists for the task's inputs)."""
    from peft import PeftModel

    from hf_finetune.methods.virtual_tokens import SoftPromptWrapper

    if isinstance(model, PeftModel):
        model = model.get_base_model() if virtual_tokens else model.merge_and_unload()
    elif isinstance(model, SoftPromptWrapper):
        model = model.base_model
    return model.base_model


def after_lm(base: str, body: torch.nn.Module) -> torch.nn.Module:
    """The base checkpoint's LM with `body`'s weights in place of its own (the LM head stays the base's)."""
    lm = load_lm(base)
    mine = body.state_dict()
    target = lm.base_model.state_dict()
    missing = [k for k in target if k not in mine]
    if missing:
        raise NotMeasured(f"the trained body lacks {missing[0]} of the base LM's")
    vocab = mine[next(k for k in target if k.endswith("word_embeddings.weight") or k.endswith("wte.weight")
                      or k.endswith("embed_tokens.weight"))].shape[0]  # fmt: skip
    if vocab != lm.get_input_embeddings().weight.shape[0]:  # tokens the task added (chat templates)
        lm.resize_token_embeddings(vocab)
    lm.base_model.load_state_dict({k: mine[k] for k in target})
    return lm.eval()


class Meter:
    """The base model's loss, measured once, and each run's increase over it."""

    def __init__(self, recipe: Any, corpus: str, samples: int = 200, max_length: int = 128, batch_size: int = 16) -> None:
        from hf_finetune.hub import resolve_model

        self.corpus = corpus
        self.texts = corpus_texts(corpus, samples)
        self.max_length, self.batch_size = max_length, batch_size
        self.reason: str | None = None
        self.before: float | None = None
        m = recipe.model
        if m.from_scratch is not None or m.encoder_decoder_from:
            self.reason = "the model is built by the run (from scratch or as an encoder-decoder): there is no base LM"
            return
        base = self.base = resolve_model(m.name_or_path, m.revision)
        try:
            self.causal = objective_of(base) == "causal"
            self.scored = batches(base, self.texts, max_length, batch_size)
            self.before = lm_loss(load_lm(base), self.scored, self.causal)
        except NotMeasured as err:
            self.reason = str(err)

    def header(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "paragraphs": len(self.texts), "max_length": self.max_length,
                "objective": None if self.reason else ("causal" if self.causal else "masked"),
                "before": self.before, "not_measured": self.reason}  # fmt: skip

    def measure(self, run_out: Path) -> dict[str, Any]:
        """{after, increase} of a finished run (or {not_measured: reason})."""
        if self.reason:
            return {"not_measured": self.reason}
        from hf_finetune.checkpoint import load_final
        from hf_finetune.methods import get_method

        _, model, _, info = load_final(run_out)
        try:
            lm = after_lm(self.base, body_of(model, get_method(info["method"]).adds_virtual_tokens))
        except NotMeasured as err:
            return {"not_measured": str(err)}
        after = lm_loss(lm, self.scored, self.causal)
        if not math.isfinite(after):
            return {"after": after, "not_measured": "the trained model's LM loss is not finite"}
        return {"after": after, "increase": after - self.before}
