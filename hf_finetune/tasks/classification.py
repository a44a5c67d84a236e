"""Text classification of single sentences and sentence pairs: one class per row (int or string labels), several
(a list per row: multi-label, sigmoid and binary cross-entropy) or a real-valued score (regression, mean squared
error). The label column decides unless `classification.multi_label` / `classification.regression` say so."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset, DatasetDict, Features, IterableDataset, List, Value
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from hf_finetune.data import class_names, require_columns, say
from hf_finetune.device import RulePadding
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.metrics import load_metric
from hf_finetune.metrics.classification.classification import (
    multi_label_scores,
    regression_scores,
    tune_thresholds,
)
from hf_finetune.sampling import eval_order
from hf_finetune.significance import pearson_of, ratio_of
from hf_finetune.streaming import RowStream
from hf_finetune.tasks.base import TaskBase, example_ids

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe


SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
# Each problem type's metrics (name -> higher is better) and the one that ranks runs. Multi-label evaluation adds
# `f1_<label>` per label.
KINDS: dict[str, tuple[dict[str, bool], str]] = {
    SINGLE: ({"eval_loss": False, "accuracy": True, "f1_macro": True, "mcc": True}, "accuracy"),
    MULTI: ({"eval_loss": False, "f1_micro": True, "f1_macro": True, "subset_accuracy": True}, "f1_micro"),
    REGRESSION: ({"eval_loss": False, "pearson": True, "spearman": True, "mse": False}, "pearson"),
}
STREAM_CHECK_ROWS = 1000  # rows of a streamed training split that decide its problem type, labels and prior


class ClassificationTask(TaskBase):
    name = "classification"
    pipeline_tag = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    # every problem type's metrics; an instance narrows them to its own once `prepare` has read the labels
    metrics = {k: v for metrics, _ in KINDS.values() for k, v in metrics.items()}
    primary_metric = "accuracy"
    peft_task_type = "SEQ_CLS"
    default_max_length = 128
    streams = True
    # BERT's pooler counts as head: sentence-embedding checkpoints such as all-MiniLM-L6-v2 never trained it (they
    # mean-pool), so with it frozen a prefix or prompt has to work through a random projection. Its Linear, not the
    # BertPooler module, because PEFT's IA3 merge can only unwrap modules that have a weight.
    head_modules = ("pooler.dense", "classifier", "score")

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.columns = recipe.data.columns
        self.cfg = recipe.classification
        self.labels: list[Any] = []
        """Label values as they appear in the data, in id order (empty for regression)."""
        self.problem_type = self._declared_kind(recipe)
        self.thresholds: list[float] | None = None
        """Multi-label: each label's decision threshold, tuned on validation or restored with the model."""
        self._restored = False
        self.class_order: list[str] | None = None
        """Class names in id order when the training split's labels are `ClassLabel` ids."""
        self._eval: dict[str, tuple[Dataset, list[int]]] = {}
        """The raw evaluation splits and their token lengths, for the saved predictions."""
        self.prior: list[float] | None = None
        """Multi-label: each label's share of the training rows; regression: the mean target (set from training data)."""

    @staticmethod
    def _declared_kind(recipe: Recipe) -> str | None:
        cfg = recipe.classification
        if cfg.regression:
            return REGRESSION
        if cfg.multi_label:
            return MULTI
        if cfg.regression is False and cfg.multi_label is False:
            return SINGLE
        return None

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        cfg, problems = recipe.classification, []
        if cfg.regression and cfg.multi_label:
            problems.append("'classification.regression' and 'classification.multi_label': choose one")
        if not 0 < cfg.threshold < 1:
            problems.append(f"'classification.threshold': must be in (0, 1), got {cfg.threshold}")
        kind = cls._declared_kind(recipe)
        if kind is not None and not problems:
            problems += cls._metric_problem(recipe, kind)
        return problems

    @staticmethod
    def _metric_problem(recipe: Recipe, kind: str) -> list[str]:
        metrics = KINDS[kind][0]
        best = recipe.training.best_metric
        if best in metrics:
            return []
        return [f"'training.best_metric': {best!r} is not a {kind.replace('_', ' ')} metric ({', '.join(metrics)})"]

    def _set_kind(self, kind: str) -> None:
        self.problem_type = kind
        self.metrics, self.primary_metric = KINDS[kind]

    def prepare(self, raw: DatasetDict) -> None:
        self._name_class_ids(raw)
        streamed = isinstance(raw.get("train"), IterableDataset)
        if streamed:  # its first rows stand for it (it is never read whole); every later row is checked as it comes
            raw = DatasetDict({**raw, "train": Dataset.from_list(list(raw["train"].take(STREAM_CHECK_ROWS)))})
        cols = {"text": self.columns.text, "text_pair": self.columns.text_pair, "label": self.columns.label}
        for split in raw:
            require_columns(raw[split], cols, split)
            for key in ("text", "text_pair"):
                if cols[key]:
                    self._check_text(raw[split][cols[key]], split, key, cols[key])
        if not self._restored:
            self._set_kind(self.problem_type or self._kind_of(raw["train"]))
            problems = self._metric_problem(self.recipe, self.problem_type)
            if problems:
                raise InputError(problems[0])
        if self.problem_type == REGRESSION:
            for split in raw:
                self._check_scores(raw[split][self.columns.label], split)
            if not self._restored:
                scores = raw["train"][self.columns.label]
                self.prior = [sum(float(v) for v in scores) / len(scores)]
            return
        if not self.labels:  # restored from a checkpoint otherwise
            self._labels_from_train(raw)
            if streamed:
                self._labels_from_evaluation(raw)
            if self.problem_type == MULTI:
                counts = dict.fromkeys(self.labels, 0)
                for values in raw["train"][self.columns.label]:
                    for v in set(values):
                        counts[v] += 1
                self.prior = [counts[v] / len(raw["train"]) for v in self.labels]
        known = set(self.labels)
        for split in raw:
            if split == "train" and not self._restored:
                continue
            for row, value in enumerate(raw[split][self.columns.label]):
                values = value if self.problem_type == MULTI and isinstance(value, list) else [value]
                if self.problem_type == MULTI and not isinstance(value, list):
                    raise InputError(f"data.{split} row {row}: multi-label rows hold a list of labels, got {value!r}")
                unknown = [v for v in values if v not in known]
                if unknown:
                    raise InputError(
                        f"data.{split} row {row}: label {unknown[0]!r} not among the training labels {self.labels}"
                    )

    def _name_class_ids(self, raw: DatasetDict) -> None:
        """Labels stored as `ClassLabel` ids (Hub datasets such as glue or go_emotions) become their names in every
        split, so the model's id2label and predictions read "positive", not "1"; an id outside the names (glue's -1
        for a hidden test label) becomes its digits and fails the label check naming its row."""
        column = self.columns.label
        names = class_names(raw["train"], column) if "train" in raw and column else None
        if not names or (self._restored and not set(self.labels) <= set(names)):
            return  # a model trained on the bare ids keeps reading ids
        self.class_order = names

        def name(v: Any) -> str:
            return names[v] if isinstance(v, int) and 0 <= v < len(names) else str(v)

        def rename(batch: dict[str, list]) -> dict[str, list]:
            values = batch[column]
            return {column: [[name(v) for v in x] if isinstance(x, list) else name(x) for x in values]}

        for split in list(raw):
            ds = raw[split]
            if ds.features and column in ds.features:
                # an explicit string feature: left to itself, map casts the names back to ClassLabel ids
                listed = isinstance(ds.features[column], List | list)
                text = List(Value("string")) if listed else Value("string")
                raw[split] = ds.map(rename, batched=True, features=Features({**ds.features, column: text}))

    def _labels_from_evaluation(self, raw: DatasetDict) -> None:
        """A streamed training split shows only its first rows: the evaluation splits' labels join the set, which a
        later training row outside it then fails on, naming the row."""
        found = set(self.labels)
        for split in raw:
            if split != "train":
                values = raw[split][self.columns.label]
                found |= {v for x in values for v in (x if isinstance(x, list) else [x]) if v is not None}
        try:
            self.labels = sorted(found)
        except TypeError as err:
            raise InputError(f"data: column {self.columns.label!r} mixes label types across splits") from err
        say(f"data.train: streamed; labels from its first {STREAM_CHECK_ROWS} rows and the evaluation splits: "
            f"{self.labels}")  # fmt: skip

    def _kind_of(self, train: Any) -> str:
        """The problem type the label column implies: lists are multi-label, floats regression, else classes. A
        column of floats is regression only when the recipe does not say otherwise."""
        column = self.columns.label
        values = [v for v in train[column][:1000] if v is not None]
        if values and all(isinstance(v, list) for v in values):
            if self.cfg.multi_label is False:
                raise InputError(
                    f"data.train: column {column!r} holds lists of labels but classification.multi_label is false"
                )
            return MULTI
        if values and any(isinstance(v, float) for v in values):
            if self.cfg.regression is False:
                raise InputError(
                    f"data.train: column {column!r} holds numbers such as {values[0]!r}, not class labels; set "
                    "classification.regression: true to predict a score, or give int or string classes"
                )
            return REGRESSION
        return SINGLE

    def _check_scores(self, values: list[Any], split: str, first_row: int = 0) -> None:
        for row, value in enumerate(values, start=first_row):
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise InputError(
                    f"data.{split} row {row}: regression target {self.columns.label!r} is not a number: {value!r}"
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
        if self.problem_type == MULTI:
            bad = next((i for i, v in enumerate(train_labels) if not isinstance(v, list)), None)
            if bad is not None:
                raise InputError(
                    f"data.train row {bad}: multi-label rows hold a list of labels, got {train_labels[bad]!r}"
                )
            train_labels = [v for values in train_labels for v in values]
        values = set(train_labels)
        if len({type(v) for v in values}) > 1:
            raise InputError(
                f"data.train: column {self.columns.label!r} mixes label types {sorted(map(repr, values))}"
            )
        # named ids keep the dataset's class order; other labels are sorted
        order = self.class_order
        self.labels = [v for v in order if v in values] if order else sorted(values)
        if len(self.labels) < 2:
            raise InputError(f"data.train: column {self.columns.label!r} has a single label {self.labels}")

    @property
    def label2id(self) -> dict[str, int]:
        return {str(v): i for i, v in enumerate(self.labels)}

    def load_model(self, path: str) -> PreTrainedModel:
        m = self.recipe.model
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        # A checkpoint may carry the problem type it was trained for (transformers records it at the first loss);
        # cleared before the head changes, since the config refuses e.g. a single-label type with one output.
        config.problem_type = None
        if self.problem_type == REGRESSION:
            config.num_labels = 1
            config.id2label, config.label2id = {0: self.columns.label}, {self.columns.label: 0}
        else:
            config.num_labels = len(self.labels)
            config.id2label, config.label2id = {i: str(v) for i, v in enumerate(self.labels)}, self.label2id
        config.problem_type = self.problem_type
        model, info = self.pretrained(AutoModelForSequenceClassification, path, config=config, output_loading_info=True)
        if self.problem_type in (MULTI, REGRESSION) and self.prior is not None:
            self._bias_from_prior(model, info["missing_keys"])
        return model

    def _bias_from_prior(self, model: PreTrainedModel, missing: Any) -> None:
        """A fresh multi-label head starts at each label's log-odds in the training data, not at probability 0.5; a
        fresh regression head at the training targets' mean, not at 0.

        From a zero bias every step first has to push 28 sigmoids from 0.5 down to their base rates (GoEmotions: 1 to
        30%), or one output from 0 up to STS-B's mean of 2.7, and at fine-tuning learning rates a bias moves ~lr per
        step: the body learns to output the prior instead of the labels (docs/benchmarks.md, "multi-label head
        bias", "regression head bias"). The prior start of Lin et al. 2017 (focal loss, sec. 4.1)."""
        n = len(self.labels) or 1
        params = dict(model.named_parameters())
        fresh = [k for k in missing if k.endswith(".bias") and k in params and params[k].shape == (n,)]
        if len(fresh) != 1:
            return  # no bias, or not one we can tell is the fresh output layer's
        prior = torch.tensor(self.prior, dtype=torch.float64)
        if self.problem_type == MULTI:
            rate = prior.clamp(1e-4, 1 - 1e-4)
            prior = torch.log(rate / (1 - rate))
        with torch.no_grad():
            params[fresh[0]].copy_(prior.to(params[fresh[0]].dtype))

    def _encode(self, batch: dict[str, list]) -> dict[str, list]:
        pair = batch[self.columns.text_pair] if self.columns.text_pair else None
        return self.tokenizer(batch[self.columns.text], pair, truncation=True, max_length=self.max_length)

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        label_col = self.columns.label
        ids = {v: i for i, v in enumerate(self.labels)}

        def target(value: Any) -> Any:
            if self.problem_type == REGRESSION:
                return float(value)
            if self.problem_type == MULTI:  # multi-hot floats, what BCEWithLogitsLoss takes
                hot = [0.0] * len(self.labels)
                for v in value:
                    hot[ids[v]] = 1.0
                return hot
            return ids[value]

        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = self._encode(batch)
            encoded["labels"] = [target(v) for v in batch[label_col]]
            encoded["length"] = [len(x) for x in encoded["input_ids"]]
            return encoded

        def encode_row(row: dict[str, Any], index: int) -> dict[str, Any]:
            """A streamed training row, checked as `prepare` checks a whole split."""
            where = f"data.train row {index}"
            for key, column in (("text", self.columns.text), ("text_pair", self.columns.text_pair)):
                if column and (not isinstance(row.get(column), str) or not row[column].strip()):
                    raise InputError(f"{where}: column {column!r} (data.columns.{key}) is empty or not text")
            value = row.get(label_col)
            if self.problem_type == REGRESSION:
                self._check_scores([value], "train", first_row=index)
            else:
                values = value if self.problem_type == MULTI and isinstance(value, list) else [value]
                if self.problem_type == MULTI and not isinstance(value, list):
                    raise InputError(f"{where}: multi-label rows hold a list of labels, got {value!r}")
                unknown = [v for v in values if v not in ids]
                if unknown:
                    raise InputError(f"{where}: label {unknown[0]!r} not among the labels {self.labels} (those of "
                                     f"the stream's first {STREAM_CHECK_ROWS} rows and the evaluation splits)")  # fmt: skip
            encoded = encode({k: [v] for k, v in row.items()})
            return {k: v[0] for k, v in encoded.items() if k != "length"}

        encoded = DatasetDict(
            {
                split: RowStream(ds, encode_row)
                if isinstance(ds, IterableDataset)
                else ds.map(
                    encode,
                    batched=True,
                    remove_columns=ds.column_names,
                    num_proc=self.recipe.data.num_proc,
                    desc=f"Tokenising {split}",
                )
                for split, ds in raw.items()
            }
        )
        self._eval.update({split: (raw[split], encoded[split]["length"]) for split in raw if split != "train"})
        return encoded

    def collator(self) -> RulePadding:
        # capped at the truncation length, so a batch never asks for more positions than the budget allowed
        return RulePadding(self.tokenizer, max_length=self.max_length, rule=self.padding)

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits = logits.float()
        out = {"logits": logits}
        if "labels" in batch:
            labels = batch["labels"]
            # per-example losses, so the mean is exact whatever the batch split across processes; each the loss
            # transformers' head computes for this problem type
            if self.problem_type == REGRESSION:
                out["loss"] = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
            elif self.problem_type == MULTI:
                out["loss"] = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
            else:
                out["loss"] = F.cross_entropy(logits, labels, reduction="none")
            out["labels"] = labels
        return out

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        loss_sum, count, logits, labels = 0.0, 0, [], []

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with accelerator.autocast():
                return self._forward(model, batch)

        for out in gathered_outputs(model, loader, accelerator, forward):
            loss_sum += out["loss"].sum().item()
            count += out["loss"].numel()
            logits.append(out["logits"].cpu())
            labels.append(out["labels"].cpu())
        scores = {"eval_loss": loss_sum / max(count, 1)}
        logit, label = torch.cat(logits).numpy(), torch.cat(labels).numpy()
        if self.problem_type == REGRESSION:
            scores.update(regression_scores(logit[:, 0], label))
        elif self.problem_type == MULTI:
            probs = 1 / (1 + np.exp(-logit))
            if split == "validation" and self.cfg.tune_thresholds and not self._restored:
                # every process holds the same gathered outputs, so every process picks the same thresholds
                self.thresholds = tune_thresholds(probs, label, default=self.cfg.threshold)
            names = [str(v) for v in self.labels]
            scores.update(multi_label_scores(probs >= self._thresholds(), label, names))
        else:
            metric = load_metric("classification")
            metric.add_batch(predictions=logit.argmax(-1).tolist(), references=label.tolist())
            scores.update(metric.compute(labels=list(range(len(self.labels)))))
        if records is not None:
            ds, lengths = self._eval[split]
            # outputs come in the loader's order (by length); rows are put back in the split's own
            order = eval_order(lengths)
            back = np.empty(len(order), dtype=np.int64)
            back[order] = np.arange(len(order))
            records.extend(self._records(ds, logit[back], label[back]))
        return scores

    def _records(self, ds: Dataset, logit: np.ndarray, label: np.ndarray) -> list[dict]:
        """One row per example: its id and text columns, prediction, reference and the per-example value of the
        metric that is a mean over examples (accuracy, subset accuracy, squared error)."""
        if len(ds) != len(logit):
            raise RuntimeError(f"{len(logit)} outputs for {len(ds)} examples")
        text = {c: ds[c] for c in (self.columns.text, self.columns.text_pair) if c}
        given = ds[self.columns.label]  # references as the data has them (not the float32 of the label tensor)
        rows = []
        for i, id_ in enumerate(example_ids(ds)):
            row: dict[str, Any] = {"id": id_, **{c: values[i] for c, values in text.items()}}
            if self.problem_type == REGRESSION:
                value, gold = float(logit[i, 0]), float(given[i])
                row.update(prediction=value, reference=gold, scores={"mse": (value - gold) ** 2})
            elif self.problem_type == MULTI:
                p = 1 / (1 + np.exp(-logit[i]))
                chosen = p >= self._thresholds()
                gold = label[i] > 0.5
                row.update(
                    prediction=[v for v, c in zip(self.labels, chosen, strict=True) if c],
                    probabilities={str(v): float(q) for v, q in zip(self.labels, p, strict=True)},
                    reference=[v for v, g in zip(self.labels, gold, strict=True) if g],
                    scores={"subset_accuracy": float((chosen == gold).all())},
                )
            else:
                p = np.exp(logit[i] - logit[i].max())
                best = int(logit[i].argmax())
                row.update(
                    prediction=self.labels[best],
                    probability=float(p[best] / p.sum()),
                    reference=self.labels[int(label[i])],
                    scores={"accuracy": float(best == int(label[i]))},
                )
            rows.append(row)
        return rows

    @classmethod
    def resampled(cls, rows: list[dict], metric: str) -> Any:
        """Regression's Pearson correlation and multi-label micro-F1 (2 x shared labels / (predicted + gold)) from
        each row's prediction and reference; the means of per-example scores as every task's."""
        if rows and metric == "pearson":
            return pearson_of([r["prediction"] for r in rows], [r["reference"] for r in rows])
        if rows and metric == "f1_micro" and isinstance(rows[0].get("prediction"), list):
            shared = [len(set(r["prediction"]) & set(r["reference"])) for r in rows]
            return ratio_of(shared, [len(r["prediction"]) + len(r["reference"]) for r in rows], 2.0)
        return super().resampled(rows, metric)

    def _thresholds(self) -> np.ndarray:
        if self.thresholds is None:
            return np.full(len(self.labels), self.cfg.threshold)
        return np.asarray(self.thresholds)

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
            if self.problem_type == REGRESSION:
                for i, value in zip(idx, outputs["logits"][:, 0].tolist(), strict=True):
                    out[i] = {"score": value}
                continue
            if self.problem_type == MULTI:
                chosen = self._thresholds()
                for i, p in zip(idx, outputs["logits"].sigmoid().tolist(), strict=True):
                    out[i] = {
                        "labels": [v for v, q, t in zip(self.labels, p, chosen, strict=True) if q >= t],
                        "probabilities": {str(v): q for v, q in zip(self.labels, p, strict=True)},
                    }
                continue
            for i, p in zip(idx, outputs["logits"].softmax(-1).tolist(), strict=True):
                best = max(range(len(p)), key=p.__getitem__)
                out[i] = {
                    "label": self.labels[best],
                    "probability": p[best],
                    "probabilities": {str(v): q for v, q in zip(self.labels, p, strict=True)},
                }
        return out

    def checkpoint_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"labels": self.labels, "problem_type": self.problem_type}
        if self.problem_type == MULTI:
            info["thresholds"] = self._thresholds().tolist()
        return info

    def restore(self, info: dict[str, Any]) -> None:
        """The saved model's labels, problem type and thresholds; evaluation then uses them as they are."""
        self.labels = list(info["labels"])
        self._set_kind(info.get("problem_type") or SINGLE)
        self.thresholds = info.get("thresholds")
        self._restored = True
