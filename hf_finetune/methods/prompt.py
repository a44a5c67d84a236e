"""Prompt tuning (Lester et al. 2021): learned input embeddings in front of every source. PEFT's
`PromptTuningConfig` serves every model it supports; a BERT2BERT `EncoderDecoderModel`, which PEFT 0.21 refuses,
goes through our own `EncoderPromptModel`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft import PromptTuningConfig
from transformers import PreTrainedModel

from hf_finetune.errors import InputError
from hf_finetune.methods.base import TaskInfo, freeze_unsaved, peft_common
from hf_finetune.methods.virtual_tokens import SoftPromptWrapper, VirtualTokenMethod

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig

PROMPT_CONFIG_NAME = "prompt_config.json"
PROMPT_WEIGHTS_NAME = "prompt_model.safetensors"


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise InputError("prompt: num_virtual_tokens must be >= 1")


class EncoderPromptModel(SoftPromptWrapper):
    """Prompt tuning (Lester et al. 2021) for a BERT2BERT `EncoderDecoderModel`, which PEFT 0.21 refuses: P learned
    embeddings in front of every source, seen by the encoder (and so by cross-attention) like real tokens, as PEFT
    does for T5 and BART. They start from the embeddings of P vocabulary tokens drawn at random, the paper's
    "sampled vocab" initialisation, which trains better than random vectors."""

    CONFIG_NAME, WEIGHTS_NAME, TRAINABLE, method = PROMPT_CONFIG_NAME, PROMPT_WEIGHTS_NAME, "prompt_embeddings", "prompt"
    CONFIG_CLASS = PromptConfig

    def __init__(self, model: PreTrainedModel, config: PromptConfig) -> None:
        super().__init__()
        if not getattr(model.config, "is_encoder_decoder", False):
            raise InputError(f"prompt: {type(model).__name__} is not encoder-decoder; use PEFT's prompt tuning")
        embeddings = model.get_input_embeddings()
        self.geometry = {"hidden_size": embeddings.embedding_dim}
        self._freeze(model, config)
        rows = torch.randint(0, embeddings.num_embeddings, (config.num_virtual_tokens,))
        self.prompt_embeddings = torch.nn.Embedding(config.num_virtual_tokens, embeddings.embedding_dim)
        with torch.no_grad():
            self.prompt_embeddings.weight.copy_(embeddings.weight[rows.to(embeddings.weight.device)])
        self.prompt_embeddings.to(embeddings.weight.device)
        self.train(model.training)

    def _with_prompt(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        rows, length = inputs_embeds.shape[:2]
        prompt = self.prompt_embeddings.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones(rows, length, dtype=torch.long, device=inputs_embeds.device)
        visible = attention_mask.new_ones(rows, prompt.shape[1])
        return {
            "inputs_embeds": torch.cat([prompt, inputs_embeds], dim=1),
            "attention_mask": torch.cat([visible, attention_mask], dim=1),
        }

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if kwargs.get("encoder_outputs") is not None:  # the encoder already ran with the prompt
            return self.base_model(attention_mask=attention_mask, **kwargs)
        return self.base_model(**self._with_prompt(input_ids, attention_mask, inputs_embeds), **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.base_model.generate(**self._with_prompt(input_ids, attention_mask, inputs_embeds), **kwargs)


class PromptTuning(VirtualTokenMethod):
    name = "prompt"
    # Lester et al. 2021 train input embeddings only and need a large step (0.3 with Adafactor there); 3e-2 with AdamW.
    defaults = {"lr": 3e-2, "num_virtual_tokens": 20}
    wrapper = EncoderPromptModel

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> PromptTuningConfig:
        return PromptTuningConfig(
            **peft_common(task, heads), num_virtual_tokens=cfg.num_virtual_tokens
        )

    def apply(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> torch.nn.Module:
        if model.config.model_type != "encoder-decoder":
            return score_text_positions(super().apply(model, cfg, task))
        # PEFT 0.21 refuses prompt tuning on a BERT2BERT EncoderDecoderModel as it does prefix tuning
        freeze_unsaved(model)
        config = PromptConfig(cfg.num_virtual_tokens, modules_to_save=self.heads(model, cfg, task))
        return EncoderPromptModel(model, config)

    def load(self, base: torch.nn.Module, folder: Any) -> torch.nn.Module:
        return score_text_positions(super().load(base, folder))

    def virtual_positions(self, cfg: MethodConfig, decoder_only: bool, generative: bool) -> int:
        return self.resolve(cfg, total_steps=1).num_virtual_tokens  # soft tokens take positions before the text


def score_text_positions(model: torch.nn.Module) -> torch.nn.Module:
    """Token classification under PEFT's prompt tuning: logits and loss for the text's positions only.

    PEFT 0.21's `PeftModelForTokenClassification` puts the prompt's positions in front of the logits and hands the
    labels to the model unextended, so its loss fails on a shape mismatch. Hooks (which survive accelerate's and
    torch.compile's forward wrappers) take the labels out before the call, drop the prompt's positions from the
    logits after it, and compute the head's own loss (cross-entropy ignoring -100) on what is left."""
    config = getattr(model, "active_peft_config", None)
    if str(getattr(config, "task_type", "")) not in ("TOKEN_CLS", "TaskType.TOKEN_CLS"):
        return model
    virtual = config.num_virtual_tokens

    def take_labels(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        module._text_labels = kwargs.pop("labels", None)
        return args, kwargs

    def score(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        output.logits = output.logits[:, virtual:]
        labels, module._text_labels = module._text_labels, None
        if labels is not None:
            logits = output.logits
            output.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return output

    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    model.register_forward_hook(score, with_kwargs=True)
    return model


METHOD = PromptTuning()
