"""Models from scratch: a tokenizer trained on local text with `tokenizers`, a random-init model from a config, saved
together as a plain HF folder that `from_pretrained` (and every recipe's `model.name_or_path`) opens.

Serves `model.from_scratch` in recipes (pretraining, the from-scratch translation Transformer) and `hf-finetune
make-tiny`. Our machines cannot download GPT-2, T5 or BART, so this is how GPT-, T5- and BART-shaped checkpoints
come to exist here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BertConfig,
    BertForPreTraining,
    GPT2Config,
    LlamaConfig,
    MarianConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    T5Config,
)

from hf_finetune.errors import InputError
from hf_finetune.recipe import Dims

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hf_finetune.recipe import Recipe
    from hf_finetune.tasks import Task

ARCHITECTURES = ("gpt2", "llama", "bert", "roberta", "t5", "bart", "marian")
CAUSAL = ("gpt2", "llama")
MASKED = ("bert", "roberta")
SEQ2SEQ = ("t5", "bart", "marian")


def train_tokenizer(
    architecture: str, texts: Iterable[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """The tokenizer family each architecture was published with: byte-level BPE for GPT-2/RoBERTa/BART/Llama (no
    unknown tokens), WordPiece for BERT, unigram for T5/Marian (SentencePiece's model; one joint vocabulary for both
    languages of a translation pair when `texts` holds both)."""
    if architecture not in ARCHITECTURES:
        raise InputError(
            f"model.from_scratch.architecture: {architecture!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    if architecture == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}  # fmt: skip
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()))
    elif architecture in ("t5", "marian"):
        # T5's id layout: pad 0 (also the decoder start), eos 1, unk 2
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(specials.values()), unk_token="<unk>"
        )
    else:
        if architecture == "gpt2":
            specials = {
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        elif architecture == "llama":
            specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
        else:  # roberta, bart: fairseq's dictionary order
            specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                        "mask_token": "<mask>"}  # fmt: skip
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(dict.fromkeys(specials.values())),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(_nonblank(texts), trainer=trainer)
    ids = {name: tok.token_to_id(token) for name, token in specials.items()}
    if architecture == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["cls_token"]), ("[SEP]", ids["sep_token"])],
        )
    elif architecture in ("roberta", "bart"):
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", ids["eos_token"]), ("<s>", ids["bos_token"])
        )
    elif architecture in ("t5", "marian"):
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["eos_token"])]
        )
    else:  # GPT-2 and Llama-style byte-level BPE: no added tokens (documents are joined with eos when packing)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials)


def _nonblank(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if isinstance(text, str) and text.strip():
            yield text


def build_config(architecture: str, tokenizer: PreTrainedTokenizerFast, dims: Dims) -> PretrainedConfig:
    ffn = dims.ffn or 4 * dims.d_model
    vocab = len(tokenizer)
    if dims.d_model % dims.heads:
        raise InputError(f"model.from_scratch: d_model {dims.d_model} is not divisible by heads {dims.heads}")
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    match architecture:
        case "gpt2":
            return GPT2Config(
                vocab_size=vocab, n_positions=dims.max_positions, n_embd=dims.d_model, n_layer=dims.layers,
                n_head=dims.heads, n_inner=ffn, resid_pdrop=dims.dropout, embd_pdrop=dims.dropout,
                attn_pdrop=dims.dropout, **ids,
            )  # fmt: skip
        case "llama":
            return LlamaConfig(
                vocab_size=vocab, hidden_size=dims.d_model, intermediate_size=ffn, num_hidden_layers=dims.layers,
                num_attention_heads=dims.heads, num_key_value_heads=dims.heads,
                max_position_embeddings=dims.max_positions, attention_dropout=dims.dropout,
                tie_word_embeddings=True, **ids,
            )  # fmt: skip
        case "bert" | "roberta":
            cls = BertConfig if architecture == "bert" else RobertaConfig
            # RoBERTa numbers positions from pad_token_id + 1, so its table needs that many more rows
            offset = 0 if architecture == "bert" else tokenizer.pad_token_id + 1
            return cls(
                vocab_size=vocab, hidden_size=dims.d_model, num_hidden_layers=dims.layers,
                num_attention_heads=dims.heads, intermediate_size=ffn,
                max_position_embeddings=dims.max_positions + offset, hidden_dropout_prob=dims.dropout,
                attention_probs_dropout_prob=dims.dropout, type_vocab_size=2 if architecture == "bert" else 1, **ids,
            )  # fmt: skip
        case "t5":
            return T5Config(
                vocab_size=vocab, d_model=dims.d_model, d_kv=dims.d_model // dims.heads, d_ff=ffn,
                num_layers=dims.layers, num_decoder_layers=dims.layers, num_heads=dims.heads,
                dropout_rate=dims.dropout, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        case "bart" | "marian":
            cls = BartConfig if architecture == "bart" else MarianConfig
            extra = (
                {"bos_token_id": tokenizer.bos_token_id, "decoder_start_token_id": tokenizer.eos_token_id}
                if architecture == "bart"  # BART starts decoding from </s>, Marian from <pad>
                else {"decoder_start_token_id": tokenizer.pad_token_id, "decoder_vocab_size": vocab}
            )
            return cls(
                vocab_size=vocab, d_model=dims.d_model, encoder_layers=dims.layers, decoder_layers=dims.layers,
                encoder_attention_heads=dims.heads, decoder_attention_heads=dims.heads, encoder_ffn_dim=ffn,
                decoder_ffn_dim=ffn, max_position_embeddings=dims.max_positions, dropout=dims.dropout,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                forced_eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                # x sqrt(d_model), as in the Transformer paper: with the configs' default (off), 0.02-std embeddings
                # are drowned by the unit-scale sinusoidal positions and a from-scratch Marian learned Multi30k
                # several times slower (BLEU 2.2 after 600 steps)
                scale_embedding=True, **extra,
            )  # fmt: skip
    raise InputError(
        f"model.from_scratch.architecture: {architecture!r} is not one of {', '.join(ARCHITECTURES)}"
    )


def build_model(architecture: str, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """Random init with the head its pretraining objective uses; every task's Auto class loads the body from it
    (BERT keeps its pooler, which sequence classification uses)."""
    torch.manual_seed(seed)
    if architecture == "bert":
        return BertForPreTraining(config)
    if architecture in CAUSAL:
        return AutoModelForCausalLM.from_config(config)
    if architecture in MASKED:
        return AutoModelForMaskedLM.from_config(config)
    return AutoModelForSeq2SeqLM.from_config(config)


def write_scratch_model(
    folder: Path,
    architecture: str,
    texts: Iterable[str],
    dims: Dims,
    seed: int = 0,
    tokenizer: str | None = None,
) -> Path:
    """Train (or load) the tokenizer, build the random-init model, and save both in `folder` (safetensors)."""
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok: Any = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = train_tokenizer(architecture, texts, dims.vocab_size, dims.max_positions)
    model = build_model(architecture, build_config(architecture, tok, dims), seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


# make-tiny's default text when no --corpus is given: enough distinct words for a few hundred merges
TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
I thought I would sail about a little and see the watery part of the world.
It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.
The film was good, the plot was great and the actors were wonderful. The movie was bad, boring and awful.
Translation turns a sentence in one language into a sentence in another; a summary keeps what matters most.
Questions have answers in the context: the answer to where the fox jumps is over the lazy dog.
"""


def build_from_scratch(
    recipe: Recipe, task: Task, raw: Any, out: Path, accelerator: Accelerator, resuming: bool
) -> str:
    """`output_dir/init/`: the random-init model and the tokenizer trained on the training split, written once by the
    main process. A resumed run reuses it: a retrained tokenizer could number the vocabulary differently."""
    scratch = recipe.model.from_scratch
    folder = out / "init"
    if accelerator.is_main_process and not (resuming and (folder / "config.json").is_file()):
        texts = task.tokenizer_corpus(raw) if scratch.tokenizer is None else ()
        if texts is None:
            raise InputError(
                f"model.from_scratch: task {recipe.task} cannot train a tokenizer; set model.from_scratch.tokenizer"
            )
        tmp = out / ".init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_scratch_model(tmp, scratch.architecture, texts, scratch, recipe.training.seed, scratch.tokenizer)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
    return str(folder)
