"""Prefix tuning on encoders and sequence-classification heads (hf_finetune.methods.prefix), on tiny random models."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_finetune.errors import InputError
from hf_finetune.methods.prefix import (
    PREFIX_CONFIG_NAME,
    PREFIX_WEIGHTS_NAME,
    PrefixConfig,
    PrefixTuningModel,
    supports_native_prefix,
)
from hf_finetune.methods.prompt import PROMPT_WEIGHTS_NAME, EncoderPromptModel, PromptConfig

P = 4  # virtual tokens
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _bert() -> PreTrainedModel:
    return BertForSequenceClassification(BertConfig(**SMALL, num_labels=2, pad_token_id=0))


def _gpt2() -> PreTrainedModel:
    return GPT2ForSequenceClassification(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, pad_token_id=0)
    )


def _roberta() -> PreTrainedModel:
    # RoBERTa numbers positions from padding_idx + 1, which the wrapper has to reproduce.
    return RobertaForSequenceClassification(RobertaConfig(**SMALL, num_labels=2, pad_token_id=0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy machine they slow these tests down 20-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAMILIES = {"bert": (_bert, "classifier"), "gpt2": (_gpt2, "score"), "roberta": (_roberta, "classifier")}


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[Callable[[], PreTrainedModel], str]:
    return FAMILIES[request.param]


def _base(make: Callable[[], PreTrainedModel], seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return make().eval()


def _wrap(model: PreTrainedModel, head: str, **overrides: object) -> PrefixTuningModel:
    torch.manual_seed(1)
    config = PrefixConfig(num_virtual_tokens=P, encoder_hidden_size=16, modules_to_save=[head], **overrides)
    return PrefixTuningModel(model, config)


def _batch(n: int = 6, length: int = 10, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (pad id 0, never a real token) and their mask; row lengths vary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, n, 2):
        keep = length - 1 - row % (length - 2)
        ids[row, keep:], mask[row, keep:] = 0, 0
    return ids, mask


def _contains_five(n: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: label 1 iff token 5 occurs; half the rows get one at a random spot."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 100, (n, length), generator=g)
    labels = (torch.arange(n) % 2).long()
    spots = torch.randint(0, length, (n,), generator=g)
    ids[labels == 1, spots[labels == 1]] = 5
    return ids, labels


def test_only_prefix_and_head_train_and_loss_falls(family: tuple[Callable[[], PreTrainedModel], str]) -> None:
    make, head = family
    model = _wrap(_base(make), head).eval()  # no dropout: a deterministic loss curve
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("prefix_encoder.", f"base_model.{head}.")) for n in trainable)
    assert any(n.startswith("prefix_encoder.") for n in trainable)
    assert model.get_nb_trainable_parameters() == (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ids, labels = _contains_five(32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(100):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        assert model.prefix_encoder.embedding.weight.grad is not None
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_masked_prefix_matches_plain_model_and_padding_is_neutral(
    family: tuple[Callable[[], PreTrainedModel], str],
) -> None:
    make, head = family
    plain = _base(make)
    model = _wrap(_base(make), head).eval()
    ids, mask = _batch()
    with torch.no_grad():
        # The wrapper's own inputs with the prefix columns masked out: only positions/mask widening remain.
        inputs = model._build_inputs(input_ids=ids, attention_mask=mask)
        inputs["attention_mask"][:, :P] = 0
        masked = model.get_base_model()(**inputs).logits
        expected = plain(input_ids=ids, attention_mask=mask).logits
        # two computation paths (attention over P more, masked, keys): equal up to float32 rounding
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)

        batched = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(batched, expected, atol=1e-6)  # the prefix does act
        for row in range(len(ids)):
            n = int(mask[row].sum())
            alone = model(input_ids=ids[row : row + 1, :n]).logits
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_matches_input_ids() -> None:
    model = _wrap(_base(_bert), "classifier").eval()
    ids, mask = _batch()
    with torch.no_grad():
        embeds = model.get_base_model().get_input_embeddings()(ids)
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [True, False])
def test_save_and_load_round_trip(
    family: tuple[Callable[[], PreTrainedModel], str], projection: bool, tmp_path: Path
) -> None:
    make, head = family
    model = _wrap(_base(make), head, prefix_projection=projection)
    with torch.no_grad():  # make the head differ from a fresh init, so loading it is observable
        for p in model.get_base_model().get_submodule(head).parameters():
            p.add_(0.5)
    model.eval()
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / PREFIX_WEIGHTS_NAME)
    assert saved and all(k.startswith(("prefix_encoder.", f"modules_to_save.{head}.")) for k in saved)
    assert any(k.startswith("prefix_encoder.") for k in saved)
    meta = json.loads((tmp_path / PREFIX_CONFIG_NAME).read_text())
    assert meta["num_virtual_tokens"] == P and meta["modules_to_save"] == [head] and meta["num_layers"] == 2
    assert "base_model_name_or_path" in meta

    loaded = PrefixTuningModel.from_pretrained(_base(make), tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
        )


def test_load_with_missing_key_names_the_file(tmp_path: Path) -> None:
    _wrap(_base(_bert), "classifier").save_pretrained(tmp_path)
    weights = tmp_path / PREFIX_WEIGHTS_NAME
    tensors = load_file(weights)
    del tensors["modules_to_save.classifier.bias"]
    save_file(tensors, weights)
    with pytest.raises(InputError, match=r"prefix_model\.safetensors.*missing keys.*classifier\.bias"):
        PrefixTuningModel.from_pretrained(_base(_bert), tmp_path)


def test_load_rejects_other_geometry(tmp_path: Path) -> None:
    _wrap(_base(_bert), "classifier").save_pretrained(tmp_path)
    other = BertForSequenceClassification(BertConfig(**{**SMALL, "num_hidden_layers": 3}, num_labels=2))
    with pytest.raises(InputError, match=PREFIX_CONFIG_NAME):
        PrefixTuningModel.from_pretrained(other, tmp_path)


def test_bf16_autocast_forward_and_backward() -> None:
    model = _wrap(_base(_gpt2), "score")
    model.train()
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(len(ids), dtype=torch.long))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert model.prefix_encoder.transform[0].weight.grad.abs().sum() > 0


def test_config_and_attribute_passthrough() -> None:
    base = _base(_bert)
    model = _wrap(base, "classifier")
    assert model.config is base.config and model.config.id2label == base.config.id2label
    assert model.get_base_model() is base
    assert model.device == base.device  # falls through to the wrapped model


def test_bad_setups_raise_input_error() -> None:
    with pytest.raises(InputError, match="matches no module"):
        _wrap(_base(_bert), "no_such_head")
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4)
    )
    with pytest.raises(InputError, match="no key/value cache"):
        _wrap(distil, "classifier")
    with pytest.raises(InputError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=0)
    model = _wrap(_base(_gpt2), "score")
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    with pytest.raises(InputError, match="gradient checkpointing"):
        model(input_ids=_batch()[0])


def test_supports_native_prefix() -> None:
    assert not supports_native_prefix(_base(_bert))
    assert not supports_native_prefix(_base(_gpt2))
    assert supports_native_prefix(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)))
    t5 = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    assert supports_native_prefix(T5ForConditionalGeneration(t5))
    bart = BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
    )
    assert supports_native_prefix(BartForConditionalGeneration(bart))


# ---- BERT2BERT: the prefix through the attention interface ------------------------------------------------------


def _bert2bert(seed: int = 0) -> PreTrainedModel:
    from transformers import BertLMHeadModel, BertModel, EncoderDecoderModel

    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(**SMALL, pad_token_id=0), add_pooling_layer=False)
    decoder = BertLMHeadModel(BertConfig(**SMALL, pad_token_id=0, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 1, 0, 2
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.eval()


def _wrap_b2b(model: PreTrainedModel, seed: int = 1) -> PrefixTuningModel:
    torch.manual_seed(seed)
    wrapped = PrefixTuningModel(model, PrefixConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    with torch.no_grad():  # a freshly initialised prefix barely moves the outputs; make its effect observable
        for p in wrapped.prefix_encoder.parameters():
            p.mul_(5.0)
    return wrapped


def test_prefix_attention_equals_attention_over_concatenated_keys() -> None:
    """The attention function against softmax(q [Kp; K]^T) [Vp; V] by hand, for the causal and padded cases."""
    from hf_finetune.methods.prefix import _ACTIVE_PREFIX, _prefix_attention

    g = torch.Generator().manual_seed(0)
    b, h, q_len, kv_len, d = 2, 4, 5, 5, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (q_len, kv_len, kv_len))
    prefix = torch.randn(2, 1, h, P, d, generator=g)  # one module: keys at 0, values at 1
    pad = torch.ones(b, 1, q_len, kv_len, dtype=torch.bool)
    pad[1, ..., 3:] = False  # row 1's last two keys are padding

    class Module(torch.nn.Module):
        is_causal = True
        _hf_finetune_prefix_slot = 0

    def by_hand(allowed: torch.Tensor) -> torch.Tensor:
        keys = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
        scores = q @ keys.transpose(2, 3) / d**0.5
        visible = torch.cat([torch.ones(*allowed.shape[:-1], P, dtype=torch.bool), allowed], dim=-1)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return (weights @ values).transpose(1, 2)

    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()[None, None].expand(b, 1, -1, -1)
    token = _ACTIVE_PREFIX.set((prefix, set()))
    try:
        out, _ = _prefix_attention(Module(), q, k, v, None, scaling=d**-0.5)  # no mask: causal by the module
        torch.testing.assert_close(out, by_hand(causal), atol=1e-5, rtol=1e-5)
        out, _ = _prefix_attention(Module(), q, k, v, pad & causal, scaling=d**-0.5)
        torch.testing.assert_close(out, by_hand(pad & causal), atol=1e-5, rtol=1e-5)
        Module.is_causal = False  # cross- or encoder attention without padding: every key visible
        out, _ = _prefix_attention(Module(), q, k, v, None, scaling=d**-0.5)
        torch.testing.assert_close(out, by_hand(torch.ones_like(pad)), atol=1e-5, rtol=1e-5)
    finally:
        _ACTIVE_PREFIX.reset(token)


def _learn_constant_answer(model: PrefixTuningModel, steps: int) -> list[float]:
    """Train on a task a prefix alone can learn: whatever the source, answer "7 8 9 7 8 9"."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 100, (16, 6), generator=g)
    target = torch.tensor([7, 8, 9, 7, 8, 9]).expand(16, -1)
    decoder_ids = torch.cat([torch.ones(16, 1, dtype=torch.long), target[:, :-1]], 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_encoder_decoder_prefix_covers_every_attention_and_only_it_trains() -> None:
    model = _wrap_b2b(_bert2bert())
    layers = SMALL["num_hidden_layers"]
    assert model.geometry["num_layers"] == 3 * layers  # encoder self, decoder self, decoder cross
    assert not supports_native_prefix(model.get_base_model())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prefix_encoder.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _learn_constant_answer(model, 60)
    # a random frozen BERT's logits barely vary (std 0.12), so the floor here is about 3.97 from 4.68
    assert losses[-1] < 0.9 * losses[0], losses
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == (name in trainable), name


def test_encoder_decoder_prefix_padding_is_neutral() -> None:
    model = _wrap_b2b(_bert2bert()).eval()
    ids, mask = _batch(n=4, length=7)
    decoder_ids, decoder_mask = _batch(n=4, length=5, seed=5)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                        decoder_attention_mask=decoder_mask).logits  # fmt: skip
        plain = model.get_base_model()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                                       decoder_attention_mask=decoder_mask).logits  # fmt: skip
        assert not torch.allclose(batched, plain, atol=1e-4)  # the prefix does act
        for row in range(len(ids)):
            n, m = int(mask[row].sum()), int(decoder_mask[row].sum())
            alone = model(input_ids=ids[row : row + 1, :n], decoder_input_ids=decoder_ids[row : row + 1, :m]).logits
            torch.testing.assert_close(batched[row, :m], alone[0], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_prefix_generation(tmp_path: Path) -> None:
    plain = _bert2bert()
    model = _wrap_b2b(_bert2bert())
    _learn_constant_answer(model, 30)
    model.eval()
    ids, mask = _batch(n=4, length=7)
    options = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
        assert torch.equal(cached, uncached)
        assert not torch.equal(cached, plain.generate(input_ids=ids, attention_mask=mask, **options))
        beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=3, **options)
        assert beams.shape == cached.shape
        model.save_pretrained(tmp_path)
        loaded = PrefixTuningModel.from_pretrained(_bert2bert(), tmp_path).eval()
        assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, **options), cached)


# ---- BERT2BERT: prompt tuning ------------------------------------------------------------------------------------


def test_encoder_prompt_tuning_trains_saves_and_generates(tmp_path: Path) -> None:
    plain = _bert2bert()
    torch.manual_seed(1)
    model = EncoderPromptModel(_bert2bert(), PromptConfig(num_virtual_tokens=P))
    # "sampled vocab" initialisation: each prompt row is one of the model's own token embeddings
    vocab = plain.get_input_embeddings().weight
    assert all((vocab == row).all(-1).any() for row in model.prompt_embeddings.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_embeddings.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = _batch(n=4, length=7)
    with torch.no_grad():  # padding is neutral: a padded row scores as it does alone
        dec = torch.ones(4, 3, dtype=torch.long)
        batched = model.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for row in range(len(ids)):
            alone = model(input_ids=ids[row : row + 1, : int(mask[row].sum())], decoder_input_ids=dec[:1]).logits
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
    # a prompt reaches this random decoder only through cross-attention, so it moves the loss a little; that it
    # learns on a real task is tests/test_seq2seq.py's family x method test
    losses = _learn_constant_answer(model, 60)
    assert losses[-1] < losses[0] - 1e-3, losses
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == (name in trainable), name
    model.eval()
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
        assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options))
        scores = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
        assert not torch.allclose(scores, plain(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits)
        model.save_pretrained(tmp_path)
        assert set(load_file(tmp_path / PROMPT_WEIGHTS_NAME)) == {"prompt_embeddings.weight"}
        loaded = EncoderPromptModel.from_pretrained(_bert2bert(), tmp_path).eval()
        assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, **options), out)
    with pytest.raises(InputError, match="not encoder-decoder"):
        EncoderPromptModel(_base(_bert), PromptConfig())
