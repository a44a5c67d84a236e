"""Extractive question answering: SQuAD v1.1 and v2.0 layouts on encoder models.

Long contexts are cut into overlapping windows (`training.max_length`, `qa.doc_stride`) through the fast tokenizer's
offset mapping, as transformers' run_qa.py does. Evaluation picks the best span per example over all its windows,
streamed batch by batch: only the `n_best_size` best candidates of each example are kept, never all the logits.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from transformers import AutoModelForQuestionAnswering, PreTrainedModel, PreTrainedTokenizerBase

from hf_finetune.data import require_columns
from hf_finetune.device import Padding, RulePadding
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.metrics import load_metric
from hf_finetune.metrics.squad.squad import example_scores
from hf_finetune.tasks.base import TaskBase, positive

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe

# What the collator hands on; offsets and example indices stay in the (memory-mapped) feature table.
MODEL_KEYS = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "start_positions",
    "end_positions",
    "feature_index",
)
NO_OFFSET = (-1, -1)  # tokens outside the context: question, special tokens


class QACollator:
    """Dynamic padding of the model inputs; bookkeeping columns are dropped here, looked up by `feature_index`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, padding: Padding, max_length: int) -> None:
        self.pad = RulePadding(tokenizer, max_length=max_length, rule=padding)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.pad([{k: v for k, v in f.items() if k in MODEL_KEYS} for f in features])


@dataclass(order=True)
class Candidate:
    score: float
    start: int = field(compare=False)
    end: int = field(compare=False)


class SpanCollector:
    """The best answer spans of each example over all of its windows, fed one batch at a time.

    Equivalent to transformers' `postprocess_qa_predictions` (examples/pytorch/question-answering/utils_qa.py) except
    that every valid (start, end) pair is scored rather than only the top-n starts times the top-n ends, and that only
    `n_best` candidates per example are ever held."""

    def __init__(self, n_best: int, max_answer_length: int, with_null: bool) -> None:
        self.n_best, self.max_answer_length, self.with_null = n_best, max_answer_length, with_null
        self.best: dict[int, list[Candidate]] = {}  # min-heaps of the n_best highest scores
        self.null: dict[int, float] = {}

    def add(
        self,
        example_index: list[int],
        start_logits: torch.Tensor,
        end_logits: torch.Tensor,
        offsets: list[list[list[int]]],
        cls_index: list[int],
    ) -> None:
        batch, length = start_logits.shape
        starts = torch.full((batch, length), -1, dtype=torch.long)
        ends = torch.full((batch, length), -1, dtype=torch.long)
        for i, feature_offsets in enumerate(offsets):
            pairs = torch.tensor(feature_offsets, dtype=torch.long).view(-1, 2)[:length]
            starts[i, : len(pairs)], ends[i, : len(pairs)] = pairs[:, 0], pairs[:, 1]
        context = starts >= 0
        # valid spans: both ends inside the context, end >= start, at most max_answer_length tokens
        band = torch.ones(length, length, dtype=torch.bool).triu()
        band &= ~torch.ones(length, length, dtype=torch.bool).triu(self.max_answer_length)
        valid = band & context[:, :, None] & context[:, None, :]
        scores = (start_logits[:, :, None] + end_logits[:, None, :]).masked_fill(~valid, -math.inf)
        k = min(self.n_best, length * length)
        top_scores, top_flat = scores.view(batch, -1).topk(k, dim=1)
        for i, example in enumerate(example_index):
            heap = self.best.setdefault(example, [])
            for score, flat in zip(top_scores[i].tolist(), top_flat[i].tolist(), strict=True):
                if score == -math.inf:
                    break
                s, e = divmod(flat, length)
                candidate = Candidate(score, int(starts[i, s]), int(ends[i, e]))
                if len(heap) < self.n_best:
                    heapq.heappush(heap, candidate)
                elif candidate > heap[0]:
                    heapq.heapreplace(heap, candidate)
            if self.with_null:
                c = cls_index[i]
                # run_qa keeps the minimum null score over an example's windows
                null = float(start_logits[i, c] + end_logits[i, c])
                self.null[example] = min(self.null.get(example, math.inf), null)

    def answer(self, example: int, context: str, null_threshold: float = 0.0) -> dict[str, Any]:
        """{answer, score, start, end}; `score` is the softmax over the kept candidates (and the null answer)."""
        candidates = sorted(self.best.get(example, []), reverse=True)
        null = self.null.get(example) if self.with_null else None
        scores = [c.score for c in candidates] + ([null] if null is not None else [])
        if not scores:
            return {"answer": "", "score": 0.0, "start": -1, "end": -1}
        probs = torch.tensor(scores).softmax(0).tolist()
        if not candidates or (null is not None and null - candidates[0].score > null_threshold):
            return {"answer": "", "score": probs[-1], "start": -1, "end": -1}
        best = candidates[0]
        return {
            "answer": context[best.start : best.end],
            "score": probs[0],
            "start": best.start,
            "end": best.end,
        }


def normalise_answers(value: Any) -> dict[str, list]:
    """SQuAD's `{text: [...], answer_start: [...]}`, also from the official list-of-dicts form or a JSON string (csv)."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {"text": [], "answer_start": []}
    if isinstance(value, list):
        value = {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ValueError("expected {text: [...], answer_start: [...]}")
    texts, starts = value["text"], value["answer_start"]
    if isinstance(texts, str):  # a single answer written without lists
        texts, starts = [texts], [starts]
    if len(texts) != len(starts):
        raise ValueError(f"{len(texts)} answer texts but {len(starts)} answer_start values")
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


class QuestionAnsweringTask(TaskBase):
    name = "question_answering"
    pipeline_tag = "question-answering"
    auto_class = "AutoModelForQuestionAnswering"
    metrics = {
        "eval_loss": False,
        "exact_match": True,
        "f1": True,
        # SQuAD v2 (qa.version_2_with_negative) splits the scores by answerable and unanswerable questions
        **{f"{part}_{score}": True for part in ("HasAns", "NoAns") for score in ("exact", "f1", "total")},
    }
    primary_metric = "f1"
    peft_task_type = "QUESTION_ANS"
    default_max_length = 384
    head_modules = ("qa_outputs",)

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.columns = recipe.data.columns
        self.qa = recipe.qa
        self.dropped: dict[str, int] = {}
        """Answers dropped per split as misaligned (`qa.misaligned_answers: drop`)."""
        self._eval: dict[str, tuple[Dataset, Dataset]] = {}  # split -> (features, examples)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        qa, max_length = recipe.qa, recipe.training.max_length
        problems = positive(
            {"qa.doc_stride": qa.doc_stride, "qa.n_best_size": qa.n_best_size, "qa.max_answer_length": qa.max_answer_length}
        )
        if max_length is not None and qa.doc_stride >= max_length:
            problems.append(f"'qa.doc_stride': must be smaller than training.max_length ({max_length}), got {qa.doc_stride}")
        return problems

    # ---- data -------------------------------------------------------------------------------------------------

    def prepare(self, raw: DatasetDict) -> None:
        """Normalise every split to columns id/question/context/answers and check that each answer is where its
        answer_start says; misaligned answers stop the run (naming the id) or are dropped and counted."""
        c = self.columns
        for split in list(raw):
            ds = raw[split]
            require_columns(ds, {"question": c.question, "context": c.context, "answers": c.answers}, split)
            ids = [str(i) for i in ds[c.id]] if c.id in ds.column_names else [str(i) for i in range(len(ds))]
            seen: set[str] = set()
            questions, contexts, answers = ds[c.question], ds[c.context], []
            dropped = 0
            for row, (id_, question, context, value) in enumerate(
                zip(ids, questions, contexts, ds[c.answers], strict=True)
            ):
                where = f"data.{split} row {row} (id {id_!r})"
                if id_ in seen:
                    raise InputError(f"{where}: duplicate id")
                seen.add(id_)
                if not isinstance(context, str) or not context.strip():
                    raise InputError(f"{where}: empty {c.context!r}")
                if not isinstance(question, str) or not question.strip():
                    raise InputError(f"{where}: empty {c.question!r}")
                try:
                    ans = normalise_answers(value)
                except (ValueError, TypeError, KeyError) as err:
                    raise InputError(f"{where}: column {c.answers!r}: {err}") from err
                keep: dict[str, list] = {"text": [], "answer_start": []}
                row_dropped = 0
                for text, start in zip(ans["text"], ans["answer_start"], strict=True):
                    if context[start : start + len(text)] == text and text:
                        keep["text"].append(text)
                        keep["answer_start"].append(start)
                    elif self.qa.misaligned_answers == "drop":
                        row_dropped += 1
                    else:
                        found = context[max(start, 0) : max(start, 0) + len(text)]
                        raise InputError(
                            f"{where}: answer {text!r} is not at answer_start {start} (the context has {found!r} "
                            "there); fix the data or set qa.misaligned_answers=drop"
                        )
                dropped += row_dropped
                # a training question whose only answer was dropped goes with it (filtered below)
                if (
                    not keep["text"]
                    and not self.qa.version_2_with_negative
                    and not (row_dropped and split == "train")
                ):
                    raise InputError(
                        f"{where}: no answer; unanswerable questions need qa.version_2_with_negative=true"
                    )
                answers.append(keep)
            if dropped:
                self.dropped[split] = dropped
                print(f"hf-finetune: data.{split}: dropped {dropped} misaligned answer(s)", file=sys.stderr)
            table = Dataset.from_dict(
                {"id": ids, "question": questions, "context": contexts, "answers": answers}
            )
            if split == "train" and not self.qa.version_2_with_negative:
                table = table.filter(lambda a: len(a["text"]) > 0, input_columns="answers")
            raw[split] = table

    def load_model(self, path: str) -> PreTrainedModel:
        return self.pretrained(AutoModelForQuestionAnswering, path)

    def _windows(self, batch: dict[str, list]) -> Any:
        tokenizer = self.tokenizer
        if not tokenizer.is_fast:
            raise InputError("question answering needs a fast tokenizer (offset mappings)")
        pad_on_right = tokenizer.padding_side == "right"
        # Some SQuAD questions start with a lot of whitespace, which would eat window space (run_qa.py does this).
        questions = [q.lstrip() for q in batch["question"]]
        # The tokenizer panics (a Rust exception, not an error) when a question leaves no more context room than the
        # stride; say which question instead.
        room = self.max_length - tokenizer.num_special_tokens_to_add(pair=True)
        for i, ids in enumerate(tokenizer(questions, add_special_tokens=False)["input_ids"]):
            if room - len(ids) <= self.qa.doc_stride:
                raise InputError(
                    f"question {batch['id'][i]!r} is {len(ids)} tokens long, leaving {room - len(ids)} of "
                    f"training.max_length={self.max_length} for the context: not more than qa.doc_stride="
                    f"{self.qa.doc_stride}; raise training.max_length or lower qa.doc_stride"
                )
        first, second = (questions, batch["context"]) if pad_on_right else (batch["context"], questions)
        return tokenizer(
            first,
            second,
            truncation="only_second" if pad_on_right else "only_first",
            max_length=self.max_length,
            stride=self.qa.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        ), (1 if pad_on_right else 0)

    def features(self, batch: dict[str, list], keep_offsets: bool) -> dict[str, list]:
        """Windows with start/end token positions (CLS when the answer is not inside the window); with
        `keep_offsets`, also the example index, the cls index and the context-only offset mapping."""
        tokenizer = self.tokenizer
        encoded, context_id = self._windows(batch)
        sample_map = encoded.pop("overflow_to_sample_mapping")
        offsets_all = encoded.pop("offset_mapping")
        starts, ends, offsets_out, cls_out = [], [], [], []
        for i, offsets in enumerate(offsets_all):
            ids = encoded["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            sequence_ids = encoded.sequence_ids(i)
            context_tokens = [t for t, s in enumerate(sequence_ids) if s == context_id]
            answers = batch["answers"][sample_map[i]]
            start_pos = end_pos = cls
            if answers["text"] and context_tokens:
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
                first, last = context_tokens[0], context_tokens[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start_pos = first
                    while start_pos <= last and offsets[start_pos][0] <= start_char:
                        start_pos += 1
                    start_pos -= 1
                    end_pos = last
                    while end_pos >= first and offsets[end_pos][1] >= end_char:
                        end_pos -= 1
                    end_pos += 1
            starts.append(start_pos)
            ends.append(end_pos)
            if keep_offsets:
                offsets_out.append(
                    [
                        list(o) if s == context_id else list(NO_OFFSET)
                        for o, s in zip(offsets, sequence_ids, strict=True)
                    ]
                )
                cls_out.append(cls)
        encoded["start_positions"], encoded["end_positions"] = starts, ends
        encoded["length"] = [len(x) for x in encoded["input_ids"]]
        if keep_offsets:
            encoded["example_index"] = [batch["index"][j] for j in sample_map]
            encoded["offset_mapping"] = offsets_out
            encoded["cls_index"] = cls_out
        return dict(encoded)

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in raw.items():
            training = split == "train"
            table = ds if training else ds.add_column("index", list(range(len(ds))))
            feats = table.map(
                functools.partial(self.features, keep_offsets=not training),
                batched=True,
                remove_columns=table.column_names,
                num_proc=self.recipe.data.num_proc,
                desc=f"Windowing {split}",
            )
            if not training:
                feats = feats.add_column("feature_index", list(range(len(feats))))
                self._eval[split] = (feats, ds)
            out[split] = feats
        return DatasetDict(out)

    def collator(self) -> QACollator:
        return QACollator(self.tokenizer, self.padding, self.max_length)

    # ---- evaluation and prediction ----------------------------------------------------------------------------

    def _collector(self) -> SpanCollector:
        return SpanCollector(self.qa.n_best_size, self.qa.max_answer_length, self.qa.version_2_with_negative)

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        features, examples = self._eval[split]
        collector = self._collector()
        loss_sum, count = 0.0, 0

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            index = batch.pop("feature_index")
            gold_start, gold_end = batch.pop("start_positions"), batch.pop("end_positions")
            with accelerator.autocast():
                out = model(**batch)
            start, end = out.start_logits.float(), out.end_logits.float()
            # per-feature losses (run_qa's mean of start and end cross-entropy), exact whatever the batch split
            losses = (
                F.cross_entropy(start, gold_start, reduction="none")
                + F.cross_entropy(end, gold_end, reduction="none")
            ) / 2
            return {"index": index, "start": start, "end": end, "loss": losses}

        # processes pad their batches to different lengths; positions past a feature's end are never read
        for out in gathered_outputs(model, loader, accelerator, forward, pad={"start": -1e4, "end": -1e4}):
            loss_sum += out["loss"].sum().item()
            count += out["loss"].numel()
            rows = features[out["index"].tolist()]
            collector.add(
                rows["example_index"], out["start"].cpu(), out["end"].cpu(), rows["offset_mapping"], rows["cls_index"]
            )
        predictions, references = [], []
        for i, (id_, context, answers) in enumerate(
            zip(examples["id"], examples["context"], examples["answers"], strict=True)
        ):
            best = collector.answer(i, context, self.qa.null_score_diff_threshold)
            predictions.append({"id": id_, "prediction_text": best["answer"]})
            references.append({"id": id_, "answers": answers})
        metric = load_metric("squad")
        scores = metric.compute(
            predictions=predictions,
            references=references,
            version_2_with_negative=self.qa.version_2_with_negative,
        )
        scores.pop("total")
        if records is not None:
            v2 = self.qa.version_2_with_negative
            rows = zip(predictions, references, examples["question"], examples["context"], strict=True)
            for p, ref, question, context in rows:
                em, f1, _ = example_scores(p["prediction_text"], ref, v2)
                records.append({
                    "id": ref["id"],
                    "question": question,
                    "context": context,
                    "prediction": p["prediction_text"],
                    "reference": list(ref["answers"]["text"]),
                    "scores": {"exact_match": 100.0 * em, "f1": 100.0 * f1},
                })  # fmt: skip
        return {"eval_loss": loss_sum / max(count, 1), **scores}

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]:
        c = self.columns
        for i, row in enumerate(rows):
            for col in (c.question, c.context):
                if not isinstance(row.get(col), str) or not row[col].strip():
                    raise InputError(f"input row {i}: missing or empty field {col!r}")
        batch = {
            "question": [r[c.question] for r in rows],
            "context": [r[c.context] for r in rows],
            "answers": [{"text": [], "answer_start": []}] * len(rows),
            "index": list(range(len(rows))),
            "id": [str(r.get(c.id, i)) for i, r in enumerate(rows)],
        }
        feats = self.features(batch, keep_offsets=True)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in feats]
        inputs = [{k: feats[k][i] for k in keys} for i in range(len(feats["input_ids"]))]
        collector = self._collector()

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = model(**batch)
            return {"start": out.start_logits.float().cpu(), "end": out.end_logits.float().cpu()}

        for chunk, out in batched_rows(model, inputs, self.collator(), self.recipe.training.eval_batch, forward):
            collector.add(
                [feats["example_index"][i] for i in chunk],
                out["start"],
                out["end"],
                [feats["offset_mapping"][i] for i in chunk],
                [feats["cls_index"][i] for i in chunk],
            )
        return [
            collector.answer(i, row[c.context], self.qa.null_score_diff_threshold)
            for i, row in enumerate(rows)
        ]
