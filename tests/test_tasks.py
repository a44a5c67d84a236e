"""The task registry, the recipe's task names and the module files stay in sync; task collators pad as intended."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import hf_finetune.tasks as tasks
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


@pytest.mark.parametrize(("cuda", "width"), [(False, 5), (True, 8)])
def test_classification_pads_to_multiples_of_8_on_gpus_only(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, cuda: bool, width: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    collate = ClassificationTask(Recipe()).collator(AutoTokenizer.from_pretrained(tiny_bert))
    batch = collate([{"input_ids": [1, 2, 3, 4, 5], "labels": 0}, {"input_ids": [1, 2], "labels": 1}])
    assert batch["input_ids"].shape == (2, width)
