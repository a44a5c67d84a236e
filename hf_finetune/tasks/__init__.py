"""Tasks: one module per task family, each task one object of the `Task` protocol (`tasks/base.py`).

Everything that lists tasks derives from `TASKS`: the recipe's allowed `task` values and the CLI help.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_finetune.device import Padding
from hf_finetune.tasks.base import PositionBudget, Task
from hf_finetune.tasks.chat import ChatTask
from hf_finetune.tasks.classification import ClassificationTask
from hf_finetune.tasks.language_modeling import LanguageModelingTask, MaskedLanguageModelingTask
from hf_finetune.tasks.question_answering import QuestionAnsweringTask
from hf_finetune.tasks.seq2seq import SummarizationTask, TranslationTask
from hf_finetune.tasks.token_classification import TokenClassificationTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hf_finetune.recipe import Recipe

# keys equal each task's `name`, the recipe's `task` values; a test keeps them in sync
TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "token_classification": TokenClassificationTask,
    "question_answering": QuestionAnsweringTask,
    "causal_lm": LanguageModelingTask,
    "masked_lm": MaskedLanguageModelingTask,
    "translation": TranslationTask,
    "summarization": SummarizationTask,
    "chat": ChatTask,
}
TASK_NAMES = tuple(TASKS)
DEFAULT_TASK = ClassificationTask.name
"""The task a recipe gets when it names none."""

__all__ = ["DEFAULT_TASK", "TASKS", "TASK_NAMES", "PositionBudget", "Task", "get_task"]


def get_task(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase | None = None, padding: Padding | None = None
) -> Task:
    """The recipe's task; with `tokenizer`, set up for it (padding: the rule for this process's device)."""
    task = TASKS[recipe.task](recipe)
    if tokenizer is not None:
        if padding is None:
            from hf_finetune.device import padding_for_recipe

            padding = padding_for_recipe(recipe.training.precision, recipe.training.cpu_tuning)
        task.setup(tokenizer, padding)
    return task
