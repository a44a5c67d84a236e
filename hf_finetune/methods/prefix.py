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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from hf_finetune.errors import InputError
from hf_finetune.methods.base import TaskInfo, freeze_unsaved, peft_common
from hf_finetune.methods.virtual_tokens import SoftPromptWrapper, VirtualTokenMethod

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig

PREFIX_CONFIG_NAME = "prefix_config.json"
PREFIX_WEIGHTS_NAME = "prefix_model.safetensors"


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


class PrefixTuning(VirtualTokenMethod):
    name = "prefix"
    # Li & Liang 2021: 20 virtual tokens, MLP reparameterisation with a 512-wide hidden layer. P-Tuning v2's lr
    # 5e-3..1e-2 (Liu et al. 2022) is for the raw prefix (prefix_projection off; 0.77 here at 5e-3); the MLP needs a
    # much smaller step (Li & Liang use 5e-5..8e-5 with it): Adam moves each of the 512 hidden units' output weights by
    # ~lr at once, so at 5e-3 the prefix keys/values grew from std 0.27 to 2.5 within 50 steps (MiniLM's own keys ~1.4,
    # values ~0.5), the input-independent prefix values swamped every attention output and SST-2 stayed at chance
    # (0.51, loss ~0.69). At 5e-4 they stay at ~0.5: 0.79/0.80/0.78 over seeds 42/1/2 (1e-3: 0.77/0.79/0.77; 4,000
    # examples, 1 epoch, batch 16).
    defaults = {
        "lr": 5e-4,
        "num_virtual_tokens": 20,
        "prefix_projection": True,
        "encoder_hidden_size": 512,
        "dropout": 0.0,
    }
    wrapper = PrefixTuningModel
    in_default_comparison = True
    # transformers hands checkpointed layers no key/value cache ("incompatible with gradient checkpointing"), and a
    # recomputed layer runs in the backward pass, outside the forward that set the prefix: either way it is lost
    no_gradient_checkpointing = (
        "the prefix lives in each layer's key/value cache, which transformers does not pass to checkpointed layers"
    )

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            **peft_common(task, heads),
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
            encoder_hidden_size=cfg.encoder_hidden_size,
        )

    def apply(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> torch.nn.Module:
        if supports_native_prefix(model):
            return super().apply(model, cfg, task)
        # PEFT 0.21 refuses prefix tuning on encoders and *ForSequenceClassification ("Model does not support past
        # key values"), so these go through our own cache-based prefix module.
        freeze_unsaved(model)
        config = PrefixConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
            encoder_hidden_size=cfg.encoder_hidden_size,
            modules_to_save=self.heads(model, cfg, task),
            prefix_dropout=cfg.dropout or 0.0,
        )
        return PrefixTuningModel(model, config)

    def virtual_positions(self, cfg: MethodConfig, decoder_only: bool, generative: bool) -> int:
        # PEFT's prefix on a generative decoder numbers the text after its cache; our own prefix (encoders,
        # classification and QA heads, BERT2BERT) keeps the text's positions from 0
        return self.resolve(cfg, total_steps=1).num_virtual_tokens if decoder_only and generative else 0


METHOD = PrefixTuning()
