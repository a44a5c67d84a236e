"""`task: chat`: templates mark exactly the assistant tokens, packing is exact (a packed block's loss is the sum of
its conversations' losses), every method trains and reloads, template tokens train and the output folder chats with
plain transformers, generation-based evaluation, `hf-finetune chat`, and bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from test_bad_inputs import expect_exit_2
from test_engine import check_trained_parameters, train_capturing
from test_predictions import read_predictions
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_finetune.checkpoint import load_final
from hf_finetune.cli import main
from hf_finetune.engine import train
from hf_finetune.losses import token_losses
from hf_finetune.recipe import apply_override, recipe_from_dict
from hf_finetune.scratch import Dims, write_scratch_model
from hf_finetune.tasks import get_task
from hf_finetune.tasks.chat import IGNORE, TEMPLATES

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = "zero one two three four five six seven eight nine".split()


def sums(n: int, seed: int, turns: int = 1, system: bool = False) -> list[dict]:
    """Conversations asking for small sums, answered in GSM8K's shape (`#### answer`): learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "you add numbers"}] if system else []
        for _ in range(turns):
            a, b = rng.randrange(5), rng.randrange(5)
            messages += [{"role": "user", "content": f"what is {NUMBERS[a]} plus {NUMBERS[b]}"},
                         {"role": "assistant", "content": f"{NUMBERS[a]} and {NUMBERS[b]} make #### {NUMBERS[a + b]}"}]  # fmt: skip
        rows.append({"idx": i, "messages": messages})
    return rows


def corpus() -> list[str]:
    return [m["content"] for r in sums(200, 0, turns=2, system=True) for m in r["messages"]] + ["hello there"]


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-models")
    dims = Dims(layers=2, d_model=32, heads=4, max_positions=128, vocab_size=400, dropout=0.0)
    return {arch: write_scratch_model(root / arch, arch, corpus(), dims) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def warm_gpt2(chat_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 after some language modelling on the conversations' text (no template): a pretrained base, as
    the chat recipe's, on which methods that freeze the body learn the chat format."""
    root = tmp_path_factory.mktemp("warm-chat")
    write_jsonl(root / "train.jsonl", [{"text": t} for t in corpus()])
    raw = {"task": "causal_lm", "model": {"name_or_path": str(chat_models["gpt2"])},
           "data": {"train": {"path": str(root / "train.jsonl")}}, "lm": {"block_size": 64}, "method": {"name": "full"},
           "training": {"max_steps": 60, "batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.0}, "output_dir": str(root / "run")}  # fmt: skip
    train(recipe_from_dict(raw))
    return root / "run"


@pytest.fixture
def chat_data(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", sums(96, 1) + sums(32, 2, turns=2, system=True))
    write_jsonl(tmp_path / "validation.jsonl", sums(16, 3))
    return tmp_path


def chat_recipe(model: Path, data: Path, out: Path, **extra: object) -> dict:
    raw: dict = {
        "task": "chat",
        "model": {"name_or_path": str(model)},
        "data": {"train": {"path": str(data / "train.jsonl")}, "validation": {"path": str(data / "validation.jsonl")}},
        "chat": {"template": "zephyr"},
        "method": {"name": "full"},
        "training": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "max_length": 96, "warmup_ratio": 0.0,
                     "logging_every": 2},  # fmt: skip
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


def chat_task(model: Path, tmp_path: Path, **extra: object):
    recipe = recipe_from_dict(chat_recipe(model, tmp_path, tmp_path / "run", **extra))
    return get_task(recipe, AutoTokenizer.from_pretrained(model))


def labelled_text(task, ids: list[int], labels: list[int]) -> list[str]:
    """The labelled stretches, decoded one by one."""
    spans, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == i
            current.append(i)
        elif current:
            spans.append(task.tokenizer.decode(current))
            current = []
    if current:
        spans.append(task.tokenizer.decode(current))
    return spans


END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "<|endoftext|>"}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("marked", [True, False])
def test_only_assistant_content_and_its_end_of_turn_carry_loss(
    arch: str, template: str, marked: bool, chat_models: dict[str, Path], tmp_path: Path
) -> None:
    task = chat_task(chat_models[arch], tmp_path, **{"chat.template": template})
    if not marked:  # a tokenizer's own template without {% generation %}: turn-by-turn prefixes find the same
        tokenizer = task.tokenizer
        tokenizer.chat_template = TEMPLATES[template].replace("{% generation %}", "").replace("{% endgeneration %}", "")
        tokenizer.save_pretrained(tmp_path / "own")
        recipe = recipe_from_dict(chat_recipe(chat_models[arch], tmp_path, tmp_path / "run", **{"chat.template": None}))
        task = get_task(recipe, AutoTokenizer.from_pretrained(tmp_path / "own"))
        assert not task.marked and not task.new_token_ids
    end = END[template] if template != "zephyr" else task.tokenizer.eos_token
    for system in (False, True):
        for turns in (1, 3):
            messages = sums(1, 7, turns=turns, system=system)[0]["messages"]
            ids, mask = task.render(messages, "row 0")
            labels = task.labels(ids, mask, "row 0")
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            # label by label: each assistant turn's content and end-of-turn token, nothing of the other turns
            assert labelled_text(task, ids, labels) == [a + end for a in answers]
            rendered = task.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            assert ids == list(rendered)


def test_train_on_all_and_last_assistant(chat_models: dict[str, Path], tmp_path: Path) -> None:
    messages = sums(1, 7, turns=3, system=True)[0]["messages"]
    task = chat_task(chat_models["gpt2"], tmp_path, **{"chat.template": "chatml", "chat.train_on": "last_assistant"})
    ids, mask = task.render(messages, "row 0")
    assert labelled_text(task, ids, task.labels(ids, mask, "row 0")) == [messages[-1]["content"] + "<|im_end|>"]
    task = chat_task(chat_models["gpt2"], tmp_path, **{"chat.template": "chatml", "chat.train_on": "all"})
    assert task.labels(ids, mask, "row 0") == ids


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_block_scores_the_sum_of_its_conversations(
    arch: str, chat_models: dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    task = chat_task(chat_models[arch], tmp_path, **{"chat.template": "chatml", "chat.packing": True,
                                                      "chat.train_on": "all", "training.max_length": 128})  # fmt: skip
    model = task.load_model(str(chat_models[arch])).eval()
    rows = sums(12, 5) + sums(4, 6, turns=2)
    encoded = []
    for i, row in enumerate(rows):
        ids, mask = task.render(row["messages"], f"row {i}")
        encoded.append({"input_ids": ids, "labels": task.labels(ids, mask, f"row {i}")})
    from datasets import Dataset

    packed = task.pack(Dataset.from_list(encoded))
    assert len(packed) < len(rows)  # several conversations per block
    assert sum(len(b) for b in packed["input_ids"]) == sum(len(e["input_ids"]) for e in encoded)
    collate = task.collator()
    with torch.no_grad():
        batch = collate([dict(packed[i]) for i in range(len(packed))])
        assert "attention_mask" not in batch
        labels = batch.pop("labels")
        packed_sums, packed_counts = token_losses(model(**batch).logits, labels, shift=True)
        one_by_one = [token_losses(model(input_ids=torch.tensor([e["input_ids"]])).logits,
                                   torch.tensor([e["labels"]]), shift=True) for e in encoded]  # fmt: skip
    assert int(packed_counts.sum()) == sum(int(c.sum()) for _, c in one_by_one)
    torch.testing.assert_close(packed_sums.sum(), sum(s.sum() for s, _ in one_by_one), rtol=1e-5, atol=1e-4)
    # the naive concatenation (positions running on, attention across conversations) scores differently
    with torch.no_grad():
        naive, _ = token_losses(model(input_ids=batch["input_ids"]).logits, labels, shift=True)
    assert abs(float(naive.sum() - packed_sums.sum())) > 1e-2


# what each method trains on a decoder (PEFT's prefix tuning keeps its prefixes in a prompt encoder)
TRAINED = {"full": ("",), "lora": ("lora_",), "adalora": ("lora_",), "ia3": ("ia3_",), "prefix": ("prompt_encoder",),
           "prompt": ("prompt_encoder",)}  # fmt: skip
LRS = {"full": 1e-2, "lora": 2e-2, "adalora": 5e-2, "ia3": 5e-2, "prefix": 3e-2, "prompt": 5e-2}


@pytest.mark.parametrize("method", list(LRS))
def test_every_method_trains_and_reloads(method: str, warm_gpt2: Path, chat_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = chat_recipe(warm_gpt2, chat_data, out, **{"method.name": method, "training.lr": LRS[method]})
    results, model, before = train_capturing(raw)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses
    check_trained_parameters(method, model, before, TRAINED[method])
    _, reloaded, tokenizer, _ = load_final(out)
    inputs = tokenizer.apply_chat_template(sums(2, 9)[0]["messages"], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, model.eval()(**inputs).logits)
    assert results["metrics"]["perplexity"] > 1


def test_template_tokens_train_with_lora_and_the_folder_chats_with_plain_transformers(
    chat_models: dict[str, Path], chat_data: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    base = chat_models["gpt2"]
    out = tmp_path / "run"
    raw = chat_recipe(base, chat_data, out, **{"chat.template": "chatml", "method.name": "lora", "training.lr": 1e-2})
    train(recipe_from_dict(raw))
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template == TEMPLATES["chatml"]
    new = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert min(new) >= len(AutoTokenizer.from_pretrained(base))
    # the ids plain transformers renders are those hf-finetune trained on
    task, ours, our_tokenizer, _ = load_final(out)
    messages = sums(1, 9)[0]["messages"]
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == task.render(
        messages, "row"
    )[0]
    card = (out / "model" / "README.md").read_text()
    assert "`<|im_start|>`, `<|im_end|>`" in card and "trainable tokens" in card
    plain = AutoPeftModelForCausalLM.from_pretrained(out / "model").eval()
    inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = plain(**inputs).logits
        torch.testing.assert_close(logits, ours.eval()(**inputs).logits)
    # the new tokens' rows trained: they score differently from the freshly resized base model's
    fresh = AutoModelForCausalLM.from_pretrained(base)
    fresh.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).logits[..., new], logits[..., new], atol=1e-3)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    generated = plain.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_eval_generate_scores_the_final_answer_and_saves_the_generations(
    warm_gpt2: Path, chat_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = chat_recipe(warm_gpt2, chat_data, out, **{
        "chat.eval_generate": 8, "chat.answer_pattern": "####\\s*(\\w+)", "chat.max_new_tokens": 12,
        "training.lr": 1e-2,
    })  # fmt: skip
    results = train(recipe_from_dict(raw))
    assert results["primary_metric"] == "exact_match"
    rows = read_predictions(out, "validation")
    assert len(rows) == 16 and [r["id"] for r in rows] == list(range(16))
    generated = [r for r in rows if "prediction" in r]
    assert len(generated) == 8
    assert all(r["reference"].startswith(r["prompt"].split()[2]) for r in generated)
    mean = sum(r["scores"]["exact_match"] for r in generated) / 8
    assert mean == pytest.approx(results["metrics"]["exact_match"])
    for r in generated:  # the final answer after ####, compared as text
        answer = r["prediction"].split("####")[-1].split()[:1] if "####" in r["prediction"] else None
        assert r["scores"]["exact_match"] == float(answer == r["reference"].split("####")[-1].split()[:1])
    loss = sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert loss == pytest.approx(results["metrics"]["eval_loss"], rel=1e-5)


def test_chat_command_answers_from_input_rows_and_on_a_terminal(
    chat_models: dict[str, Path], chat_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(recipe_from_dict(chat_recipe(chat_models["gpt2"], chat_data, out, **{"training.max_steps": 4})))
    rows = tmp_path / "in.jsonl"
    write_jsonl(rows, [{"messages": sums(1, 4)[0]["messages"][:1]}, {"prompt": "what is two plus two"}])
    assert main(["chat", str(out), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                 "--max-new-tokens", "6"]) == 0  # fmt: skip
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(isinstance(a["response"], str) for a in answers)
    assert answers[1]["prompt"] == "what is two plus two"
    # interactive: two turns then /exit, the conversation kept between them
    done = subprocess.run(
        [sys.executable, "-m", "hf_finetune", "chat", str(out), "--max-new-tokens", "4", "--system", "be brief"],
        input="what is one plus one\nand two plus two\n/exit\n", capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("assistant>") == 2


def test_chat_bad_inputs_exit_2_naming_the_row(
    chat_models: dict[str, Path], chat_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "recipe.yaml"

    def run(rows: list[dict], *extra: str) -> None:
        write_jsonl(chat_data / "train.jsonl", rows)
        recipe.write_text(yaml.safe_dump(chat_recipe(chat_models["gpt2"], chat_data, tmp_path / "run")))
        return ["train", str(recipe), *extra]

    good = sums(4, 1)
    no_answer = [*good, {"messages": [{"role": "user", "content": "hi"}]}]
    expect_exit_2(run(no_answer), capsys, ["data.train row 4", "no assistant turn"])
    odd_role = [*good, {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    expect_exit_2(run(odd_role), capsys, ["data.train row 4", "role 'robot'"])
    unmarked = tmp_path / "reversed.jinja"  # renders the conversation newest first: no turn keeps its prefix
    unmarked.write_text("{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    expect_exit_2(run(sums(4, 2, turns=2), f"chat.template={unmarked}"), capsys, ["data.train row 0",
                  "does not mark assistant turns"])  # fmt: skip
    expect_exit_2(run(good, "chat.template=chatml", "method.name=ia3"), capsys, ["ia3 cannot train the 2 tokens"])
    expect_exit_2(run(good, "chat.template=vicuna"), capsys, ["'chat.template'", "vicuna"])
    expect_exit_2(run(good, "chat.packing=true", "method.name=prompt"), capsys, ["'chat.packing'", "prompt"])
    assert not (tmp_path / "run").exists()


def test_a_prompt_longer_than_the_positions_keeps_its_end_and_still_gets_an_answer(
    chat_models: dict[str, Path], tmp_path: Path
) -> None:
    from hf_finetune.tasks.chat import ChatTask

    task = chat_task(chat_models["gpt2"], tmp_path, **{"chat.max_new_tokens": 100})
    model = task.load_model(str(chat_models["gpt2"])).eval()  # 128 learned positions
    assert ChatTask.room(model, 20, 100) == (20, 100)
    assert ChatTask.room(model, 100, 100) == (64, 64)  # half the window each
    assert ChatTask.room(model, 100, 10) == (100, 10)
    long = [{"role": "user", "content": " ".join(["what is one plus two"] * 60)}]
    (answer,) = task.respond(model, [long])
    assert isinstance(answer, str)
