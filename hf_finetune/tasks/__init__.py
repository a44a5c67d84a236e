"""Tasks: one module per task, all implementing the same small `Task` protocol."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from accelerate import Accelerator
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_finetune.recipe import Recipe
from hf_finetune.tasks.classification import ClassificationTask
from hf_finetune.tasks.language_modeling import LanguageModelingTask, MaskedLanguageModelingTask
from hf_finetune.tasks.question_answering import QuestionAnsweringTask
from hf_finetune.tasks.seq2seq import SummarizationTask, TranslationTask


class Task(Protocol):
    peft_task_type: str | None
    """PEFT's TaskType name for this task's models (e.g. SEQ_CLS); None where PEFT has none (masked LM)."""
    head_modules: tuple[str, ...]
    """Names of freshly initialised head modules that train with every method."""
    default_max_length: int
    """Token limit when the recipe leaves `training.max_length` unset."""
    primary_metric: str
    """The validation metric that ranks runs, e.g. in `hf-finetune compare`."""
    higher_is_better: bool
    """Whether a larger `primary_metric` is better (accuracy, F1) or worse (perplexity)."""

    def __init__(self, recipe: Recipe) -> None: ...

    def prepare(self, raw: DatasetDict) -> None:
        """Check columns and labels of every split, before any weights are loaded."""

    def load_model(self, path: str) -> PreTrainedModel: ...

    def preprocess(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        """Tokenised splits, each with a `length` column used for length-grouped batching."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any: ...

    def evaluate(
        self, model: torch.nn.Module, loader: Any, accelerator: Accelerator, split: str = "validation"
    ) -> dict[str, float]:
        """Task metrics plus `eval_loss` on `split` (as preprocessed), each example counted once across processes."""

    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict]
    ) -> list[dict]: ...

    def checkpoint_info(self) -> dict[str, Any]:
        """What a saved checkpoint needs besides weights to rebuild this task (e.g. the label set)."""

    def restore(self, info: dict[str, Any]) -> None: ...


# keys equal the recipe's `task` values; a test keeps them in sync
TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "question_answering": QuestionAnsweringTask,
    "causal_lm": LanguageModelingTask,
    "masked_lm": MaskedLanguageModelingTask,
    "translation": TranslationTask,
    "summarization": SummarizationTask,
}
TASK_NAMES = tuple(TASKS)


def get_task(recipe: Recipe) -> Task:
    return TASKS[recipe.task](recipe)
