"""The task registry, the recipe's task names and the module files stay in sync."""

from __future__ import annotations

import typing
from pathlib import Path

import hf_finetune.tasks as tasks
from hf_finetune.recipe import Recipe, TaskName


def test_registry_matches_files_and_recipe_literal() -> None:
    files = {p.stem for p in Path(tasks.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert set(tasks.TASK_NAMES) == files == set(typing.get_args(TaskName))
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(Recipe(task=name))
        assert task.peft_task_type and task.head_modules


def test_help_lists_every_task() -> None:
    from hf_finetune.cli import EPILOG

    listed = EPILOG.splitlines()[0].removeprefix("tasks: ").split(", ")
    assert listed == list(tasks.TASK_NAMES)
