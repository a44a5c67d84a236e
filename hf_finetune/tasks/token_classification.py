"""Token classification: one tag per word (named entities in IOB1/IOB2/IOBES, or any per-word tag set).

Words are split into sub-words with the tokenizer's word ids; a word's label sits on its first sub-word (on every
sub-word with `token_classification.label_all_tokens`), the rest get -100, as in transformers' run_ner.py. Rows longer
than `training.max_length` become overlapping windows instead of being cut, and every word is scored exactly once, in
the window where it has the most context on both sides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer
from transformers import AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from hf_finetune.data import class_names, require_columns
from hf_finetune.device import Padding, right_pad
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.metrics import load_metric
from hf_finetune.metrics.entities.entities import spans
from hf_finetune.significance import ratio_of
from hf_finetune.tasks.base import TaskBase, example_ids, positive

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe

IGNORE = -100  # the label id cross-entropy skips (transformers' convention)
MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask")
# Words of raw text for `predict`: runs of word characters (with inner hyphens and apostrophes) or single symbols,
# the way CoNLL-2003 splits "U.S.-based" style text closely enough for a tagger trained on it.
WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


def words_spaced(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, changed in place so that each pre-split word is encoded as it is inside running text.

    Byte-level BPE (GPT-2, RoBERTa, Llama 3) and sentencepiece's "first" Metaspace put a word's leading space into its
    first token; a pre-split word has none, so every word would be tokenized as if it began the text ("said" as
    "s", "aid" instead of "Ġsaid"). run_ner.py loads such tokenizers with add_prefix_space=True for this reason; a
    generic fast tokenizer ignores that argument, so the pre-tokenizer itself is rewritten (and saved with the run).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return tokenizer
    whole = json.loads(backend.to_str())
    spec = whole["pre_tokenizer"]
    changed = False

    def respace(node: dict) -> None:
        nonlocal changed
        if node.get("type") == "ByteLevel" and node.get("add_prefix_space") is False:
            node["add_prefix_space"], changed = True, True
        elif node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"], changed = "always", True
        for child in node.get("pretokenizers") or []:
            respace(child)

    respace(spec)
    if changed:
        # tokenizers builds a pre-tokenizer only as part of a whole tokenizer
        backend.pre_tokenizer = Tokenizer.from_str(json.dumps(whole)).pre_tokenizer
        # saved into tokenizer_config.json: RobertaTokenizer and kin rebuild their pre-tokenizer from it on load
        tokenizer.init_kwargs["add_prefix_space"] = True
        tokenizer.add_prefix_space = True
    return tokenizer


@dataclass
class TokenCollator:
    """Dynamic padding to the device's rule: inputs with the tokenizer's pad id, labels with -100; `feature_index`
    (evaluation) passes through so that evaluation can look its window up."""

    tokenizer: PreTrainedTokenizerBase
    padding: Padding
    max_length: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {"input_ids": right_pad([f["input_ids"] for f in features], pad_id, self.padding, self.max_length)}
        fill = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}
        for key, value in fill.items():
            if key in features[0]:
                batch[key] = right_pad([f[key] for f in features], value, self.padding, self.max_length)
        if "feature_index" in features[0]:
            batch["feature_index"] = torch.tensor([f["feature_index"] for f in features])
        return batch


class TokenClassificationTask(TaskBase):
    name = "token_classification"
    pipeline_tag = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    # CoNLL's short rows are headlines and score tables: batches of one length are of one kind, and LoRA lost 8 points
    # of entity F1 to it (docs/benchmarks.md, "length grouping")
    group_by_length = False
    metrics = {"eval_loss": False, "f1": True, "precision": True, "recall": True, "accuracy": True}
    primary_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    default_max_length = 128
    token_level = True  # the loss is a mean over tagged sub-words: accumulation divides by the window's count
    head_modules = ("classifier", "score")

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.columns = recipe.data.columns
        self.cfg = recipe.token_classification
        self.labels: list[str] = []
        """Tag names in id order (the model's id2label)."""
        self._eval: dict[str, tuple[Dataset, Dataset]] = {}

    @property
    def stride(self) -> int:
        return self.cfg.stride or self.max_length // 4

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        stride, max_length = recipe.token_classification.stride, recipe.training.max_length or cls.default_max_length
        problems = positive({"token_classification.stride": stride})
        if stride is not None and stride >= max_length // 2:
            problems.append(
                f"'token_classification.stride': must be under half of training.max_length ({max_length}), "
                f"got {stride}"
            )
        return problems

    # ---- data -------------------------------------------------------------------------------------------------

    def _names(self, ds: Dataset) -> list[str] | None:
        """Tag names for int tags: the split's ClassLabel feature, else `token_classification.label_names`."""
        return class_names(ds, self.columns.tags) or self.cfg.label_names

    def setup(self, tokenizer: PreTrainedTokenizerBase, padding: Padding) -> None:
        super().setup(words_spaced(tokenizer), padding)

    def prepare(self, raw: DatasetDict) -> None:
        """Every split becomes columns id/words/tags (tag names), each row checked: words are non-empty strings, one
        tag per word, every evaluation tag known to training."""
        c = self.columns
        order: list[str] | None = None
        for split in list(raw):
            ds = raw[split]
            require_columns(ds, {"tokens": c.tokens, "tags": c.tags}, split)
            names = self._names(ds)
            if split == "train":
                order = names
            words_all, tags_all = [], []
            for row, (words, tags) in enumerate(zip(ds[c.tokens], ds[c.tags], strict=True)):
                where = f"data.{split} row {row}"
                if not isinstance(words, list) or not words:
                    raise InputError(f"{where}: column {c.tokens!r} must be a non-empty list of words, got {words!r}")
                if not isinstance(tags, list) or len(tags) != len(words):
                    count = len(tags) if isinstance(tags, list) else "no list of"
                    raise InputError(f"{where}: {len(words)} words but {count} tags in column {c.tags!r}")
                bad = [w for w in words if not isinstance(w, str) or not w.strip()]
                if bad:
                    raise InputError(f"{where}: column {c.tokens!r} holds an empty or non-text word {bad[0]!r}")
                words_all.append(words)
                tags_all.append(self._tag_names(tags, names, where))
            raw[split] = Dataset.from_dict({"id": example_ids(ds), "words": words_all, "tags": tags_all})
        if not self.labels:  # restored from a checkpoint otherwise
            seen = {t for tags in raw["train"]["tags"] for t in tags}
            # named tag sets keep their order (the Hub's ClassLabel ids); tags read as names are sorted
            self.labels = list(order) if order else sorted(seen)
            if len(seen) < 2:
                raise InputError(f"data.train: column {c.tags!r} has a single tag {sorted(seen)}")
        known = set(self.labels)
        for split in raw:
            for row, tags in enumerate(raw[split]["tags"]):
                unknown = next((t for t in tags if t not in known), None)
                if unknown is not None:
                    raise InputError(f"data.{split} row {row}: tag {unknown!r} not among the training tags {self.labels}")

    def _tag_names(self, tags: list[Any], names: list[str] | None, where: str) -> list[str]:
        if all(isinstance(t, str) for t in tags):
            return tags
        if all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            if names is None:
                raise InputError(
                    f"{where}: tags are ids without names; give token_classification.label_names (names in id order)"
                )
            bad = next((t for t in tags if not 0 <= t < len(names)), None)
            if bad is not None:
                raise InputError(f"{where}: tag id {bad} outside token_classification.label_names ({len(names)} names)")
            return [names[t] for t in tags]
        raise InputError(f"{where}: tags must be all names or all ints, got {tags!r}")

    @property
    def _continuation(self) -> list[int]:
        """Label id for a word's later sub-words with label_all_tokens: B-X continues as I-X (run_ner.py's
        b_to_i_label), every other tag as itself."""
        ids = {t: i for i, t in enumerate(self.labels)}
        return [ids.get("I-" + t[2:], i) if t.startswith("B-") else i for i, t in enumerate(self.labels)]

    def load_model(self, path: str) -> PreTrainedModel:
        return self.pretrained(
            AutoModelForTokenClassification,
            path,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={t: i for i, t in enumerate(self.labels)},
        )

    def features(
        self, words: list[list[str]], tags: list[list[str]] | None, training: bool, rows: list[int] | None = None
    ) -> dict[str, list]:
        """Windows over each row's sub-words, with labels on the scored positions and, per position, the index of
        the word it scores (-1 elsewhere); `example_index` is each window's row (`rows[i]` for the i-th row given)."""
        tokenizer = self.tokenizer
        if not tokenizer.is_fast:
            raise InputError("token classification needs a fast tokenizer (word ids)")
        encoded = tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
        )
        sample_map = encoded.pop("overflow_to_sample_mapping")
        windows = [encoded.word_ids(w) for w in range(len(encoded["input_ids"]))]
        home = self._home_windows(windows, sample_map)
        ids = {t: i for i, t in enumerate(self.labels)}
        continuation = self._continuation
        labels_out, index_out = [], []
        for w, word_ids in enumerate(windows):
            example = sample_map[w]
            labels, index, previous = [], [], None
            for word in word_ids:
                scored = word is not None and home[(example, word)] == w
                first = scored and word != previous
                label = IGNORE
                if tags is not None and scored:
                    tag = ids[tags[example][word]]
                    if first:
                        label = tag
                    elif self.cfg.label_all_tokens and training:
                        label = continuation[tag]
                labels.append(label)
                index.append(word if first else -1)
                previous = word
            labels_out.append(labels)
            index_out.append(index)
        out = dict(encoded)
        if tags is not None:
            out["labels"] = labels_out
        out["word_index"] = index_out
        out["example_index"] = [rows[i] for i in sample_map] if rows is not None else list(sample_map)
        out["length"] = [len(x) for x in encoded["input_ids"]]
        return out

    @staticmethod
    def _home_windows(windows: list[list[int | None]], sample_map: list[int]) -> dict[tuple[int, int], int]:
        """(example, word) -> the window where the word's first sub-word has the most tokens on its nearer side."""
        best: dict[tuple[int, int], tuple[int, int]] = {}
        for w, word_ids in enumerate(windows):
            content = [p for p, word in enumerate(word_ids) if word is not None]
            lo, hi = content[0], content[-1]
            previous = None
            for p, word in enumerate(word_ids):
                if word is not None and word != previous:
                    key, margin = (sample_map[w], word), min(p - lo, hi - p)
                    if key not in best or margin > best[key][0]:
                        best[key] = (margin, w)
                previous = word
        return {key: w for key, (_, w) in best.items()}

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in raw.items():
            training = split == "train"
            # with_indices: `example_index` must count rows of the split, not of the map's batch
            feats = ds.map(
                lambda batch, rows, training=training: self.features(batch["words"], batch["tags"], training, rows),
                batched=True,
                with_indices=True,
                remove_columns=ds.column_names,
                num_proc=self.recipe.data.num_proc,
                desc=f"Tokenising {split}",
            )
            if training:
                feats = feats.remove_columns(["word_index", "example_index"])
            else:
                feats = feats.add_column("feature_index", list(range(len(feats))))
                self._eval[split] = (feats.select_columns(["word_index", "example_index"]), ds)
            out[split] = feats
        return DatasetDict(out)

    def collator(self) -> TokenCollator:
        return TokenCollator(self.tokenizer, self.padding, self.max_length)

    # ---- evaluation and prediction ----------------------------------------------------------------------------

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}).logits.float()
        probs = logits.softmax(-1)
        score, pred = probs.max(-1)
        out = {"pred": pred, "score": score}
        if "labels" in batch:
            labels = batch["labels"]
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            # per-window sums and counts, so the token mean is exact whatever the batch split across processes
            out["loss"] = losses.sum(-1)
            out["tokens"] = (labels != IGNORE).sum(-1)
        return out

    def _word_tags(
        self, outputs: list[tuple[list[int], torch.Tensor, torch.Tensor]], index: Dataset, lengths: list[int]
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Per example, the predicted tag and its probability for every word, read at each word's scored position.
        A word the tokenizer turns into no sub-word at all (a lone control character) is tagged O with score 0."""
        fallback = "O" if "O" in self.labels else self.labels[0]
        tags = [[fallback] * n for n in lengths]
        scores = [[0.0] * n for n in lengths]
        for feature_ids, pred, score in outputs:
            rows = index[feature_ids]
            for i, (words, example) in enumerate(zip(rows["word_index"], rows["example_index"], strict=True)):
                for p, word in enumerate(words):
                    if word >= 0:
                        tags[example][word] = self.labels[int(pred[i, p])]
                        scores[example][word] = float(score[i, p])
        return tags, scores

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        index, examples = self._eval[split]
        loss_sum, count, outputs = 0.0, 0, []

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            feature_index = batch.pop("feature_index")
            with accelerator.autocast():
                out = self._forward(model, batch)
            out["index"] = feature_index
            return out

        # processes pad their batches to different widths; positions past a window's end are never read
        for out in gathered_outputs(model, loader, accelerator, forward, pad={"pred": 0, "score": 0.0}):
            loss_sum += out["loss"].sum().item()
            count += int(out["tokens"].sum())
            outputs.append((out["index"].tolist(), out["pred"].cpu(), out["score"].cpu()))
        gold = examples["tags"]
        predicted, _ = self._word_tags(outputs, index, [len(t) for t in gold])
        scores = load_metric("entities").compute(predictions=predicted, references=gold)
        if records is not None:
            records.extend(self._records(examples, predicted))
        return {"eval_loss": loss_sum / max(count, 1), **scores}

    def _records(self, examples: Dataset, predicted: list[list[str]]) -> list[dict]:
        """One row per sentence: words, predicted and gold tags, and the counts entity F1 and token accuracy are
        built from (summed over the split, not averaged: F1 is no mean over sentences)."""
        rows = []
        for id_, words, pred, gold in zip(
            examples["id"], examples["words"], predicted, examples["tags"], strict=True
        ):
            p, g = set(spans(pred)), set(spans(gold))
            rows.append({
                "id": id_,
                self.columns.tokens: words,
                "prediction": pred,
                "reference": gold,
                "counts": {
                    "correct_entities": len(p & g),
                    "predicted_entities": len(p),
                    "gold_entities": len(g),
                    "correct_tokens": sum(a == b for a, b in zip(pred, gold, strict=True)),
                    "tokens": len(gold),
                },
            })  # fmt: skip
        return rows

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]:
        """Rows with raw `text` (split into words here, character offsets kept) or pre-split words
        (`data.columns.tokens`, offsets into the words joined by spaces); each gets its words, their tags and the
        entities with type, text, character start/end and score (the mean probability of its words' tags)."""
        texts, words_all, offsets_all = [], [], []
        for i, row in enumerate(rows):
            words = row.get(self.columns.tokens)
            if isinstance(words, list) and words and all(isinstance(w, str) and w.strip() for w in words):
                text, offsets, at = " ".join(words), [], 0
                for w in words:
                    offsets.append((at, at + len(w)))
                    at += len(w) + 1
            elif isinstance(row.get(self.columns.text), str) and row[self.columns.text].strip():
                text = row[self.columns.text]
                matches = list(WORD.finditer(text))
                words, offsets = [m.group() for m in matches], [m.span() for m in matches]
            else:
                raise InputError(
                    f"input row {i}: give {self.columns.text!r} (text) or {self.columns.tokens!r} (a list of words)"
                )
            texts.append(text)
            words_all.append(words)
            offsets_all.append(offsets)
        feats = self.features(words_all, None, training=False)
        inputs = [{k: feats[k][i] for k in MODEL_KEYS if k in feats} for i in range(len(feats["input_ids"]))]
        table = Dataset.from_dict({"word_index": feats["word_index"], "example_index": feats["example_index"]})
        collate = self.collator()
        outputs = [
            (idx, out["pred"].cpu(), out["score"].cpu())
            for idx, out in batched_rows(model, inputs, collate, self.recipe.training.eval_batch, self._forward)
        ]
        tags, scores = self._word_tags(outputs, table, [len(w) for w in words_all])
        results = []
        for text, words, offsets, row_tags, row_scores in zip(texts, words_all, offsets_all, tags, scores, strict=True):
            entities = []
            for type_, first, last in spans(row_tags):
                start, end = offsets[first][0], offsets[last][1]
                entities.append(
                    {
                        "type": type_,
                        "text": text[start:end],
                        "start": start,
                        "end": end,
                        "score": sum(row_scores[first : last + 1]) / (last - first + 1),
                    }
                )
            results.append({"words": words, "tags": row_tags, "entities": entities})
        return results

    @classmethod
    def resampled(cls, rows: list[dict], metric: str) -> Any:
        """Entity precision, recall and F1 (micro: ratios of the summed counts) and token accuracy."""
        if not rows or "counts" not in rows[0]:
            return super().resampled(rows, metric)
        count = {k: [r["counts"][k] for r in rows] for k in rows[0]["counts"]}
        pred_gold = [p + g for p, g in zip(count["predicted_entities"], count["gold_entities"], strict=True)]
        ratios = {
            "f1": (count["correct_entities"], pred_gold, 2.0),
            "precision": (count["correct_entities"], count["predicted_entities"], 1.0),
            "recall": (count["correct_entities"], count["gold_entities"], 1.0),
            "accuracy": (count["correct_tokens"], count["tokens"], 1.0),
        }
        return ratio_of(*ratios[metric]) if metric in ratios else super().resampled(rows, metric)

    def checkpoint_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
