"""The shape every task has: one object per file under `hf_finetune/tasks/`, listed in `tasks/__init__.py`.

A task knows its data, its model head and its metrics, nothing about the loop or the method. Everything the engine,
the recipe checks and `compare` need is declared here; `engine.py` and `recipe.py` never name a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_finetune.device import Padding
from hf_finetune.significance import scores_or_losses

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe


@dataclass
class PositionBudget:
    """What a task puts into one sequence of the model: `text` tokens (the recipe key that sets them) and whatever
    else takes positions beside them (a decoder-only model's target), by name."""

    key: str
    text: int
    extra: dict[str, int] = field(default_factory=dict)
    capped: bool = True
    """The collator never pads a batch past `text` plus `extra` (else padding takes positions of its own)."""


class Task(Protocol):
    name: ClassVar[str]
    metrics: dict[str, bool]
    """Every validation metric `evaluate` returns, each mapped to whether higher is better (`eval_loss` included).
    The class lists every metric the task can return (what the recipe check accepts for `training.best_metric`); an
    instance whose data decides its problem type (classification: single-label, multi-label or regression) narrows
    it in `prepare`."""
    primary_metric: str
    """The validation metric that ranks runs, e.g. in `hf-finetune compare`; results.json records the run's own."""
    default_max_length: ClassVar[int]
    """Token limit when the recipe leaves `training.max_length` unset."""
    token_level: ClassVar[bool]
    """The loss is a mean over tokens (so label smoothing applies), not over examples."""
    chunked_head: ClassVar[bool]
    """The vocabulary-sized output head is applied apart from the body, only at scored tokens and in pieces, in
    training and evaluation (`losses.token_nll`): peak memory stays flat in vocabulary x tokens."""
    generative: ClassVar[bool]
    """The model writes text (a decoder's positions follow any virtual tokens)."""
    peft_task_type: str | None
    """PEFT's TaskType name for this task's models (e.g. SEQ_CLS); None where PEFT has none (masked LM)."""
    head_modules: tuple[str, ...]
    """Names of freshly initialised head modules that train with every method."""
    shift_labels: bool
    """Logits at position t are scored against the label at t + 1 (causal decoders), not at t."""
    streams: ClassVar[bool]
    """The task can read its training split as a stream (`data.train.streaming`)."""
    pipeline_tag: ClassVar[str]
    """The Hugging Face Hub's pipeline tag for this task's models (the model card's `pipeline_tag`)."""
    group_by_length: ClassVar[bool]
    """Default of `training.group_by_length` for this task."""
    new_token_ids: tuple[int, ...]
    """Tokens `setup` added to the tokenizer (a chat template's), whose embedding rows must train."""
    auto_class: str
    """The transformers Auto class that loads this task's saved models (e.g. AutoModelForSequenceClassification)."""

    def __init__(self, recipe: Recipe) -> None: ...

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        """Problems with this task's recipe sections (each naming its key), found before anything loads."""

    @classmethod
    def higher_is_better(cls, metric: str | None = None) -> bool:
        """Whether a larger value of `metric` (default: the primary one) is better."""

    def setup(self, tokenizer: PreTrainedTokenizerBase, padding: Padding) -> None:
        """The run's tokenizer and padding rule, before `preprocess`, `collator`, `evaluate` or `predict`."""

    def prepare(self, raw: DatasetDict) -> None:
        """Check columns and labels of every split, before any weights are loaded."""

    def tokenizer_corpus(self, raw: DatasetDict) -> Any:
        """The texts a from-scratch tokenizer trains on, or None when this task cannot provide them."""

    def load_model(self, path: str) -> PreTrainedModel: ...

    def position_budget(self, config: Any) -> PositionBudget:
        """The positions one sequence takes in a model with this config."""

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        """Tokenised splits, each with a `length` column used for length-grouped batching."""

    def collator(self) -> Any: ...

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        """Task metrics plus `eval_loss` on `split` (as preprocessed), each example counted once across processes.

        With `records`, also appends one row per example of the split, in its order: `id`, the input fields a person
        needs to read it, `prediction`, `reference`, and under `scores` the per-example values whose mean over the
        split is the metric of the same name (where the metric is such a mean)."""

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]: ...

    def card_notes(self) -> list[str]:
        """Lines the model card's Training section adds for this task (what a user of the folder must know)."""

    @classmethod
    def resampled(cls, rows: list[dict], metric: str) -> Any:
        """`metric` recomputed on resamples of a split's saved prediction rows (`significance.Resampled`), for the
        paired bootstrap of `compare`; None where the rows cannot give it (a corpus-level score such as BLEU)."""

    def checkpoint_info(self) -> dict[str, Any]:
        """What a saved checkpoint needs besides weights to rebuild this task (e.g. the label set)."""

    def restore(self, info: dict[str, Any]) -> None: ...


class TaskBase:
    """Defaults every task shares; a task overrides what differs."""

    name: ClassVar[str] = ""
    metrics: ClassVar[dict[str, bool]] = {"eval_loss": False}
    primary_metric: ClassVar[str] = "eval_loss"
    default_max_length: ClassVar[int] = 128
    token_level: ClassVar[bool] = False
    chunked_head: ClassVar[bool] = False
    generative: ClassVar[bool] = False
    peft_task_type: str | None = None
    head_modules: tuple[str, ...] = ()
    shift_labels: bool = False
    streams: ClassVar[bool] = False
    pipeline_tag: ClassVar[str] = ""
    auto_class: str = "AutoModel"
    group_by_length: ClassVar[bool] = True
    new_token_ids: tuple[int, ...] = ()

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.padding = Padding()
        self.model_kwargs: dict[str, Any] = {}
        """What the method asks of loading the weights (QLoRA: 4-bit quantization), set before `load_model`."""

    def pretrained(self, auto: Any, path: str, **kwargs: Any) -> Any:
        """`auto.from_pretrained(path)` with the recipe's revision and trust_remote_code, pickle-free weights only,
        and the method's loading arguments."""
        m = self.recipe.model
        return auto.from_pretrained(
            path, revision=m.revision, trust_remote_code=m.trust_remote_code, use_safetensors=True,
            **self.model_kwargs, **kwargs,
        )  # fmt: skip

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        return []

    @classmethod
    def higher_is_better(cls, metric: str | None = None) -> bool:
        """Whether a larger value of `metric` (default: the primary one) is better."""
        return cls.metrics[metric or cls.primary_metric]

    @property
    def max_length(self) -> int:
        return self.recipe.training.max_length or self.default_max_length

    def setup(self, tokenizer: PreTrainedTokenizerBase, padding: Padding) -> None:
        self.tokenizer, self.padding = tokenizer, padding

    def tokenizer_corpus(self, raw: DatasetDict) -> Any:
        return None

    def position_budget(self, config: Any) -> PositionBudget:
        return PositionBudget("training.max_length", self.max_length)

    def card_notes(self) -> list[str]:
        return []

    @classmethod
    def resampled(cls, rows: list[dict], metric: str) -> Any:
        return scores_or_losses(rows, metric)

    def checkpoint_info(self) -> dict[str, Any]:
        return {}

    def restore(self, info: dict[str, Any]) -> None:
        pass


def example_ids(ds: Dataset) -> list[Any]:
    """The split's own example ids (an `id`, `idx` or `guid` column, as GLUE and SQuAD name them), else row numbers."""
    for column in ("id", "idx", "guid"):
        if column in ds.column_names:
            return list(ds[column])
    return list(range(len(ds)))


def positive(values: dict[str, int | None]) -> list[str]:
    """The recipe-check message for every key whose value is set and not a positive integer."""
    return [f"'{key}': must be a positive integer, got {v}" for key, v in values.items() if v is not None and v <= 0]
