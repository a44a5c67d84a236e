"""What prefix and prompt tuning share: the wrapper base for the models PEFT refuses, and the generation cache fix
for PEFT's own prompt learning under transformers 5."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from hf_finetune.errors import InputError
from hf_finetune.methods.base import Method, TaskInfo


class SoftPromptWrapper(torch.nn.Module):
    """What our prompt-learning wrappers share with PEFT's `PeftModel`: a frozen base model, extra modules trained in
    full (`modules_to_save`: a fresh head), attribute passthrough to the base model, and saving/loading only the
    trainable tensors (safetensors) with a config that refuses a base model of another shape."""

    CONFIG_NAME: str
    WEIGHTS_NAME: str
    CONFIG_CLASS: type
    TRAINABLE: str  # the submodule holding the learned prompt/prefix
    method: str

    def _freeze(self, model: PreTrainedModel, config: Any) -> None:
        self.base_model = model
        self.prefix_config = config
        model.requires_grad_(False)
        self._saved_modules: dict[str, torch.nn.Module] = {}
        for target in config.modules_to_save:
            hits = {n: m for n, m in model.named_modules() if n == target or n.endswith("." + target)}
            if not hits:
                raise InputError(
                    f"{self.method}: modules_to_save entry {target!r} matches no module of {type(model).__name__}"
                )
            self._saved_modules.update(hits)
        # A module inside another saved one is covered by it; saving both would store shared tensors twice.
        saved = self._saved_modules
        self._saved_modules = {
            n: m for n, m in saved.items() if not any(n.startswith(f"{o}.") for o in saved)
        }
        for module in self._saved_modules.values():
            module.requires_grad_(True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet: avoid infinite recursion during __init__
                raise
            return getattr(self.base_model, name)

    @property
    def config(self) -> Any:
        return self.base_model.config

    def get_base_model(self) -> PreTrainedModel:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def _trainable_state(self, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The saved tensors: the learned prompt/prefix and the modules trained in full; read from `full`, the
        gathered state dict of this wrapper, where the parameters themselves are shards (FSDP)."""
        learned = getattr(self, self.TRAINABLE)
        state = {f"{self.TRAINABLE}.{k}": v for k, v in learned.state_dict().items()}
        for name, module in self._saved_modules.items():
            state.update(module.state_dict(prefix=f"modules_to_save.{name}."))
        if full is not None:
            # the wrapper holds the task model as `base_model`: a saved module's tensors sit under its name there
            state = {k: full[k if k.startswith(self.TRAINABLE) else "base_model." + k.split(".", 1)[1]] for k in state}
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {**asdict(self.prefix_config), "base_model_name_or_path": self.base_model.name_or_path}
        meta.update(self.geometry)  # lets from_pretrained refuse a base model of another shape
        (out / self.CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._trainable_state(state_dict).items()}
        save_file(tensors, str(out / self.WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, path: str | os.PathLike) -> SoftPromptWrapper:
        config_file, weights_file = Path(path) / cls.CONFIG_NAME, Path(path) / cls.WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise InputError(f"{f}: not found; was {path} written by {cls.__name__}.save_pretrained?")
        meta = json.loads(config_file.read_text())
        config = cls.CONFIG_CLASS(**{f.name: meta[f.name] for f in fields(cls.CONFIG_CLASS) if f.name in meta})
        wrapped = cls(model, config)
        mismatched = {k: (meta[k], v) for k, v in wrapped.geometry.items() if k in meta and meta[k] != v}
        if mismatched:
            raise InputError(f"{config_file}: saved for another model geometry (saved, given): {mismatched}")
        loaded, expected = load_file(str(weights_file)), wrapped._trainable_state()
        missing, unexpected = sorted(expected.keys() - loaded.keys()), sorted(loaded.keys() - expected.keys())
        reshaped = sorted(k for k, v in loaded.items() if k in expected and v.shape != expected[k].shape)
        if missing or unexpected or reshaped:
            raise InputError(
                f"{weights_file}: missing keys {missing}, unexpected keys {unexpected}, wrong shapes {reshaped}"
            )
        with torch.no_grad():
            for key, value in loaded.items():
                expected[key].copy_(value)  # state_dict tensors share storage with the live parameters
        return wrapped


def fix_generation_cache(model: torch.nn.Module) -> torch.nn.Module:
    """Let PEFT's prompt learning (prefix and prompt tuning) generate with the KV cache on under transformers 5;
    returns `model`, patched in place (once).

    PEFT 0.21 reads and writes the generation cache under the old name `past_key_values`, while transformers 5's
    `prepare_inputs_for_generation` passes it as `cache`. PEFT therefore never sees the cache: it re-injects its
    prompt at every step and hands the prefix over as `past_key_values`, which the model drops in favour of
    generation's own, empty `cache`. Greedy outputs then differ from step-by-step full forward passes. Renaming the
    key on the way into PEFT's hook and back out restores PEFT's intended path; with it, cached and uncached greedy
    generation agree (tests/test_language_modeling.py, tests/test_seq2seq.py)."""
    config = getattr(model, "active_peft_config", None)
    if (
        not getattr(config, "is_prompt_learning", False)
        or not hasattr(model, "base_model_prepare_inputs_for_generation")
        or getattr(model, "_generation_cache_fixed", False)
    ):
        return model
    base_prepare = model.base_model_prepare_inputs_for_generation
    peft_prepare = type(model).prepare_inputs_for_generation

    # the parameter names matter: transformers validates generate's kwargs against this signature's **kwargs
    def base(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = peft_prepare(model, *args, **kwargs)
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.base_model_prepare_inputs_for_generation = base
    model.prepare_inputs_for_generation = prepare
    model._generation_cache_fixed = True
    return model


class VirtualTokenMethod(Method):
    """Prefix and prompt tuning: PEFT's model wherever PEFT serves the model (its generation cache fixed), our
    `wrapper` where PEFT refuses it."""

    adds_virtual_tokens = True
    wrapper: type[SoftPromptWrapper]

    def apply(self, model: torch.nn.Module, cfg: Any, task: TaskInfo) -> torch.nn.Module:
        return fix_generation_cache(super().apply(model, cfg, task))

    def saved_weights(self, model: torch.nn.Module, folder: Path) -> tuple[Path, dict[str, torch.Tensor] | None]:
        if isinstance(model, SoftPromptWrapper):
            return folder / model.WEIGHTS_NAME, model._trainable_state()
        return super().saved_weights(model, folder)

    def load(self, base: torch.nn.Module, folder: Path) -> torch.nn.Module:
        if (folder / self.wrapper.CONFIG_NAME).is_file():
            return self.wrapper.from_pretrained(base, folder)
        return fix_generation_cache(super().load(base, folder))

