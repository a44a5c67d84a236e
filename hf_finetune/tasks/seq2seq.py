"""Translation and summarization: text in, text out, scored by generation.

One module for both tasks and for three model families, chosen from the checkpoint:
- encoder-decoder checkpoints (`AutoModelForSeq2SeqLM`: T5, BART, Marian, and our from-scratch ones), with an
  optional T5-style `seq2seq.source_prefix`;
- BERT2BERT: `model.encoder_decoder_from` warm-starts a `transformers.EncoderDecoderModel` from one BERT-style
  checkpoint (its cross-attention and, for sentence-embedding checkpoints, the LM head transform start random);
- decoder-only (GPT-style): source, separator and target form one sequence; only the target is scored, and
  generation continues after the separator.
Evaluation generates for the whole split in batches sorted by source length, then scores sacreBLEU BLEU/chrF
(translation) or ROUGE (summarization, plus the lead-sentence baseline) against every reference of each example.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    EncoderDecoderModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hf_finetune.data import require_columns
from hf_finetune.device import Padding, right_pad
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.losses import token_losses
from hf_finetune.metrics import load_metric
from hf_finetune.tasks.base import PositionBudget, TaskBase, example_ids, positive

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe

EXTRA_KEYS = ("example_index", "prompt_length")
"""Evaluation-only features the collator passes through and `evaluate` pops before the model sees the batch."""


class Seq2SeqTask(TaskBase):
    metric_name = "translation"
    default_max_length = 256
    """Source tokens; targets are cut at `seq2seq.max_target_length`."""
    token_level = True
    generative = True

    @property
    def shift_labels(self) -> bool:
        """Logits at position t predict the label at t + 1: a decoder-only model reads source and target as one
        sequence; an encoder-decoder's decoder is fed the shifted target and predicts each label in place."""
        return self.decoder_only

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.cfg = recipe.seq2seq
        cols = recipe.data.columns
        self.source, self.target, self.refs_column = cols.source, cols.target, cols.references
        self.decoder_only = False
        self.references: dict[str, list[list[str]]] = {}
        self.sources: dict[str, list[str]] = {}
        self.ids: dict[str, list[Any]] = {}
        self.max_new_tokens = self.cfg.max_new_tokens
        # BERT2BERT from a checkpoint without an MLM head (all-MiniLM-L6-v2): its transform starts random, so it
        # trains with every method, like a classification head
        self.head_modules: tuple[str, ...] = (
            ("predictions.transform",) if recipe.model.encoder_decoder_from else ()
        )

    @property
    def peft_task_type(self) -> str:
        return "CAUSAL_LM" if self.decoder_only else "SEQ_2_SEQ_LM"

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.decoder_only else "AutoModelForSeq2SeqLM"

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        s = recipe.seq2seq
        return positive(
            {
                "seq2seq.max_target_length": s.max_target_length,
                "seq2seq.max_new_tokens": s.max_new_tokens,
                "seq2seq.num_beams": s.num_beams,
            }
        )

    def position_budget(self, config: Any) -> PositionBudget:
        """A decoder-only model reads source, separator and target as one sequence."""
        budget = PositionBudget("training.max_length", self.max_length, capped=False)
        if not getattr(config, "is_encoder_decoder", False) and not self.recipe.model.encoder_decoder_from:
            budget.extra["seq2seq.max_target_length"] = self.cfg.max_target_length
        return budget

    # ---- data ----------------------------------------------------------------------------------------------------

    def prepare(self, raw: DatasetDict) -> None:
        for split, ds in raw.items():
            has_refs = bool(self.refs_column) and self.refs_column in ds.column_names
            needed = {"source": self.source}
            if split == "train" or not has_refs:
                needed["target"] = self.target
            require_columns(ds, needed, split)
            for key, column in needed.items():
                for row, value in enumerate(ds[column]):
                    if not isinstance(value, str) or not value.strip():
                        raise InputError(
                            f"data.{split} row {row}: column {column!r} (data.columns.{key}) is empty or not text: "
                            f"{value!r}"
                        )
            if split == "train":
                continue
            if has_refs:
                refs = [
                    [r for r in (v or []) if isinstance(r, str) and r.strip()] for v in ds[self.refs_column]
                ]
                bad = next((i for i, r in enumerate(refs) if not r), None)
                if bad is not None:
                    raise InputError(
                        f"data.{split} row {bad}: column {self.refs_column!r} holds no reference"
                    )
            else:
                refs = [[t] for t in ds[self.target]]
            self.references[split] = refs
            self.sources[split] = list(ds[self.source])
            self.ids[split] = example_ids(ds)

    def tokenizer_corpus(self, raw: DatasetDict) -> Any:
        """A from-scratch tokenizer learns one joint vocabulary from both sides of the training split."""
        limit = self.recipe.model.from_scratch.tokenizer_samples if self.recipe.model.from_scratch else None
        train = raw["train"] if limit is None else raw["train"].select(range(min(limit, len(raw["train"]))))
        for batch in train.iter(batch_size=1000):
            yield from batch[self.source]
            yield from batch[self.target]

    def _detect_family(self, path: str) -> None:
        if self.recipe.model.encoder_decoder_from:
            self.decoder_only = False
            return
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            return  # an adapter checkpoint's folder: the family was restored from its hf_finetune.json
        config = AutoConfig.from_pretrained(path, trust_remote_code=self.recipe.model.trust_remote_code)
        self.decoder_only = not getattr(config, "is_encoder_decoder", False)

    def load_model(self, path: str) -> PreTrainedModel:
        common = {
            "revision": self.recipe.model.revision,
            "trust_remote_code": self.recipe.model.trust_remote_code,
        }
        config = AutoConfig.from_pretrained(path, **common)
        if getattr(config, "is_encoder_decoder", False):  # includes a saved EncoderDecoderModel
            self.decoder_only = False
            return self.pretrained(AutoModelForSeq2SeqLM, path)
        if self.recipe.model.encoder_decoder_from:
            return bert2bert(path)
        self.decoder_only = True
        return self.pretrained(AutoModelForCausalLM, path)

    def _separator(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if self.cfg.separator is not None:
            return tokenizer(self.cfg.separator, add_special_tokens=False)["input_ids"]
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if sep is None:
            raise InputError(
                "seq2seq.separator: the tokenizer has no eos/sep token to join source and target"
            )
        return [sep]

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        tokenizer = self.tokenizer
        self._detect_family(tokenizer.name_or_path)
        max_source = self.max_length
        max_target = self.cfg.max_target_length
        prefix = self.cfg.source_prefix or ""
        separator = self._separator(tokenizer) if self.decoder_only else []
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        # BERT2BERT: labels start after [CLS], which is the decoder's start token
        drop_first = bool(self.recipe.model.encoder_decoder_from)

        def encode(batch: dict[str, list], indices: list[int], evaluation: bool) -> dict[str, list]:
            sources = [prefix + s for s in batch[self.source]]
            targets = batch[self.target] if self.target in batch else None
            if self.decoder_only:
                src = tokenizer(sources, add_special_tokens=False, truncation=True, max_length=max_source)
                out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_length": []}
                tgt = (
                    tokenizer(targets, add_special_tokens=False, truncation=True, max_length=max_target - 1)
                    if targets is not None
                    else None
                )
                for i, ids in enumerate(src["input_ids"]):
                    prompt = ids + separator
                    answer = (tgt["input_ids"][i] + [eos]) if tgt is not None else []
                    out["input_ids"].append(prompt + answer)
                    out["labels"].append([-100] * len(prompt) + answer)
                    out["prompt_length"].append(len(prompt))
                out["attention_mask"] = [[1] * len(x) for x in out["input_ids"]]
                out["length"] = out["prompt_length"] if evaluation else [len(x) for x in out["input_ids"]]
            else:
                out = dict(tokenizer(sources, truncation=True, max_length=max_source))
                if targets is not None:
                    labels = tokenizer(text_target=targets, truncation=True, max_length=max_target)[
                        "input_ids"
                    ]
                    out["labels"] = [x[1:] if drop_first else x for x in labels]
                out["length"] = [len(x) for x in out["input_ids"]]
            if evaluation:
                out["example_index"] = list(indices)
            else:
                out.pop("prompt_length", None)
            return out

        encoded = {}
        for split, ds in raw.items():
            evaluation = split != "train"
            encoded[split] = ds.map(
                encode,
                batched=True,
                with_indices=True,
                fn_kwargs={"evaluation": evaluation},
                remove_columns=ds.column_names,
                num_proc=self.recipe.data.num_proc,
                desc=f"Tokenising {split}",
            )
        if self.max_new_tokens is None:
            self.max_new_tokens = max_new_tokens_from(encoded, self.decoder_only, max_target)
        return DatasetDict(encoded)

    def collator(self) -> Seq2SeqCollator:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return Seq2SeqCollator(pad, self.padding)

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def generation_options(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, Any]:
        options = {
            "max_new_tokens": self.max_new_tokens or self.cfg.max_target_length,
            "num_beams": self.cfg.num_beams,
            "length_penalty": self.cfg.length_penalty,
            "no_repeat_ngram_size": self.cfg.no_repeat_ngram_size,
            "do_sample": False,
        }
        if self.cfg.num_beams > 1:
            options["early_stopping"] = True
        if self.decoder_only:
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            options.update(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        return options

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        tokenizer = self.tokenizer
        unwrapped = accelerator.unwrap_model(model)
        options = self.generation_options(unwrapped, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {"index": batch.pop("example_index")}
            prompt_length = batch.pop("prompt_length", None)
            labels = batch.pop("labels", None)
            if labels is not None:
                inputs = dict(batch)
                if not self.decoder_only:
                    # the loss from logits, not from the model: a method may add a training-only regulariser to the
                    # model's loss, which a reloaded adapter cannot compute
                    inputs["decoder_input_ids"] = decoder_inputs(unwrapped, labels)
                with accelerator.autocast():
                    logits = model(**inputs).logits
                out["sums"], out["counts"] = token_losses(logits, labels, shift=self.shift_labels)
            with accelerator.autocast():
                out["new"] = self._generate(unwrapped, batch, prompt_length, options, pad)
            return out

        predictions: dict[int, str] = {}
        loss_sum, tokens = 0.0, 0
        for out in gathered_outputs(model, loader, accelerator, forward, pad={"new": pad}):
            texts = tokenizer.batch_decode(out["new"], skip_special_tokens=True)
            for row, text in zip(out["index"].tolist(), texts, strict=True):
                predictions[row] = text.strip()
            if "sums" in out:
                loss_sum += out["sums"].sum().item()
                tokens += int(out["counts"].sum().item())
        refs = self.references[split]
        order = sorted(predictions)
        texts, gold = [predictions[i] for i in order], [refs[i] for i in order]
        scores = self.score(texts, gold, split, order)
        if records is not None:
            per_example = self.example_scores(texts, gold) or [None] * len(order)
            for i, text, references, values in zip(order, texts, gold, per_example, strict=True):
                row = {"id": self.ids[split][i], self.source: self.sources[split][i], "prediction": text}
                row["reference"] = references[0] if len(references) == 1 else references
                records.append({**row, **({"scores": values} if values else {})})
        return {**({"eval_loss": loss_sum / tokens} if tokens else {}), **scores}

    def example_scores(self, predictions: list[str], references: list[list[str]]) -> list[dict[str, float]] | None:
        """Per-example values whose mean is a corpus metric; None where the metric is no such mean (BLEU, chrF)."""
        return None

    def _generate(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        prompt_length: torch.Tensor | None,
        options: dict[str, Any],
        pad: int,
    ) -> torch.Tensor:
        """The generated tokens only (no prompt), right-padded with `pad`."""
        if not self.decoder_only:
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **options)
            # encoder-decoder outputs open with the decoder start token
            return out[:, 1:]
        # decoder-only: the prompt of each row (source + separator), left-padded so generation continues right after
        prompts = [row[:n] for row, n in zip(batch["input_ids"], prompt_length.tolist(), strict=True)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=batch["input_ids"].device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
        return out[:, width:]

    def score(
        self, predictions: list[str], references: list[list[str]], split: str, order: list[int]
    ) -> dict:
        return load_metric(self.metric_name).compute(predictions=predictions, references=references)

    # ---- prediction ----------------------------------------------------------------------------------------------

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]:
        for i, row in enumerate(rows):
            if not isinstance(row.get(self.source), str):
                raise InputError(f"input row {i}: missing text field {self.source!r} (data.columns.source)")
        tokenizer = self.tokenizer
        self._detect_family(tokenizer.name_or_path)
        prefix = self.cfg.source_prefix or ""
        separator = self._separator(tokenizer) if self.decoder_only else []
        encoded = [
            tokenizer(prefix + r[self.source], add_special_tokens=not self.decoder_only, truncation=True,
                      max_length=self.max_length)["input_ids"] + separator
            for r in rows
        ]  # fmt: skip
        features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in encoded]
        options = self.generation_options(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            lengths = batch["attention_mask"].sum(1) if self.decoder_only else None
            return {"new": self._generate(model, batch, lengths, options, pad)}

        out: list[dict] = [{} for _ in rows]
        for idx, result in batched_rows(model, features, self.collator(), self.recipe.training.eval_batch, forward):
            for i, text in zip(idx, tokenizer.batch_decode(result["new"], skip_special_tokens=True), strict=True):
                out[i] = {"generated": text.strip()}
        return out

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def checkpoint_info(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "decoder_only": self.decoder_only}

    def restore(self, info: dict[str, Any]) -> None:
        self.max_new_tokens = self.cfg.max_new_tokens or info.get("max_new_tokens")
        self.decoder_only = info.get("decoder_only", False)


class TranslationTask(Seq2SeqTask):
    name = "translation"
    pipeline_tag = "translation"
    metric_name = "translation"
    metrics = {"eval_loss": False, "bleu": True, "chrf": True}
    primary_metric = "bleu"


ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class SummarizationTask(Seq2SeqTask):
    name = "summarization"
    pipeline_tag = "summarization"
    metric_name = "summarization"
    # the lead baseline's scores are reported beside the model's; as metrics they rank runs the same way
    metrics = {"eval_loss": False, **dict.fromkeys(ROUGE, True), **dict.fromkeys((f"lead_{k}" for k in ROUGE), True)}
    primary_metric = "rougeL"
    default_max_length = 512

    def score(
        self, predictions: list[str], references: list[list[str]], split: str, order: list[int]
    ) -> dict:
        """ROUGE of the model and, on the same examples, of the lead baseline (the source's first sentence)."""
        metric = load_metric(self.metric_name)
        scores = metric.compute(predictions=predictions, references=references)
        leads = [lead_sentence(self.sources[split][i]) for i in order]
        lead = metric.compute(predictions=leads, references=references)
        return {**scores, **{f"lead_{k}": v for k, v in lead.items()}}

    def example_scores(self, predictions: list[str], references: list[list[str]]) -> list[dict[str, float]] | None:
        from hf_finetune.metrics.summarization.summarization import example_scores

        return example_scores(predictions, references)


def lead_sentence(text: str) -> str:
    from hf_finetune.metrics.summarization.summarization import split_sentences

    return split_sentences(text).split("\n", 1)[0]


def bert2bert(path: str) -> PreTrainedModel:
    """An `EncoderDecoderModel` whose encoder and decoder both start from the BERT-style checkpoint at `path`: the
    decoder gets causal self-attention and new cross-attention layers (Rothe et al. 2020). Decoding starts from
    [CLS] and stops at [SEP], padding with [PAD], as in transformers' BERT2BERT examples."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
        raise InputError(
            f"model.encoder_decoder_from: {path} has no [CLS]/[SEP]/[PAD] tokens; is it BERT-style?"
        )
    # The new cross-attention weights are drawn from a fixed seed, without touching the run's RNG: an adapter saved
    # without them (they are frozen under LoRA) then reloads onto the very same random weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    # the encoder's pooler feeds nothing here: adapters on it would never get a gradient (AdaLoRA's sensitivity
    # update then fails on a None grad)
    if getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler = None
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def decoder_inputs(model: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing decoder inputs: the labels shifted right behind the decoder start token, as the model's own
    forward builds them when given labels."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.prepare_decoder_input_ids_from_labels(labels=labels)


def max_new_tokens_from(encoded: DatasetDict, decoder_only: bool, cap: int) -> int:
    """Generation length from the training targets: their 99th percentile plus 10%, within `max_target_length`.
    Beams that never emit eos stop there instead of running to the cap on every batch."""
    if "train" not in encoded:
        return cap
    labels = encoded["train"]["labels"]
    lengths = (
        [sum(1 for t in row if t != -100) for row in labels] if decoder_only else [len(r) for r in labels]
    )
    if not lengths:
        return cap
    return min(cap, int(math.ceil(float(np.percentile(lengths, 99)) * 1.1)) + 2)


class Seq2SeqCollator:
    """Right-pads inputs with the pad id, labels with -100, to the padding rule's width; evaluation extras pass through.
    Encoder-decoder models build their decoder inputs from the labels themselves."""

    def __init__(self, pad_id: int, padding: Padding) -> None:
        self.pad_id, self.padding = pad_id, padding

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            return right_pad([r[key] for r in rows], value, self.padding)

        batch = {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0)}
        if "labels" in rows[0]:
            batch["labels"] = pad("labels", -100)
        for key in EXTRA_KEYS:
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch
