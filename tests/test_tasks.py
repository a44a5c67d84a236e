"""The task registry, the recipe's task names and the module files stay in sync."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import hf_finetune.tasks as tasks
from hf_finetune.recipe import Recipe, TaskName


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
