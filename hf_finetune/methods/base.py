"""The shape every method has: one `Method` object per file under `hf_finetune/methods/`, listed in `registry.py`.

A method knows how to make a loaded model trainable and nothing about tasks: what it needs of the task comes in a
`TaskInfo` (PEFT's task type, the fresh head modules, the run's optimizer steps). PEFT builds the config wherever it
can; a method writes its own code only where PEFT falls short, and its file says why.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig

# Every attention and dense projection of BERT-style blocks. LoRA paper (Hu et al. 2021, sec. 7.1) adapts only
# W_q/W_v on GPT-3, but on small encoders adapting every linear layer matters more than rank: with r=8 on
# query/value MiniLM reached 0.75 on SST-2, with r=16 on all of them 0.83 (QLoRA, Dettmers et al. 2023, sec. 4 makes
# the same finding at scale).
ALL_LINEAR = "all-linear"
# Linear warm-up over the first 10% of optimizer steps (BERT, Devlin et al. 2019) unless a method says otherwise:
# short LoRA runs need it (SST-2/MiniLM, 4,000 examples, seeds 42/1/2: 10% 0.810/0.806/0.819, 6% 0.794/0.803/0.829).
DEFAULT_WARMUP_RATIO = 0.1


@dataclass(frozen=True)
class TaskInfo:
    """What a method needs to know of the task it serves."""

    peft_task_type: str | None
    """PEFT's TaskType name (SEQ_CLS, CAUSAL_LM, ...); None where PEFT has none (masked LM)."""
    head_modules: tuple[str, ...] = ()
    """Freshly initialised (or never task-trained) modules, trained in full with every method."""
    total_steps: int = 1
    """The run's optimizer steps (AdaLoRA's schedule is given in steps)."""
    new_token_ids: tuple[int, ...] = ()
    """Tokens the task added to the vocabulary (a chat template's), whose embedding rows must train."""


def peft_common(task: TaskInfo, heads: list[str]) -> dict[str, Any]:
    """The arguments every PEFT config takes from the task: its task type and the heads trained in full."""
    return {"task_type": task.peft_task_type, "modules_to_save": heads or None}


class Method:
    """A fine-tuning method. Subclasses set `name` and `defaults` and override what differs from plain PEFT."""

    name: str = ""
    defaults: dict[str, Any] = {}
    """Hyperparameters the recipe leaves unset; `lr` is the peak learning rate. Each file cites its sources."""
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    mergeable: bool = False
    """`hf-finetune merge` can fold the trained update into the base weights."""
    adds_virtual_tokens: bool = False
    """The method puts learned tokens in front of the input at run time (prompt learning): nothing to merge."""
    saves_whole_model: bool = False
    """The final model folder is a whole model, not an adapter over a base model."""
    adds_loss_term: bool = False
    """The wrapped model adds a term of its own to the task loss (AdaLoRA's orthogonality penalty)."""
    trains_new_tokens: bool = False
    """The method can train the embedding rows of tokens a task adds (PEFT's `trainable_token_indices`)."""
    no_gradient_checkpointing: str | None = None
    """Why the method cannot train with `training.gradient_checkpointing` (None: it can)."""
    in_default_comparison: bool = False
    """Part of `hf-finetune compare` when the recipe names no methods."""
    on_step_end: Any = None
    """`on_step_end(model, step)`, called after every optimizer step with the unwrapped model, or None."""
    on_train_end: Any = None
    """`on_train_end(model)`, called once after the last step, before the final evaluation and saving, or None."""

    # ---- configuration ---------------------------------------------------------------------------------------

    def resolve(self, cfg: MethodConfig, total_steps: int) -> MethodConfig:
        """The recipe's method section with every unset field taken from `defaults` (what results.json records)."""
        names = {f.name for f in dataclasses.fields(cfg)}
        unset = {k: v for k, v in self.resolved_defaults(total_steps).items() if k in names and getattr(cfg, k) is None}
        return dataclasses.replace(cfg, **unset)

    def resolved_defaults(self, total_steps: int) -> dict[str, Any]:
        """`defaults` as they apply to a run of `total_steps` optimizer steps."""
        return dict(self.defaults)

    def check(self, cfg: MethodConfig, total_steps: int) -> list[str]:
        """Problems with the resolved config for a run of `total_steps` steps, each naming its key."""
        return []

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> PeftConfig | None:
        """PEFT's config for the resolved `cfg`, `heads` trained in full; None when PEFT is not involved."""
        return None

    def virtual_positions(self, cfg: MethodConfig, decoder_only: bool, generative: bool) -> int:
        """Positions the method's virtual tokens take in front of the text (counted against the position table)."""
        return 0

    def budget_overrides(self, cfg: MethodConfig) -> list[str]:
        """`compare --budget-matched`: dotted overrides that give this method LoRA's trainable-parameter budget."""
        return []

    # ---- the trainable model ---------------------------------------------------------------------------------

    def heads(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> list[str]:
        """The task's head modules this model has."""
        names = [name for name, _ in model.named_modules()]
        heads = [h for h in task.head_modules if any(n == h or n.endswith(f".{h}") for n in names)]
        if cfg.target_modules == ALL_LINEAR:
            # adapters on every linear layer already reach the pooler; training it in full as well hurt LoRA on
            # SST-2 (0.78 -> 0.72 at lr 2e-3)
            heads = [h for h in heads if not h.startswith("pooler")]
        return heads

    def apply(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> torch.nn.Module:
        """The model to train: `model` wrapped by PEFT with `peft_config`, only the method's parameters trainable."""
        freeze_unsaved(model)
        config = self.peft_config(cfg, task, self.heads(model, cfg, task))
        if config is None:
            return model
        self.fit_config(config, model)
        return get_peft_model(model, config)

    def load_kwargs(self, task: TaskInfo) -> dict[str, Any]:
        """Arguments the method adds to `from_pretrained` when the base weights load (QLoRA: 4-bit quantization)."""
        return {}

    def load_code(self, adapter_config: dict[str, Any]) -> tuple[list[str], str]:
        """For the model card's plain transformers/PEFT loader: lines to run first and the arguments to add to the
        base model's `from_pretrained` (`load_kwargs` written out as code)."""
        return [], ""

    def merge_source(self, model: torch.nn.Module, reload_base: Any, folder: Path) -> torch.nn.Module:
        """The model `merge` folds: by default the loaded one; `reload_base()` loads the base model afresh and
        `folder` holds the saved adapter."""
        return model

    def fit_config(self, config: PeftConfig, model: torch.nn.Module) -> None:
        """Adjust the PEFT config to this model before wrapping (targets PEFT cannot look up itself)."""

    def fingerprint(self, model: torch.nn.Module) -> str:
        """State kept outside the gradients that all processes must agree on (checked at the end of a DDP run)."""
        return ""

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def extra_state(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Tensors and JSON metadata saved with each resumable checkpoint, beside what accelerate saves."""
        return None

    def load_extra_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `extra_state` saved."""

    def save(self, model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """The final model folder's weights (and adapter config)."""
        model.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))

    def saved_weights(self, model: torch.nn.Module, folder: Path) -> tuple[Path, dict[str, torch.Tensor] | None]:
        """The weights file `save` wrote and the tensors it must hold (None: only that it is non-empty)."""
        return folder / SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict(model)

    def load(self, base: torch.nn.Module, folder: Path) -> torch.nn.Module:
        """The trained model from the base model and the folder `save` wrote."""
        return PeftModel.from_pretrained(base, folder)

    def final_trainable(self, model_dir: Path, trainable: int) -> int:
        """Parameters the saved model actually trained, where the method removes some during the run."""
        return trainable


def freeze_unsaved(model: torch.nn.Module) -> list[str]:
    """Freeze the parameters `save_pretrained` leaves out (`_keys_to_ignore_on_save`), which `from_pretrained` rebuilds.

    transformers 5 leaves Marian's sinusoidal position tables trainable (`requires_grad` is True after
    `from_pretrained` despite the module's `_freeze=True`), yet never saves them. Trained, they made the reloaded
    model differ from the evaluated one (Multi30k test BLEU 36.79 in the run, 36.49 after reloading)."""
    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and any(re.search(k, name) for k in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen

