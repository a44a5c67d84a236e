"""Text classification: single sentences and sentence pairs, int or string labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hf_finetune.data import require_columns
from hf_finetune.errors import InputError
from hf_finetune.metrics import load_metric
from hf_finetune.padding import BucketedPadding
from hf_finetune.recipe import Recipe
from hf_finetune.system import choose_precision


class ClassificationTask:
    peft_task_type = "SEQ_CLS"
    primary_metric = "accuracy"
    higher_is_better = True
    default_max_length = 128
    # BERT's pooler counts as head: sentence-embedding checkpoints such as all-MiniLM-L6-v2 never trained it (they
    # mean-pool), so with it frozen a prefix or prompt has to work through a random projection. Its Linear, not the
    # BertPooler module, because PEFT's IA3 merge can only unwrap modules that have a weight.
    head_modules = ("pooler.dense", "classifier", "score")

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.columns = recipe.data.columns
        self.labels: list[Any] = []
        """Label values as they appear in the data, in id order."""

    def prepare(self, raw: DatasetDict) -> None:
        cols = {"text": self.columns.text, "text_pair": self.columns.text_pair, "label": self.columns.label}
        for split in raw:
            require_columns(raw[split], cols, split)
            for key in ("text", "text_pair"):
                if cols[key]:
                    self._check_text(raw[split][cols[key]], split, key, cols[key])
        if not self.labels:  # restored from a checkpoint otherwise
            self._labels_from_train(raw)
        known = set(self.labels)
        for split in raw:
            if split == "train":
                continue
            for row, value in enumerate(raw[split][self.columns.label]):
                if value not in known:
                    raise InputError(
                        f"data.{split} row {row}: label {value!r} not among the training labels {self.labels}"
                    )

    @staticmethod
    def _check_text(values: list[Any], split: str, key: str, column: str) -> None:
        """A null or blank text would train on an empty sequence (or crash the tokenizer) without a word."""
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise InputError(
                    f"data.{split} row {row}: column {column!r} (data.columns.{key}) is empty or not text: {value!r}"
                )

    def _labels_from_train(self, raw: DatasetDict) -> None:
        train_labels = raw["train"][self.columns.label]
        bad = next((i for i, v in enumerate(train_labels) if v is None), None)
        if bad is not None:
            raise InputError(f"data.train row {bad}: label column {self.columns.label!r} is empty")
        values = set(train_labels)
        if len({type(v) for v in values}) > 1:
            raise InputError(
                f"data.train: column {self.columns.label!r} mixes label types {sorted(map(repr, values))}"
            )
        self.labels = sorted(values)
        if len(self.labels) < 2:
            raise InputError(f"data.train: column {self.columns.label!r} has a single label {self.labels}")

    @property
    def label2id(self) -> dict[str, int]:
        return {str(v): i for i, v in enumerate(self.labels)}

    def load_model(self, path: str) -> PreTrainedModel:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(self.labels),
            id2label={i: str(v) for i, v in enumerate(self.labels)},
            label2id=self.label2id,
            revision=self.recipe.model.revision,
            use_safetensors=True,  # pickle-free weights only
            trust_remote_code=self.recipe.model.trust_remote_code,
        )
        return model

    def _encode(self, tokenizer: PreTrainedTokenizerBase, batch: dict[str, list]) -> dict[str, list]:
        pair = batch[self.columns.text_pair] if self.columns.text_pair else None
        return tokenizer(
            batch[self.columns.text],
            pair,
            truncation=True,
            max_length=self.recipe.training.max_length or self.default_max_length,
        )

    def preprocess(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        label_col = self.columns.label
        ids = {v: i for i, v in enumerate(self.labels)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = self._encode(tokenizer, batch)
            encoded["labels"] = [ids[v] for v in batch[label_col]]
            encoded["length"] = [len(x) for x in encoded["input_ids"]]
            return encoded

        return DatasetDict(
            {
                split: ds.map(
                    encode,
                    batched=True,
                    remove_columns=ds.column_names,
                    num_proc=self.recipe.data.num_proc,
                    desc=f"Tokenising {split}",
                )
                for split, ds in raw.items()
            }
        )

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
        # multiples of 8 keep GPU tensor-core tile shapes. On a CPU they cost too much: SST-2 sentences average ~13
        # tokens, so rounding to 8 adds 25% of them (LoRA trained 9% slower). Under bf16/fp16 a CPU's matmuls run
        # through oneDNN, which compiles and keeps a kernel per shape: geometric width buckets add ~6% of tokens and
        # cut those shapes, whose cached kernels made up much of a run's peak RSS (hf_finetune/padding.py). fp32
        # matmuls go to MKL, which keeps nothing per shape, so fp32 pads to the longest row only.
        if torch.cuda.is_available():
            return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
        if choose_precision(self.recipe.training.precision) == "no":
            return DataCollatorWithPadding(tokenizer)
        # capped at the truncation length, so a bucket never asks for more positions than check_model allowed
        return BucketedPadding(tokenizer, max_length=self.recipe.training.max_length or self.default_max_length)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, loader: Any, accelerator: Accelerator, split: str = "validation"
    ) -> dict[str, float]:
        metric = load_metric("classification")
        loss_sum, count = 0.0, 0
        model.eval()
        for batch in loader:
            with accelerator.autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            # per-example losses, so the mean is exact whatever the batch split across processes
            losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
            preds, refs, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
            loss_sum += losses.sum().item()
            count += losses.numel()
            metric.add_batch(predictions=preds.cpu().tolist(), references=refs.cpu().tolist())
        model.train()
        scores = metric.compute(labels=list(range(len(self.labels))))
        return {"eval_loss": loss_sum / max(count, 1), **scores}

    @torch.no_grad()
    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict]
    ) -> list[dict]:
        for i, row in enumerate(rows):
            missing = [c for c in (self.columns.text, self.columns.text_pair) if c and c not in row]
            if missing:
                raise InputError(f"input row {i}: missing field(s) {', '.join(missing)}")
        model.eval()
        collate = self.collator(tokenizer)
        device = next(model.parameters()).device
        out: list[dict] = []
        batch_size = self.recipe.training.eval_batch
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            columns = {c: [r[c] for r in chunk] for c in (self.columns.text, self.columns.text_pair) if c}
            encoded = self._encode(tokenizer, columns)
            batch = collate([{k: encoded[k][i] for k in encoded} for i in range(len(chunk))])
            probs = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().softmax(-1)
            for p in probs.tolist():
                best = max(range(len(p)), key=p.__getitem__)
                out.append(
                    {
                        "label": self.labels[best],
                        "probability": p[best],
                        "probabilities": {str(v): q for v, q in zip(self.labels, p, strict=True)},
                    }
                )
        return out

    def checkpoint_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
