"""Instruction tuning of decoder models on conversations (`task: chat`).

Rows are conversations (`messages`: `{role, content}` with roles system/user/assistant, the OpenAI/TRL format), or
single-turn `prompt`/`response` (or Alpaca's `instruction`/`input`/`output`) columns turned into one. Each is
rendered with the tokenizer's chat template (its own, or one the recipe names, saved into the output tokenizer), and
only the tokens `chat.train_on` selects carry loss: by default every assistant turn's content and its end-of-turn
token, found by transformers' `return_assistant_tokens_mask` where the template marks them (`{% generation %}`), else
by rendering each turn's prefix (exact, and checked). `chat.packing` concatenates conversations into blocks whose
positions restart per conversation, so attention cannot cross from one to the next (transformers builds the
block-diagonal mask from `position_ids`). Evaluation: loss and perplexity on the scored tokens, and optionally answers
generated for a validation sample, scored by exact match of a final-answer pattern or ROUGE-L.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from hf_finetune.data import say
from hf_finetune.device import right_pad
from hf_finetune.errors import InputError
from hf_finetune.inference import batched_rows, gathered_outputs
from hf_finetune.losses import separate_head, token_nll
from hf_finetune.tasks.base import TaskBase, example_ids

if TYPE_CHECKING:
    from hf_finetune.recipe import Recipe

ROLES = ("system", "user", "assistant")
IGNORE = -100

# Templates with `{% generation %}` around what an assistant writes (its content and end-of-turn token), which is
# what `apply_chat_template(return_assistant_tokens_mask=True)` reads. The texts are those of the named formats
# (ChatML as in Qwen/OpenAI, Llama 3's header tokens, Zephyr's role tags); the tokens they need are added when the
# tokenizer lacks them.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
        "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "zephyr": [],
}
# end-of-turn tokens generation stops at, besides the tokenizer's eos, where the vocabulary has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def template_problem(name: str | None) -> str | None:
    if name is None or name in TEMPLATES:
        return None
    if not name.endswith(".jinja"):
        return f"'chat.template': {name!r} is none of {', '.join(TEMPLATES)} and not a .jinja file"
    if not Path(name).is_file():
        return f"'chat.template': {name}: file not found"
    return None


def conversation(row: dict[str, Any], columns: Any, where: str, system: str | None, training: bool) -> list[dict]:
    """The row as a list of messages; `training`: it must hold an assistant turn to learn from."""
    if columns.messages in row and row[columns.messages] is not None:
        messages = row[columns.messages]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: column {columns.messages!r} is not a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: message {i} is not a {{role, content}} mapping with text content")
            if m.get("role") not in ROLES:
                raise InputError(f"{where}: message {i} has role {m.get('role')!r}, not one of {', '.join(ROLES)}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif isinstance(row.get("instruction"), str):  # Alpaca: instruction, optional input, output
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}]
        if isinstance(row.get("output"), str):
            messages.append({"role": "assistant", "content": row["output"]})
    elif isinstance(row.get(columns.prompt), str):
        messages = [{"role": "user", "content": row[columns.prompt]}]
        if isinstance(row.get(columns.response), str):
            messages.append({"role": "assistant", "content": row[columns.response]})
    else:
        raise InputError(
            f"{where}: no conversation: needs a {columns.messages!r} list, {columns.prompt!r}/{columns.response!r} "
            "text, or Alpaca's instruction/output (data.columns.messages, prompt, response)"
        )
    if training and not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: the conversation has no assistant turn to learn from")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


class ChatTask(TaskBase):
    name = "chat"
    pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metrics = {"eval_loss": False, "perplexity": False, "exact_match": True, "rouge_l": True}
    primary_metric = "perplexity"
    default_max_length = 1024
    token_level = True
    chunked_head = True
    generative = True
    shift_labels = True
    head_modules: tuple[str, ...] = ()

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.cfg = recipe.chat
        self.columns = recipe.data.columns
        if self.cfg.eval_generate:
            self.primary_metric = "exact_match" if self.cfg.answer_pattern else "rouge_l"
        self.new_token_ids: tuple[int, ...] = ()
        """Ids of the template's tokens this run added to the tokenizer (their embedding rows must train)."""
        self._eval: dict[str, Dataset] = {}
        """Each evaluation split's conversations (messages, ids), for generation and the saved predictions."""

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[str]:
        c, problems = recipe.chat, []
        problem = template_problem(c.template)
        if problem:
            problems.append(problem)
        from hf_finetune.methods import get_method

        if c.packing and get_method(recipe.method.name).adds_virtual_tokens:
            problems.append(
                f"'chat.packing': method {recipe.method.name} puts virtual tokens before the input and PEFT then drops "
                "position_ids, so packed conversations would attend to each other; turn packing off for it"
            )
        if c.eval_generate < 0:
            problems.append(f"'chat.eval_generate': must be >= 0, got {c.eval_generate}")
        if c.max_new_tokens < 1:
            problems.append(f"'chat.max_new_tokens': must be a positive integer, got {c.max_new_tokens}")
        if c.answer_pattern is not None:
            try:
                if re.compile(c.answer_pattern).groups < 1:
                    problems.append("'chat.answer_pattern': needs a group, e.g. '####\\s*(.+)'")
            except re.error as err:
                problems.append(f"'chat.answer_pattern': not a regular expression ({err})")
        return problems

    # ---- template and tokens -------------------------------------------------------------------------------------

    def setup(self, tokenizer: PreTrainedTokenizerBase, padding: Any) -> None:
        super().setup(tokenizer, padding)
        name = self.cfg.template
        if name is None:
            if not tokenizer.chat_template:
                raise InputError(
                    f"chat.template: the tokenizer of {self.recipe.model.name_or_path} has no chat_template; set "
                    f"chat.template to {', '.join(TEMPLATES)} or a .jinja file"
                )
        else:
            template = TEMPLATES[name] if name in TEMPLATES else Path(name).read_text()
            vocab = tokenizer.get_vocab()
            new = [t for t in TEMPLATE_TOKENS.get(name, []) if t not in vocab]
            if new:
                tokenizer.add_tokens(new, special_tokens=True)
                self.new_token_ids = tuple(tokenizer.convert_tokens_to_ids(new))
            tokenizer.chat_template = template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers ship without one; batches need it
        vocab = tokenizer.get_vocab()
        stops = [vocab[t] for t in END_OF_TURN if t in vocab]
        self.stop_ids = [*([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []), *stops]
        self.marked = "{% generation %}" in tokenizer.chat_template or "{%- generation %}" in tokenizer.chat_template

    def load_model(self, path: str) -> PreTrainedModel:
        model = self.pretrained(AutoModelForCausalLM, path)
        if len(self.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(self.tokenizer))
        return model

    # ---- rendering -------------------------------------------------------------------------------------------------

    def render(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and, per token, 1 where an assistant wrote it (content and end of turn)."""
        tokenizer = self.tokenizer
        if self.marked:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), list(out["assistant_masks"])

        def ids(upto: int, prompt: bool = False) -> list[int]:
            text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        # a template without generation markers: each assistant turn is what its message adds to the rendered
        # prefix, which holds only while rendering one more message leaves the earlier tokens as they were
        full = ids(len(messages))
        mask = [0] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = ids(i, prompt=True), ids(i + 1)
            if full[: len(upto)] != upto or upto[: len(before)] != before:
                raise InputError(
                    f"{where}: the chat template does not mark assistant turns ({{% generation %}}) and rendering "
                    "turn by turn changes earlier tokens; set chat.template to one of " + ", ".join(TEMPLATES)
                )
            end = len(upto)
            # up to its end-of-turn token: what the template writes after it (a newline) is the next turn's lead-in
            stops = [j for j in range(len(before), end) if full[j] in self.stop_ids]
            end = stops[-1] + 1 if stops else end
            mask[len(before) : end] = [1] * (end - len(before))
        return full, mask

    def labels(self, ids: list[int], mask: list[int], where: str) -> list[int]:
        train_on = self.cfg.train_on
        if train_on == "all":
            return list(ids)
        if train_on == "last_assistant":  # the last run of assistant tokens
            end = max((i for i, v in enumerate(mask) if v), default=-1) + 1
            start = end
            while start > 0 and mask[start - 1]:
                start -= 1
            mask = [1 if start <= i < end else 0 for i in range(len(mask))]
        if not any(mask):
            raise InputError(f"{where}: the chat template marks no assistant tokens in this conversation")
        return [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]

    # ---- data ----------------------------------------------------------------------------------------------------

    def prepare(self, raw: DatasetDict) -> None:
        for split, ds in raw.items():
            for i, row in enumerate(ds):
                conversation(row, self.columns, f"data.{split} row {i}", self.cfg.system, training=True)

    def preprocess(self, raw: DatasetDict) -> DatasetDict:
        limit = self.max_length
        out = {}
        for split, ds in raw.items():
            rows: dict[str, list] = {"input_ids": [], "labels": [], "example_index": []}
            cut = 0
            conversations = []
            for i, row in enumerate(ds):
                where = f"data.{split} row {i}"
                messages = conversation(row, self.columns, where, self.cfg.system, training=True)
                ids, mask = self.render(messages, where)
                labels = self.labels(ids, mask, where)
                if len(ids) > limit:
                    cut += 1
                    ids, labels = ids[:limit], labels[:limit]
                rows["input_ids"].append(ids)
                rows["labels"].append(labels)
                rows["example_index"].append(i)
                conversations.append(messages)
            if cut:
                say(f"data.{split}: {cut} of {len(ds)} conversations cut at training.max_length={limit} tokens")
            rows["attention_mask"] = [[1] * len(x) for x in rows["input_ids"]]
            rows["length"] = [len(x) for x in rows["input_ids"]]
            if split == "train":
                rows.pop("example_index")
                encoded = Dataset.from_dict(rows)
                out[split] = self.pack(encoded) if self.cfg.packing else encoded
            else:
                out[split] = Dataset.from_dict(rows)
                self._eval[split] = Dataset.from_dict(
                    {"id": example_ids(ds), "messages": conversations}
                )
        return DatasetDict(out)

    def pack(self, encoded: Dataset) -> Dataset:
        """Conversations laid end to end, in order, into blocks of at most `training.max_length` tokens; a
        conversation never straddles two blocks. Positions restart at each conversation's start, whose first token
        scores nothing (alone it would be position 0, which no earlier token predicts)."""
        limit = self.max_length
        blocks: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        current: dict[str, list] = {k: [] for k in blocks}
        for ids, labels in zip(encoded["input_ids"], encoded["labels"], strict=True):
            if current["input_ids"] and len(current["input_ids"]) + len(ids) > limit:
                for k in blocks:
                    blocks[k].append(current[k])
                current = {k: [] for k in blocks}
            current["input_ids"] += ids
            current["labels"] += [IGNORE, *labels[1:]]
            current["position_ids"] += list(range(len(ids)))
        if current["input_ids"]:
            for k in blocks:
                blocks[k].append(current[k])
        blocks["length"] = [len(x) for x in blocks["input_ids"]]
        return Dataset.from_dict(blocks)

    def collator(self) -> ChatCollator:
        return ChatCollator(self.tokenizer.pad_token_id, self.padding, self.max_length)

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(
        self,
        model: torch.nn.Module,
        loader: Any,
        accelerator: Accelerator,
        split: str = "validation",
        records: list[dict] | None = None,
    ) -> dict[str, float]:
        head = separate_head(model, accelerator)

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            index = batch.pop("example_index")
            labels = batch.pop("labels")
            with accelerator.autocast():
                nll, aligned = token_nll(model, batch, labels, True, head)
            return {"index": index, "sums": nll.sum(1).double(), "counts": (aligned != -100).sum(1)}

        losses: dict[int, tuple[float, int]] = {}
        for out in gathered_outputs(model, loader, accelerator, forward):
            for i, s, n in zip(out["index"].tolist(), out["sums"].tolist(), out["counts"].tolist(), strict=True):
                losses[i] = (s, int(n))
        total, tokens = sum(s for s, _ in losses.values()), sum(n for _, n in losses.values())
        loss = total / max(tokens, 1)
        scores: dict[str, float] = {"eval_loss": loss, "perplexity": float(torch.tensor(loss).exp())}
        generated = self._generate_sample(accelerator.unwrap_model(model), split, accelerator)
        if generated:
            key = "exact_match" if self.cfg.answer_pattern else "rouge_l"
            scores[key] = sum(g["scores"][key] for g in generated.values()) / len(generated)
        if records is not None:
            ids = self._eval[split]["id"]
            for i in sorted(losses):
                s, n = losses[i]
                records.append({"id": ids[i], "loss": s / max(n, 1), "tokens": n, **generated.get(i, {})})
        return scores

    def _generate_sample(
        self, model: torch.nn.Module, split: str, accelerator: Accelerator
    ) -> dict[int, dict[str, Any]]:
        """Answers to the last user turn of the split's first `chat.eval_generate` conversations, each process
        generating for its share; per example the prompt, prediction, reference and score."""
        n = min(self.cfg.eval_generate, len(self._eval[split]))
        if not n:
            return {}
        conversations = self._eval[split]["messages"][:n]
        items = []
        for i, messages in enumerate(conversations):
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            items.append((i, messages[:last], messages[last]["content"]))
        with accelerator.split_between_processes(items) as mine:
            with accelerator.autocast():
                texts = self.respond(model, [m for _, m, _ in mine])
            local = [
                (i, {"prompt": m[-1]["content"], "prediction": t, "reference": ref, "scores": self.score(t, ref)})
                for (i, m, ref), t in zip(mine, texts, strict=True)
            ]
        return dict(gather_object(local))

    def final_answer(self, text: str) -> str:
        match = re.search(self.cfg.answer_pattern, text)
        return match.group(1).strip().replace(",", "") if match else ""

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        if self.cfg.answer_pattern:
            gold = self.final_answer(reference)
            return {"exact_match": float(bool(gold) and self.final_answer(prediction) == gold)}
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        return {"rouge_l": scorer.score(reference, prediction)["rougeL"].fmeasure}

    # ---- generation --------------------------------------------------------------------------------------------

    def generation_options(self, **sampling: Any) -> dict[str, Any]:
        return {
            "max_new_tokens": self.cfg.max_new_tokens,
            "eos_token_id": self.stop_ids or None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": False,
            **sampling,
        }

    @staticmethod
    def room(model: torch.nn.Module, prompt: int, max_new: int) -> tuple[int, int]:
        """(prompt tokens to keep, from its end; new tokens to generate) within a model's learned positions (GPT-2's
        256 in the chat recipe): a long prompt keeps its last tokens, and leaves at least half the window."""
        config = model.config
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not limit or prompt + max_new <= limit:
            return prompt, max_new
        keep = min(prompt, limit - min(max_new, limit // 2))
        return keep, max(1, min(max_new, limit - keep))

    @torch.no_grad()
    def respond(self, model: torch.nn.Module, conversations: list[list[dict]], **sampling: Any) -> list[str]:
        """The assistant's next message for each conversation (greedy unless `sampling` says otherwise)."""
        tokenizer = self.tokenizer
        prompts = [
            tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
            for m in conversations
        ]
        options = self.generation_options(**sampling)
        features = [{"input_ids": list(p)[-self.room(model, len(p), options["max_new_tokens"])[0] :]} for p in prompts]
        pad = tokenizer.pad_token_id
        out = [""] * len(prompts)

        def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            width = batch["input_ids"].shape[1]
            new = self.room(model, width, options["max_new_tokens"])[1]
            return {"new": model.generate(**batch, **{**options, "max_new_tokens": new})[:, width:]}

        def left_pad(rows: list[dict]) -> dict[str, torch.Tensor]:  # generation continues right after each prompt
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, width - len(r["input_ids"]) :] = torch.tensor(r["input_ids"])
                mask[i, width - len(r["input_ids"]) :] = 1
            return {"input_ids": ids, "attention_mask": mask}

        was_training = model.training
        for idx, result in batched_rows(model, features, left_pad, self.recipe.training.eval_batch, forward):
            for i, text in zip(idx, tokenizer.batch_decode(result["new"], skip_special_tokens=True), strict=True):
                out[i] = text.strip()
        model.train(was_training)
        return out

    def predict(self, model: torch.nn.Module, rows: list[dict]) -> list[dict]:
        conversations = [
            conversation(r, self.columns, f"input row {i}", self.cfg.system, training=False) for i, r in enumerate(rows)
        ]
        for i, messages in enumerate(conversations):
            if messages[-1]["role"] == "assistant":
                conversations[i] = messages[:-1]
        return [{"response": text} for text in self.respond(model, conversations)]

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def card_notes(self) -> list[str]:
        template = self.cfg.template or "the tokenizer's own"
        notes = [f"chat template: {template}, saved in tokenizer_config.json (`tokenizer.apply_chat_template` renders "
                 f"prompts as in training); loss on {self.cfg.train_on.replace('_', ' ')} tokens"
                 + (", conversations packed" if self.cfg.packing else "")]  # fmt: skip
        if self.new_token_ids:
            tokens = ", ".join(f"`{t}`" for t in self.tokenizer.convert_ids_to_tokens(list(self.new_token_ids)))
            notes.append(
                f"tokens added for the template: {tokens}; the embeddings were resized and their rows trained (in full "
                "fine-tuning with everything else; with LoRA as PEFT trainable tokens, saved in the adapter). A base "
                "model loaded without this tokenizer lacks them"
            )
        return notes

    def checkpoint_info(self) -> dict[str, Any]:
        return {"template_tokens_added": len(self.new_token_ids)}


class ChatCollator:
    """Right-pads input ids with the pad id and labels with -100; packed blocks carry `position_ids` (restarting per
    conversation), no attention mask and no cache, which is how transformers recognises packed sequences."""

    def __init__(self, pad_id: int, padding: Any, cap: int) -> None:
        self.pad_id, self.padding, self.cap = pad_id, padding, cap

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            return right_pad([r[key] for r in rows], value, self.padding, self.cap)

        batch = {"input_ids": pad("input_ids", self.pad_id), "labels": pad("labels", IGNORE)}
        if "position_ids" in rows[0]:
            # padding continues each row's last position, so it reads as part of the last conversation (it scores
            # nothing, and causal attention keeps real tokens from seeing it)
            width = batch["input_ids"].shape[1]

            def continued(positions: list[int]) -> list[int]:
                return positions + list(range(positions[-1] + 1, positions[-1] + 1 + width - len(positions)))

            batch["position_ids"] = torch.tensor([continued(r["position_ids"]) for r in rows])
            # transformers reads packed sequences from position_ids only without a cache, which models otherwise
            # create whenever config.use_cache is on, training or not
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = pad("attention_mask", 0)
        if "example_index" in rows[0]:
            batch["example_index"] = torch.tensor([r["example_index"] for r in rows], dtype=torch.long)
        return batch
