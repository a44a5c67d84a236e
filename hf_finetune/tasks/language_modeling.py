"""Language modelling: causal LM (GPT-style) and masked LM (BERT-style) pretraining or continued pretraining, and text
generation.

Text is tokenised with `datasets.map` and packed into `lm.block_size` blocks, as transformers' run_clm.py and
run_mlm.py do, except that the remainder is not dropped: every token lands in exactly one block, and only the last
block of a split is shorter. Masked LM masks with transformers' `DataCollatorForLanguageModeling`; its evaluation
splits are masked once, with a fixed seed, so that every evaluation scores the same positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from datasets import Dataset, DatasetDict, IterableDataset
from datasets.table import InMemoryTable
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hf_finetune.data import require_columns, resolve_path
from hf_finetune.device import Padding, right_pad
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.losses import separate_head, token_nll
from hf_finetune.metrics import load_metric
from hf_finetune.sampling import eval_order
from hf_finetune.streaming import PackedStream
from hf_finetune.tasks.base import PositionBudget, TaskBase, positive

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe

DEFAULT_BLOCK_SIZE = 256
STREAM_CHECK_ROWS = 1000  # rows of a streamed split checked before training
STREAM_TOKENIZER_ROWS = 100_000  # rows of a streamed split a from-scratch tokenizer learns from, by default


class LanguageModelingTask(TaskBase):
    name = "causal_lm"
    pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    metrics = {"eval_loss": False, "perplexity": False}
    primary_metric = "perplexity"
    default_max_length = DEFAULT_BLOCK_SIZE
    token_level = True
    chunked_head = True
    generative = True
    streams = True
    head_modules: tuple[str, ...] = ()  # the LM head is pretrained (and usually tied to the embeddings)
    causal = True

    @property
    def shift_labels(self) -> bool:
        """Logits at position t predict the label at t + 1 (causal LM), not at t (masked LM)."""
        return self.causal

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.column = recipe.data.columns.text
        self.join = recipe.lm.join
        self._eval: dict[str, Dataset] = {}
        """The packed evaluation splits, for the saved predictions."""

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        problems = positive({"lm.block_size": recipe.lm.block_size})
        if not 0 < recipe.lm.mlm_probability < 1:
            problems.append(f"'lm.mlm_probability': must be in (0, 1), got {recipe.lm.mlm_probability}")
        return problems

    @property
    def peft_task_type(self) -> str | None:
        # PEFT has no masked-LM task type; without one it wraps the model in its generic PeftModel
        return "CAUSAL_LM" if self.causal else None

    @property
    def block_size(self) -> int:
        return self.recipe.lm.block_size or self.recipe.training.max_length or DEFAULT_BLOCK_SIZE

    def position_budget(self, config: Any) -> PositionBudget:
        key = "lm.block_size" if self.recipe.lm.block_size else "training.max_length"
        return PositionBudget(key, self.block_size)

    def prepare(self, raw: DatasetDict) -> None:
        for split in raw:
            ds = raw[split]
            if isinstance(ds, IterableDataset):  # a stream: its first rows stand for it (it is never read whole)
                ds = Dataset.from_list(list(ds.take(STREAM_CHECK_ROWS)))
            require_columns(ds, {"text": self.column}, split)
            values = ds[self.column]
            bad = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
            if bad is not None:
                raise InputError(
                    f"data.{split} row {bad}: column {self.column!r} (data.columns.text) is not text: {values[bad]!r}"
                )
            if not any(isinstance(v, str) and v.strip() for v in values):
                raise InputError(f"data.{split}: column {self.column!r} holds no text")
        if self.join == "auto":
            path = self.recipe.data.train.path if self.recipe.data.train else None
            local = resolve_path(path) if path else None
            files = sorted(local.iterdir()) if local is not None and local.is_dir() else [local]
            # datasets' text builder yields one row per line: rejoining them with newlines restores the text
            self.join = "newline" if any(f is not None and f.suffix == ".txt" for f in files) else "eos"

    def tokenizer_corpus(self, raw: DatasetDict) -> Iterator[str]:
        """The text a from-scratch tokenizer is trained on: the training split."""
        limit = self.recipe.model.from_scratch.tokenizer_samples if self.recipe.model.from_scratch else None
        train = raw["train"]
        if isinstance(train, IterableDataset):  # a stream: its first rows (all of it, unbounded, would never end)
            yield from (row[self.column] for row in train.take(limit or STREAM_TOKENIZER_ROWS) if row[self.column])
            return
        train = train if limit is None else train.select(range(min(limit, len(train))))
        for batch in train.iter(batch_size=1000):
            yield from (t for t in batch[self.column] if t)

    def load_model(self, path: str) -> PreTrainedModel:
        return self.pretrained(AutoModelForCausalLM if self.causal else AutoModelForMaskedLM, path)

    # ---- tokenising and packing ----------------------------------------------------------------------------------

    def _tokenise(self, texts: list[str | None]) -> dict[str, list]:
        tokenizer = self.tokenizer
        texts = [t or "" for t in texts]
        keep_offsets = not self.causal and self.recipe.lm.whole_word_mask
        if not self.causal:
            # BERT-style: every row framed by [CLS] ... [SEP], as in run_mlm.py; blank lines carry nothing
            texts = [t for t in texts if t.strip()]
            if not texts:  # a streamed blank row
                return {"input_ids": [], "special_tokens_mask": [], **({"offset_mapping": []} if keep_offsets else {})}
            return tokenizer(
                texts,
                add_special_tokens=True,
                return_special_tokens_mask=True,
                return_offsets_mapping=keep_offsets,
                return_attention_mask=False,
                verbose=False,  # longer-than-model rows are fine: they are cut into blocks
            )
        if self.join == "newline":
            encoded = tokenizer([t + "\n" for t in texts], add_special_tokens=False, return_attention_mask=False,
                                verbose=False)  # fmt: skip
            return {"input_ids": [ids for ids in encoded["input_ids"] if ids]}
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise InputError(
                "lm.join=eos: the tokenizer has neither an eos nor a sep token; set lm.join=newline"
            )
        texts = [t for t in texts if t]
        if not texts:  # a streamed blank row
            return {"input_ids": []}
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": [ids + [eos] for ids in encoded["input_ids"]]}

    def pack(self, tokenised: Dataset) -> Dataset:
        """Blocks of `block_size` tokens cut from the concatenation of every row; the last one keeps the rest.

        run_clm.py's `group_texts` packs inside each `map` batch and drops every batch's remainder; packing the
        split's whole token stream at once keeps every token. The stream stays in Arrow: the blocks are new list
        offsets over the same flat token buffer, with no Python object per token."""
        size = self.block_size
        ids = tokenised.data.column("input_ids").combine_chunks().flatten()
        offsets = pa.array(np.append(np.arange(0, len(ids), size), len(ids)), type=pa.int32())
        columns = {"input_ids": pa.ListArray.from_arrays(offsets, ids)}
        if "special_tokens_mask" in tokenised.column_names:
            flags = tokenised.data.column("special_tokens_mask").combine_chunks().flatten()
            columns["special_tokens_mask"] = pa.ListArray.from_arrays(offsets, flags)
        if "offset_mapping" in tokenised.column_names:  # one (start, end) pair per token
            pairs = tokenised.data.column("offset_mapping").combine_chunks().flatten()
            columns["offset_mapping"] = pa.ListArray.from_arrays(offsets, pairs)
        columns["length"] = pa.array(np.diff(offsets.to_numpy()))
        return Dataset(InMemoryTable(pa.table(columns)))

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in raw.items():
            if isinstance(ds, IterableDataset):
                out[split] = PackedStream(ds, self.column, self._tokenise, self.block_size)
                continue
            tokenised = ds.map(
                lambda b: self._tokenise(b[self.column]),
                batched=True,
                remove_columns=ds.column_names,
                num_proc=self.recipe.data.num_proc,
                desc=f"Tokenising {split}",
            )
            packed = self.pack(tokenised)
            if not self.causal and split != "train":
                packed = self._mask_once(packed)
            if split != "train":
                self._eval[split] = packed
            out[split] = packed
        return DatasetDict(out)

    def _mask_once(self, packed: Dataset) -> Dataset:
        """Evaluation blocks masked once, with a seed: every evaluation (and every run) scores the same positions."""
        collate = self._collator(self._masker(seed=self.recipe.training.seed))

        def mask(batch: dict[str, list]) -> dict[str, list]:
            rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input_ids"]))]
            masked = collate(rows)
            lengths = batch["length"]
            return {
                "input_ids": [r[:n].tolist() for r, n in zip(masked["input_ids"], lengths, strict=True)],
                "labels": [r[:n].tolist() for r, n in zip(masked["labels"], lengths, strict=True)],
                "length": lengths,
            }

        # one process, in order, never from a cache: the seeded stream then fixes the masks
        return packed.map(mask, batched=True, remove_columns=packed.column_names, load_from_cache_file=False)

    def _masker(self, seed: int | None = None) -> DataCollatorForLanguageModeling:
        tokenizer = self.tokenizer
        if tokenizer.mask_token is None:
            raise InputError(
                f"task masked_lm: the tokenizer of {self.recipe.model.name_or_path} has no mask token"
            )
        return DataCollatorForLanguageModeling(
            tokenizer,
            mlm=True,
            mlm_probability=self.recipe.lm.mlm_probability,
            whole_word_mask=self.recipe.lm.whole_word_mask,
            seed=seed,
        )

    def _collator(self, masker: DataCollatorForLanguageModeling | None) -> LMCollator:
        return LMCollator(self.tokenizer, masker, self.padding, self.block_size)

    def collator(self) -> LMCollator:
        return self._collator(None if self.causal else self._masker())

    # ---- evaluation -----------------------------------------------------------------------------------------------

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        """Perplexity = exp(summed token loss / scored tokens) over the whole split, not a mean of batch means.
        A saved prediction row is one block: its text, scored tokens and their mean loss."""
        metric = load_metric("perplexity")

        head = separate_head(model, accelerator)

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            labels = batch.pop("labels")
            with accelerator.autocast():
                nll, aligned = token_nll(model, batch, labels, self.shift_labels, head)
            return {"sums": nll.sum(1).double(), "counts": (aligned != -100).sum(1)}

        sums, counts = [], []
        for out in gathered_outputs(model, loader, accelerator, forward):
            sums += out["sums"].tolist()
            counts += out["counts"].tolist()
        metric.add_batch(loss_sums=sums, token_counts=counts)
        if records is not None:
            packed = self._eval[split]
            order = eval_order(packed["length"])  # the loader's order of the blocks (the short last one first)
            found = dict(zip(order, zip(sums, counts, strict=True), strict=True))
            for i, ids in enumerate(packed["input_ids"]):
                total, n = found[i]
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                records.append({"id": i, "text": text, "tokens": int(n), "loss": total / n if n else None})
        return metric.compute()

    # ---- prediction -----------------------------------------------------------------------------------------------

    def predict(self, model: torch.nn.Module, rows: list[dict], **generation: Any) -> list[dict]:
        """Causal LM: the continuation of each row's prompt. Masked LM: the likeliest tokens at each mask."""
        key = "prompt" if all("prompt" in r for r in rows) else self.column
        for i, row in enumerate(rows):
            if not isinstance(row.get(key), str):
                raise InputError(f"input row {i}: missing text field 'prompt' (or {self.column!r})")
        prompts = [r[key] for r in rows]
        if self.causal:
            texts = generate(
                model, self.tokenizer, prompts, batch_size=self.recipe.training.eval_batch, **generation
            )
            return [{"generated": t} for t in texts]
        return fill_masks(model, self.tokenizer, prompts, batch_size=self.recipe.training.eval_batch)

    def checkpoint_info(self) -> dict[str, Any]:
        return {"join": self.join}

    def restore(self, info: dict[str, Any]) -> None:
        self.join = info.get("join", self.join)


class MaskedLanguageModelingTask(LanguageModelingTask):
    name = "masked_lm"
    pipeline_tag = "fill-mask"
    auto_class = "AutoModelForMaskedLM"
    generative = False
    causal = False
    # The MLM head's transform (dense + LayerNorm; its decoder is the tied word embeddings) trains with every method:
    # sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship without it, so it starts random there.
    head_modules = ("predictions.transform", "lm_head.dense", "lm_head.layer_norm")


class LMCollator:
    """Pads packed blocks (only a split's last block is short). Causal LM: labels are the inputs, pads unscored; pads
    are told apart by the attention mask, not by id, because GPT-style models pad with their eos token. Masked LM:
    training blocks are masked afresh every time by transformers' masking (`torch_mask_tokens`); evaluation blocks
    arrive masked. Padding is ours because the tokenizer's `pad` cannot pad the offset pairs whole-word masking needs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        masker: DataCollatorForLanguageModeling | None,
        padding: Padding,
        block_size: int,
    ) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.masker, self.padding, self.block_size = masker, padding, block_size

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
            return right_pad(sequences, value, self.padding, cap=self.block_size)

        ids = pad([r["input_ids"] for r in rows], self.pad_id)
        mask = pad([[1] * len(r["input_ids"]) for r in rows], 0)
        labels = pad([r["labels"] if "labels" in r else r["input_ids"] for r in rows], -100)
        if self.masker is not None and "labels" not in rows[0]:
            ids, labels = self.mask(rows, ids, mask)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def mask(
        self, rows: list[dict[str, Any]], ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        special = torch.ones_like(ids)  # pads count as special: never selected
        offsets = None
        if "offset_mapping" in rows[0]:
            offsets = torch.zeros((*ids.shape, 2), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            special[i, :n] = torch.tensor(r["special_tokens_mask"])
            if offsets is not None:
                offsets[i, :n] = torch.tensor(r["offset_mapping"]).view(n, 2)
        m = self.masker
        if m.seed is not None and not isinstance(getattr(m, "generator", None), torch.Generator):
            m.create_rng("pt")  # what the collator's own __call__ does first: its seeded generator
        masked, labels = self.masker.torch_mask_tokens(
            ids.clone(), special_tokens_mask=special, offset_mapping=offsets
        )
        labels[mask == 0] = -100
        return masked, labels


def load_generator(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for `hf-finetune generate`: a causal-LM run (plain or PEFT, prefix tuning included) or any HF
    model folder."""
    from hf_finetune.checkpoint import INFO_NAME, load_final

    folder = Path(path)
    if any((c / INFO_NAME).exists() for c in (folder, folder / "model")):
        _, model, tokenizer, info = load_final(folder)
        if info["task"] != LanguageModelingTask.name:
            raise InputError(f"generate: {path} was trained for task {info['task']}, not {LanguageModelingTask.name}")
    elif (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        raise InputError(f"generate: {path} is neither a run's output_dir nor a model folder with config.json")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers ship without one; batches need it
    return model, tokenizer


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[str]:
    """Continuations of `prompts` (the prompt itself not repeated). Temperature 0 is greedy (or beam) search.

    Prompts are batched by length with left padding, so every row's continuation starts right after its last real
    token; the order of the answers is that of `prompts`."""
    if max_new_tokens < 1 or num_beams < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise InputError(
            "generate: needs max_new_tokens >= 1, num_beams >= 1, temperature >= 0, 0 < top_p <= 1"
        )
    device = next(model.parameters()).device
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    options: dict[str, Any] = {
        "use_cache": use_cache,
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "do_sample": sample,
        "pad_token_id": pad,
        **({"temperature": temperature, "top_p": top_p} if sample else {}),
    }
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        # PEFT puts its virtual tokens in front of the left padding, which shifts the positions of the real tokens:
        # soft-prompted rows would continue differently in a batch than alone. Batches of equal length need no pad.
        batches = [b[i : i + batch_size] for b in _runs(order, lengths) for i in range(0, len(b), batch_size)]
    out: list[str] = [""] * len(prompts)
    torch.manual_seed(seed)
    try:
        for idx in batches:
            enc = tokenizer(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            )
            if enc["input_ids"].shape[1] == 0:
                bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
                enc = {"input_ids": torch.full((len(idx), 1), bos), "attention_mask": torch.ones(len(idx), 1)}
            enc = {k: v.to(device) for k, v in enc.items()}
            generated = model.generate(**enc, **options)
            new = generated[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
    finally:
        tokenizer.padding_side = side
    return out


def _runs(order: list[int], lengths: list[int]) -> list[list[int]]:
    """`order` (sorted by length) cut where the length changes."""
    runs: list[list[int]] = []
    for i in order:
        if runs and lengths[runs[-1][-1]] == lengths[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def fill_masks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    top_k: int = 5,
    batch_size: int = 16,
) -> list[dict]:
    """The `top_k` likeliest tokens at each mask token of each text, batched by length."""
    features = [tokenizer(text, truncation=True) for text in texts]
    collate = DataCollatorWithPadding(tokenizer)

    def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(**batch).logits.float(), "input_ids": batch["input_ids"]}

    out: list[dict] = [{} for _ in texts]
    for idx, result in batched_rows(model, features, collate, batch_size, forward):
        for row, i in enumerate(idx):
            positions = (result["input_ids"][row] == tokenizer.mask_token_id).nonzero().flatten().tolist()
            fills = []
            for pos in positions:
                top = result["logits"][row, pos].softmax(-1).topk(top_k)
                fills.append(
                    [
                        {"token": tokenizer.decode([t]).strip(), "probability": p}
                        for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ]
                )
            out[i] = {"fills": fills}
    return out
