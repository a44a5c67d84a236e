"""The task registry, the recipe's task names and the module files stay in sync; task collators pad as intended."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import hf_finetune.tasks as tasks
from hf_finetune.padding import BucketedPadding, bucket_width
from hf_finetune.recipe import Recipe, TaskName
from hf_finetune.tasks.classification import ClassificationTask


def test_registry_matches_files_and_recipe_literal() -> None:
    files = {p.stem for p in Path(tasks.__file__).parent.glob("*.py") if p.stem != "__init__"}
    modules = {sys.modules[cls.__module__].__file__ and Path(sys.modules[cls.__module__].__file__).stem
               for cls in tasks.TASKS.values()}  # fmt: skip
    assert modules == files, "every task module is registered, and nothing else"
    assert set(tasks.TASK_NAMES) == set(typing.get_args(TaskName))
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(Recipe(task=name))
        assert isinstance(task.higher_is_better, bool) and task.primary_metric
        if name != "masked_lm":  # PEFT has no masked-LM task type
            assert task.peft_task_type
        if name in ("classification", "question_answering"):  # fresh heads; LM and seq2seq heads are pretrained
            assert task.head_modules


def test_help_lists_every_task() -> None:
    from hf_finetune.cli import EPILOG

    listed = EPILOG.splitlines()[0].removeprefix("tasks: ").split(", ")
    assert listed == list(tasks.TASK_NAMES)


@pytest.mark.parametrize(
    ("cuda", "precision", "longest", "width"),
    [(False, "bf16", 5, 5), (False, "bf16", 17, 20), (False, "fp32", 17, 17), (True, "bf16", 5, 8), (True, "fp32", 17, 24)],
)
def test_classification_pads_to_multiples_of_8_on_gpus_and_to_width_buckets_on_cpus_in_bf16(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, cuda: bool, precision: str, longest: int, width: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    recipe = Recipe()
    recipe.training.precision = precision
    collate = ClassificationTask(recipe).collator(tokenizer)
    batch = collate([{"input_ids": list(range(1, longest + 1)), "labels": 0}, {"input_ids": [1, 2], "labels": 1}])
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [longest, 2]
    assert (batch["input_ids"][0, longest:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1]


def test_width_buckets_keep_three_leading_bits() -> None:
    widths = [bucket_width(w) for w in range(1, 1025)]
    assert widths[:16] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16]
    for w, b in enumerate(widths, start=1):
        assert w <= b <= 1.25 * w and bucket_width(b) == b
        assert b >> max(b.bit_length() - 3, 0) << max(b.bit_length() - 3, 0) == b  # only the top three bits set
    assert widths == sorted(widths)
    assert len(set(widths[:128])) == 24 and len(set(widths)) == 36  # 8, then four per doubling


def test_bucketed_padding_stops_at_max_length(tiny_bert: Path) -> None:
    collate = BucketedPadding(AutoTokenizer.from_pretrained(tiny_bert), max_length=18)
    batch = collate([{"input_ids": list(range(1, 18))}, {"input_ids": [1]}])
    assert batch["input_ids"].shape == (2, 18)  # the bucket, 20, capped
