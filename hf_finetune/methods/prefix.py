"""Prefix tuning (Li & Liang 2021) for models PEFT's own prefix tuning refuses: encoders, task heads and BERT2BERT;
and prompt tuning (Lester et al. 2021) for BERT2BERT.

PEFT 0.21 raises "Model does not support past key values" for BERT-style encoders and every
`*ForSequenceClassification` under transformers 5. Their attention layers still call `cache.update(k, v, layer)`
on a `cache=` argument, so handing them a `DynamicCache` pre-filled with the learned prefix keys/values puts the
prefix in front of the real keys/values in every layer; the 2-D attention mask is widened to cover it.

A BERT2BERT `EncoderDecoderModel` is refused by PEFT too ("Please specify `num_layers`", then the encoder limit
above), and a pre-filled cache cannot carry its prefix through `generate` (generation would take the prefix for
already decoded tokens). There the prefix enters through transformers' attention interface instead: every encoder
self-, decoder self- and cross-attention module gets its own learned keys/values (Li & Liang's placement), prepended
inside the attention function at each call, so the KV cache, beam search and positions are untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from hf_finetune.errors import InputError

PREFIX_CONFIG_NAME = "prefix_config.json"
PREFIX_WEIGHTS_NAME = "prefix_model.safetensors"
PROMPT_CONFIG_NAME = "prompt_config.json"
PROMPT_WEIGHTS_NAME = "prompt_model.safetensors"


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = True  # MLP reparameterisation: training the raw prefix directly is unstable
    encoder_hidden_size: int = 512
    # e.g. ["classifier"]: a freshly initialised head has to train alongside the prefix
    modules_to_save: list[str] = field(default_factory=list)
    prefix_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1 or self.encoder_hidden_size < 1:
            raise InputError("prefix: num_virtual_tokens and encoder_hidden_size must be >= 1")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise InputError(f"prefix: prefix_dropout must be in [0, 1), got {self.prefix_dropout}")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise InputError("prompt: num_virtual_tokens must be >= 1")


def _class_names(mapping: Any) -> set[str]:
    return {n for value in mapping.values() for n in ([value] if isinstance(value, str) else value)}


def supports_native_prefix(model: PreTrainedModel) -> bool:
    """True when PEFT's own prefix tuning handles `model`: encoder-decoder LMs and cache-capable causal LMs."""
    name, config = type(model).__name__, model.config
    if config.model_type == "encoder-decoder":  # BERT2BERT: PEFT asks for `num_layers`, then meets the encoder
        return False
    if name in _class_names(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) or name.endswith("ForSeq2SeqLM"):
        return bool(getattr(config, "is_encoder_decoder", False))
    if name in _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or name.endswith("ForCausalLM"):
        supports_cache = getattr(type(model), "_supports_default_dynamic_cache", lambda: False)()
        return supports_cache and not getattr(model, "_is_stateful", False) and not config.is_encoder_decoder
    return False


PREFIX_ATTENTION = "hf_finetune_prefix"
# While a prefix-tuned encoder-decoder runs: its prefix, (attention modules * 2, 1, heads, P, head_dim), and the
# slots that attended to it; else None.
_ACTIVE_PREFIX: contextvars.ContextVar[tuple[torch.Tensor, set[int]] | None] = contextvars.ContextVar(
    "prefix_kv", default=None
)
_SLOT = "_hf_finetune_prefix_slot"


def _prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA attention with the active prefix's keys/values for `module` in front of its own."""
    active, slot = _ACTIVE_PREFIX.get(), getattr(module, _SLOT, None)
    if active is None or slot is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kv, hits = active
    hits.add(slot)
    rows, prefix = key.shape[0], kv.shape[3]
    # one prefix for all rows: beam search and batching only change the query's batch size
    key = torch.cat([kv[2 * slot].to(key.dtype).expand(rows, -1, -1, -1), key], dim=2)
    value = torch.cat([kv[2 * slot + 1].to(value.dtype).expand(rows, -1, -1, -1), value], dim=2)
    q_len, kv_len = query.shape[2], key.shape[2] - prefix
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if attention_mask is None and causal and q_len > 1:
        # no padding, so transformers left causality to SDPA's is_causal, which cannot offset for the prefix
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(kv_len - q_len)[None, None]
    if attention_mask is not None:  # every query sees the whole prefix
        fill = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
        visible = fill(*attention_mask.shape[:-1], prefix, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)
# the masks are SDPA's own; only the attention function widens them
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def _attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """BERT-style attention cores (self and cross) that call transformers' attention interface."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "attention_head_size")
        and isinstance(getattr(m, "key", None), torch.nn.Linear)
    ]  # fmt: skip


def _geometry(config: Any) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers, heads, hidden = text.num_hidden_layers, text.num_attention_heads, text.hidden_size
    except AttributeError as e:
        raise InputError(f"prefix: cannot read layers/heads of {type(config).__name__}: {e}") from e
    # GQA models cache fewer key/value heads than query heads, and some set head_dim != hidden / heads.
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {"num_layers": layers, "num_key_value_heads": kv_heads, "head_dim": head_dim}


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

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        learned = getattr(self, self.TRAINABLE)
        state = {f"{self.TRAINABLE}.{k}": v for k, v in learned.state_dict().items()}
        for name, module in self._saved_modules.items():
            state.update(module.state_dict(prefix=f"modules_to_save.{name}."))
        return state

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {**asdict(self.prefix_config), "base_model_name_or_path": self.base_model.name_or_path}
        meta.update(self.geometry)  # lets from_pretrained refuse a base model of another shape
        (out / self.CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._trainable_state().items()}
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


class PrefixTuningModel(SoftPromptWrapper):
    CONFIG_NAME, WEIGHTS_NAME, TRAINABLE, method = PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME, "prefix_encoder", "prefix"
    CONFIG_CLASS = PrefixConfig

    def __init__(self, model: PreTrainedModel, config: PrefixConfig) -> None:
        super().__init__()
        name = type(model).__name__
        # encoder-decoder: the prefix goes through the attention interface (see the module docstring)
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.encoder_decoder:
            self._attention = tuple(_attention_modules(model))  # a tuple: not registered as submodules twice
            if not self._attention:
                raise InputError(f"prefix: {name}'s attention layers are not BERT-style; use PEFT's prefix tuning")
            shapes = {(m.num_attention_heads, m.attention_head_size) for m in self._attention}
            if len(shapes) > 1:
                raise InputError(f"prefix: {name} mixes attention shapes {sorted(shapes)}")
            (heads, head_dim), = shapes
            self.geometry = {"num_layers": len(self._attention), "num_key_value_heads": heads, "head_dim": head_dim}
            for slot, module in enumerate(self._attention):
                setattr(module, _SLOT, slot)
                module.config._attn_implementation = PREFIX_ATTENTION
        # Backbones without a cache argument (DistilBERT, DeBERTa-v2, ModernBERT) have nowhere to put the prefix.
        elif "cache" not in inspect.signature(model.base_model.forward).parameters:
            raise InputError(f"prefix: {name} takes no key/value cache, so prefix tuning cannot work on it")
        else:
            self.geometry = _geometry(model.config)
        self._freeze(model, config)
        g = self.geometry
        # PEFT's PrefixEncoder is exactly the embedding(+MLP) we need: (B, P) -> (B, P, layers * 2 * kv_dim).
        self.prefix_encoder = PrefixEncoder(
            PrefixTuningConfig(
                num_virtual_tokens=config.num_virtual_tokens,
                token_dim=g["num_key_value_heads"] * g["head_dim"],
                num_layers=g["num_layers"],
                num_attention_heads=g["num_key_value_heads"],
                encoder_hidden_size=config.encoder_hidden_size,
                prefix_projection=config.prefix_projection,
                inference_mode=False,
            )
        )
        self.prefix_dropout = torch.nn.Dropout(config.prefix_dropout)
        param = next(model.parameters(), None)
        if param is not None:
            self.prefix_encoder.to(param.device)
        # RoBERTa-style embeddings number positions from padding_idx + 1 skipping pads, not from 0.
        # A tuple, so the embeddings module is not registered (and saved) a second time under this wrapper.
        self._roberta_positions = tuple(
            m
            for m in model.modules()
            if hasattr(m, "create_position_ids_from_input_ids") and hasattr(m, "padding_idx")
        )[:1]
        self.train(model.training)

    def _prefix_kv(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(layers * 2, 1, kv_heads, P, head_dim), PEFT's layout: layer i's keys at 2i, its values at 2i + 1.
        One prefix for the whole batch, expanded rather than recomputed per row."""
        g, p = self.geometry, self.prefix_config.num_virtual_tokens
        tokens = torch.arange(p, device=self.prefix_encoder.embedding.weight.device).unsqueeze(0)
        kv = self.prefix_encoder(tokens)
        kv = kv.view(1, p, g["num_layers"] * 2, g["num_key_value_heads"], g["head_dim"])
        kv = kv.permute(2, 0, 3, 1, 4)
        return kv if dtype is None else kv.to(dtype)

    def _cache(self, batch_size: int, dtype: torch.dtype) -> DynamicCache:
        g = self.geometry
        kv = self.prefix_dropout(self._prefix_kv(dtype).expand(-1, batch_size, -1, -1, -1))
        cache = DynamicCache(config=self.base_model.config)
        for layer in range(g["num_layers"]):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    def _build_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The base model's kwargs: the prefix cache, the widened mask and explicit positions."""
        if "cache" in kwargs or "past_key_values" in kwargs:
            raise ValueError("PrefixTuningModel builds the key/value cache itself; do not pass one")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length, device = ref.shape[0], ref.shape[1], ref.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if attention_mask.dim() != 2:
            raise ValueError("prefix tuning needs a 2-D attention_mask (batch, seq_len) so it can be widened")
        prefix_mask = attention_mask.new_ones(batch, self.prefix_config.num_virtual_tokens)
        if position_ids is None:
            # Without explicit positions the model starts counting after the cached prefix.
            emb = self._roberta_positions[0] if self._roberta_positions else None
            if emb is not None and input_ids is not None:
                position_ids = emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx)
            elif emb is not None:
                position_ids = emb.create_position_ids_from_inputs_embeds(inputs_embeds, emb.padding_idx)
            else:
                position_ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            floats = (p.dtype for p in self.base_model.parameters() if p.is_floating_point())
            dtype = next(floats, torch.float32)
        inputs = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "token_type_ids": token_type_ids,
            "attention_mask": torch.cat([prefix_mask, attention_mask], dim=1),
            "position_ids": position_ids,
            "cache": self._cache(batch, dtype),
            **kwargs,
        }
        # Heads without token_type_ids (or whatever the caller left None) must not receive the key at all.
        return {k: v for k, v in inputs.items() if v is not None}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.encoder_decoder:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                     "position_ids": position_ids, "labels": labels, "inputs_embeds": inputs_embeds}  # fmt: skip
            hits: set[int] = set()
            with self._prefix_active(hits):
                outputs = self.base_model(**{k: v for k, v in given.items() if v is not None}, **kwargs)
            # a model whose attention bypassed the interface would train a prefix that is never attended to
            if "encoder_outputs" not in kwargs and len(hits) < self.geometry["num_layers"]:
                raise InputError(f"prefix: {type(self.base_model).__name__} bypassed the prefix in some layers")
            return outputs
        if self.training and getattr(self.base_model, "is_gradient_checkpointing", False):
            # Checkpointed layers are called with cache=None, which would silently drop the prefix.
            raise InputError("prefix tuning cannot be combined with gradient checkpointing")
        inputs = self._build_inputs(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs
        )
        if labels is not None:
            inputs["labels"] = labels
        cache, prefix_len = inputs["cache"], self.prefix_config.num_virtual_tokens
        outputs = self.base_model(**inputs)
        # A model that accepts `cache` but never updates it would train a prefix that is never attended to.
        if cache.get_seq_length(0) == prefix_len:
            raise InputError(f"prefix: {type(self.base_model).__name__} ignored the prefix key/value cache")
        return outputs

    @contextlib.contextmanager
    def _prefix_active(self, hits: set[int] | None = None) -> Iterator[None]:
        # dropout here is drawn once for the batch (the prefix is expanded to the rows inside attention)
        kv = self.prefix_dropout(self._prefix_kv())
        token = _ACTIVE_PREFIX.set((kv, hits if hits is not None else set()))
        try:
            yield
        finally:
            _ACTIVE_PREFIX.reset(token)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base model's `generate`, every step attending to the prefix (encoder-decoder models)."""
        if not self.encoder_decoder:
            raise InputError(f"prefix: generation with {type(self.base_model).__name__} is not supported")
        with self._prefix_active():
            return self.base_model.generate(*args, **kwargs)


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


def saved_wrapper(folder: Path) -> type[SoftPromptWrapper] | None:
    """The wrapper class whose config file `folder` holds, if any."""
    return next((w for w in (PrefixTuningModel, EncoderPromptModel) if (folder / w.CONFIG_NAME).exists()), None)


@contextlib.contextmanager
def peft_generation_cache(model: torch.nn.Module) -> Iterator[None]:
    """Let PEFT's prompt learning (prefix and prompt tuning) generate with the KV cache on under transformers 5.

    PEFT 0.21 reads and writes the generation cache under the old name `past_key_values`, while transformers 5's
    `prepare_inputs_for_generation` passes it as `cache`. PEFT therefore never sees the cache: it re-injects its
    prompt at every step and hands the prefix over as `past_key_values`, which the model drops in favour of
    generation's own, empty `cache`. Greedy outputs then differ from step-by-step full forward passes. Renaming the
    key on the way into PEFT's hook and back out restores PEFT's intended path; with it, cached and uncached greedy
    generation agree (tests/test_language_modeling.py)."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False) or not hasattr(
        model, "base_model_prepare_inputs_for_generation"
    ):
        yield
        return
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
    try:
        yield
    finally:
        model.base_model_prepare_inputs_for_generation = base_prepare
        del model.prepare_inputs_for_generation
