"""`hf-finetune chat`: talk to a chat run (or any HF causal-LM folder whose tokenizer has a chat template) in the
terminal, the reply streamed as it is generated and the conversation kept; or answer JSONL rows in batch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from hf_finetune.checkpoint import INFO_NAME, load_final
from hf_finetune.errors import InputError
from hf_finetune.recipe import recipe_from_dict
from hf_finetune.tasks import get_task
from hf_finetune.tasks.chat import ChatTask

HELP = "hf-finetune chat: type a message; /reset starts over, /exit (or an empty line, or Ctrl-D) ends"


def load_chat(path: str | Path) -> tuple[ChatTask, torch.nn.Module]:
    """The chat task (template, stop tokens, generation budget) and the model of a run or of a plain HF folder."""
    folder = Path(path)
    if any((c / INFO_NAME).exists() for c in (folder, folder / "model")):
        task, model, _, info = load_final(folder)
        if info["task"] != ChatTask.name:
            raise InputError(f"chat: {path} was trained for task {info['task']}, not {ChatTask.name}")
        return task, model.eval()
    if not (folder / "config.json").is_file():
        raise InputError(f"chat: {path} is neither a run's output_dir nor a model folder with config.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = get_task(recipe_from_dict({"task": ChatTask.name, "model": {"name_or_path": str(folder)}}), tokenizer)
    return task, AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()


def sampling_options(temperature: float, top_p: float, max_new_tokens: int | None) -> dict[str, Any]:
    if temperature < 0 or not 0 < top_p <= 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise InputError("chat: needs temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")
    options: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    return options


def answer_rows(task: ChatTask, model: torch.nn.Module, rows: list[dict], system: str | None,
                options: dict[str, Any]) -> list[str]:  # fmt: skip
    """The assistant's reply to each row (a `messages` list ending with the user, or a `prompt`)."""
    from hf_finetune.tasks.chat import conversation

    conversations = []
    for i, row in enumerate(rows):
        messages = conversation(row, task.columns, f"input row {i + 1}", system or task.cfg.system, training=False)
        conversations.append(messages[:-1] if messages[-1]["role"] == "assistant" else messages)
    return task.respond(model, conversations, **options)


def interactive(task: ChatTask, model: torch.nn.Module, system: str | None, options: dict[str, Any],
                stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:  # fmt: skip
    tokenizer = task.tokenizer
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(HELP, file=sys.stderr)
    device = next(model.parameters()).device
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        text = line.strip()
        if not line or text in ("", "/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(device)  # fmt: skip
        generation = task.generation_options(**options)
        keep, generation["max_new_tokens"] = task.room(model, inputs["input_ids"].shape[1], generation["max_new_tokens"])
        inputs = {k: v[:, -keep:] for k, v in inputs.items()}  # a long conversation keeps its latest turns
        stdout.write("assistant> ")
        stdout.flush()
        with torch.no_grad():
            out = model.generate(**inputs, streamer=streamer, **generation)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
