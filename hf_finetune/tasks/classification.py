"""Text classification: single sentences and sentence pairs, int or string labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import DatasetDict
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from hf_finetune.data import require_columns
from hf_finetune.device import RulePadding
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.metrics import load_metric
from hf_finetune.tasks.base import TaskBase

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe


class ClassificationTask(TaskBase):
    name = "classification"
    metrics = {"eval_loss": False, "accuracy": True, "f1_macro": True, "mcc": True}
    primary_metric = "accuracy"
    peft_task_type = "SEQ_CLS"
    default_max_length = 128
    # BERT's pooler counts as head: sentence-embedding checkpoints such as all-MiniLM-L6-v2 never trained it (they
    # mean-pool), so with it frozen a prefix or prompt has to work through a random projection. Its Linear, not the
    # BertPooler module, because PEFT's IA3 merge can only unwrap modules that have a weight.
    head_modules = ("pooler.dense", "classifier", "score")

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
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

    def _encode(self, batch: dict[str, list]) -> dict[str, list]:
        pair = batch[self.columns.text_pair] if self.columns.text_pair else None
        return self.tokenizer(batch[self.columns.text], pair, truncation=True, max_length=self.max_length)

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        label_col = self.columns.label
        ids = {v: i for i, v in enumerate(self.labels)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = self._encode(batch)
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

    def collator(self) -> RulePadding:
        # capped at the truncation length, so a batch never asks for more positions than the budget allowed
        return RulePadding(self.tokenizer, max_length=self.max_length, rule=self.padding)

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        out = {"logits": logits.float()}
        if "labels" in batch:
            # per-example losses, so the mean is exact whatever the batch split across processes
            out["loss"] = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
            out["labels"] = batch["labels"]
        return out

    def evaluate(
        self, model: torch.nn.Module, loader: Any, accelerator: Accelerator, split: str = "validation"
    ) -> dict[str, float]:
        metric = load_metric("classification")
        loss_sum, count = 0.0, 0

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with accelerator.autocast():
                return self._forward(model, batch)

        for out in gathered_outputs(model, loader, accelerator, forward):
            loss_sum += out["loss"].sum().item()
            count += out["loss"].numel()
            preds = out["logits"].argmax(-1)
            metric.add_batch(predictions=preds.cpu().tolist(), references=out["labels"].cpu().tolist())
        scores = metric.compute(labels=list(range(len(self.labels))))
        return {"eval_loss": loss_sum / max(count, 1), **scores}

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]:
        text_columns = [c for c in (self.columns.text, self.columns.text_pair) if c]
        for i, row in enumerate(rows):
            missing = [c for c in text_columns if c not in row]
            if missing:
                raise InputError(f"input row {i}: missing field(s) {', '.join(missing)}")
        encoded = self._encode({c: [r[c] for r in rows] for c in text_columns})
        features = [{k: encoded[k][i] for k in encoded} for i in range(len(rows))]
        out: list[dict] = [{} for _ in rows]
        batch_size = self.recipe.training.eval_batch
        batches = batched_rows(model, features, self.collator(), batch_size, self._forward, by_length=False)
        for idx, outputs in batches:
            for i, p in zip(idx, outputs["logits"].softmax(-1).tolist(), strict=True):
                best = max(range(len(p)), key=p.__getitem__)
                out[i] = {
                    "label": self.labels[best],
                    "probability": p[best],
                    "probabilities": {str(v): q for v, q in zip(self.labels, p, strict=True)},
                }
        return out

    def checkpoint_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
