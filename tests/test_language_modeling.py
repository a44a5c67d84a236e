"""Language modelling: packing, masking, perplexity, from-scratch pretraining, generation, methods, and the
pretrain -> fine-tune chain, all on tiny models built by `make-tiny`'s builder."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_finetune.checkpoint import load_final
from hf_finetune.cli import main
from hf_finetune.engine import train
from hf_finetune.recipe import apply_override, recipe_from_dict
from hf_finetune.sampling import eval_loader
from hf_finetune.scratch import Dims, write_scratch_model
from hf_finetune.tasks import get_task
from tests.conftest import write_jsonl
from tests.test_predictions import check_predictions

ANIMALS = "cat dog bird fox horse".split()
PLACES = "mat rug hill road field".split()


def story(n: int, seed: int) -> list[str]:
    """A repetitive little language: a model that learns it predicts most tokens with near certainty."""
    rng = random.Random(seed)
    return [
        f"the {rng.choice(ANIMALS)} sat on the {rng.choice(PLACES)} and the {rng.choice(ANIMALS)} ran home ."
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dims = Dims(layers=2, d_model=32, heads=4, max_positions=64, vocab_size=200, dropout=0.0)
    return write_scratch_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", story(300, 0), dims)


@pytest.fixture(scope="session")
def tiny_bert_mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dims = Dims(layers=2, d_model=32, heads=4, max_positions=64, vocab_size=200, dropout=0.0)
    return write_scratch_model(tmp_path_factory.mktemp("tiny-bert-mlm"), "bert", story(300, 0), dims)


@pytest.fixture
def lm_data(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in story(160, 1)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in story(24, 2)])
    return tmp_path


def lm_recipe(model: Path | None, data: Path, out: Path, task: str = "causal_lm", **extra: object) -> dict:
    raw: dict = {
        "task": task,
        "model": {"name_or_path": str(model)},
        "data": {
            "train": {"path": str(data / "train.jsonl")},
            "validation": {"path": str(data / "validation.jsonl")},
        },
        "lm": {"block_size": 32},
        "method": {"name": "full"},
        "training": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "logging_every": 5},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


def logged_losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


# ---- packing and masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("join", ["newline", "eos"])
def test_packing_keeps_every_token_once_in_full_blocks(tiny_gpt2: Path, join: str, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    rng = random.Random(0)
    texts = [" ".join(rng.choices(story(5, i)[0].split(), k=rng.randint(0, 30))) for i in range(150)]
    recipe = recipe_from_dict(
        lm_recipe(tiny_gpt2, tmp_path, tmp_path, **{"lm.join": join, "lm.block_size": 16})
    )
    task = get_task(recipe, tokenizer)
    packed = task.preprocess(DatasetDict({"train": Dataset.from_dict({"text": texts})}))["train"]
    blocks = packed["input_ids"]
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert packed["length"] == [len(b) for b in blocks]
    eos = tokenizer.eos_token_id
    if join == "newline":
        expected = [i for t in texts for i in tokenizer(t + "\n", add_special_tokens=False)["input_ids"]]
        assert tokenizer.decode([i for b in blocks for i in b]) == "".join(t + "\n" for t in texts)
    else:
        expected = [
            i for t in texts if t for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
        ]
    assert [i for b in blocks for i in b] == expected


def test_mlm_masks_about_the_probability_and_never_special_tokens(
    tiny_bert_mlm: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    recipe = recipe_from_dict(lm_recipe(tiny_bert_mlm, tmp_path, tmp_path, task="masked_lm"))
    task = get_task(recipe, tokenizer)
    packed = task.preprocess(DatasetDict({"train": Dataset.from_dict({"text": story(400, 3)})}))[
        "train"
    ]
    collate = task.collator()
    torch.manual_seed(0)
    batch = collate([packed[i] for i in range(len(packed))])
    original = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(b) for b in packed["input_ids"]], batch_first=True, padding_value=tokenizer.pad_token_id
    )
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    selected = batch["labels"] != -100
    assert not (selected & special).any(), "special tokens ([CLS], [SEP], [PAD]) are never selected"
    share = selected.sum().item() / (~special).sum().item()
    assert abs(share - 0.15) < 0.02, share
    assert torch.equal(batch["labels"][selected], original[selected]), "labels are the original tokens"
    replaced = batch["input_ids"][selected] == tokenizer.mask_token_id
    assert 0.75 < replaced.float().mean().item() < 0.85, "80% of the selected tokens become [MASK]"


def test_mlm_evaluation_masks_are_fixed(tiny_bert_mlm: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    recipe = recipe_from_dict(lm_recipe(tiny_bert_mlm, tmp_path, tmp_path, task="masked_lm"))
    raw = DatasetDict({"validation": Dataset.from_dict({"text": story(50, 4)})})
    first = get_task(recipe, tokenizer).preprocess(raw)["validation"]
    again = get_task(recipe, tokenizer).preprocess(raw)["validation"]
    assert first["labels"] == again["labels"] and first["input_ids"] == again["input_ids"]
    assert any(label != -100 for row in first["labels"] for label in row)


# ---- perplexity -----------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_total_loss_over_total_tokens(tiny_gpt2: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    recipe = recipe_from_dict(lm_recipe(tiny_gpt2, tmp_path, tmp_path, **{"lm.block_size": 24}))
    task = get_task(recipe, tokenizer)
    encoded = task.preprocess(DatasetDict({"validation": Dataset.from_dict({"text": story(37, 5)})}))
    blocks = encoded["validation"]["input_ids"]
    assert len(blocks[-1]) < 24, "a short last block makes a mean of batch means differ"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for block in blocks:  # by hand, one block at a time, no padding
            ids = torch.tensor([block])
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += len(block) - 1
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(eval_loader(encoded["validation"], 5, task.collator()))
    scores = task.evaluate(accelerator.prepare(model), loader, accelerator)
    assert scores["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


# ---- pretraining from scratch and generation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT pretrained from scratch (tokenizer trained on its corpus) for 200 steps."""
    root = tmp_path_factory.mktemp("pretrain")
    write_jsonl(root / "train.jsonl", [{"text": t} for t in story(400, 1)])
    write_jsonl(root / "validation.jsonl", [{"text": t} for t in story(40, 2)])
    raw = lm_recipe(None, root, root / "run", **{
        "model.name_or_path": "tiny-gpt-from-scratch",
        "model.from_scratch": {"architecture": "gpt2", "layers": 2, "d_model": 32, "heads": 4, "max_positions": 64,
                               "vocab_size": 200, "dropout": 0.0},
        "training.max_steps": 200, "training.batch_size": 16, "training.eval_at_start": True,
    })  # fmt: skip
    train(recipe_from_dict(raw))
    return root / "run"


def test_pretraining_from_scratch_lowers_perplexity(pretrained_run: Path) -> None:
    results = json.loads((pretrained_run / "results.json").read_text())
    before, after = results["initial_metrics"]["perplexity"], results["metrics"]["perplexity"]
    assert before > 50 * after, (
        before,
        after,
    )  # untrained ~ vocabulary size; the little language is near certain
    assert after < 3
    assert (pretrained_run / "init" / "tokenizer.json").is_file(), (
        "the trained tokenizer is saved with the init"
    )
    model = AutoModelForCausalLM.from_pretrained(pretrained_run / "model")  # a plain HF folder
    assert model.config.n_layer == 2 and model.config.n_embd == 32


def test_generation_is_seeded_and_respects_max_new_tokens(
    pretrained_run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", str(pretrained_run), "--prompt", "the cat sat on", "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out.strip()
    assert greedy.startswith("the cat sat on the ")  # the learned language continues
    sampled = []
    for seed in (7, 7, 8):
        main(["generate", str(pretrained_run), "--prompt", "the dog", "--temperature", "1.5", "--seed", str(seed),
              "--max-new-tokens", "12"])  # fmt: skip
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1], "the same seed gives the same text"
    _, model, tokenizer, _ = load_final(pretrained_run)
    from hf_finetune.tasks.language_modeling import generate

    for n in (1, 5):
        ids = tokenizer(
            generate(model, tokenizer, ["the bird"], max_new_tokens=n)[0], add_special_tokens=False
        )
        assert 1 <= len(ids["input_ids"]) <= n


def test_generate_batch_mode_keeps_row_order(pretrained_run: Path, tmp_path: Path) -> None:
    prompts = ["the", "the horse sat on the road and the", "the fox"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    assert main(["generate", str(pretrained_run), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                 "--max-new-tokens", "4", "--batch-size", "2"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    _, model, tokenizer, _ = load_final(pretrained_run)
    from hf_finetune.tasks.language_modeling import generate

    alone = [generate(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
    assert [r["generated"] for r in rows] == alone, "batched (left-padded) greedy equals one at a time"


# ---- methods ----------------------------------------------------------------------------------------------------


def shifted_story(n: int, seed: int) -> list[str]:
    """The pretraining language with new verbs: what continued training has to adapt a pretrained model to."""
    return [t.replace("sat on", "flew over").replace("ran home", "swam away") for t in story(n, seed)]


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "prefix", "prompt"])
def test_causal_lm_methods_adapt_and_reload(method: str, pretrained_run: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in shifted_story(160, 1)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in shifted_story(24, 2)])
    lr = {"full": 3e-3, "lora": 1e-2, "adalora": 2e-2, "prefix": 1e-2, "prompt": 1e-1}[method]
    raw = lm_recipe(pretrained_run, tmp_path, tmp_path / "run", **{
        "method.name": method, "training.lr": lr, "training.max_steps": 40, "training.eval_at_start": True,
    })  # fmt: skip
    results = train(recipe_from_dict(raw))
    before, after = results["initial_metrics"]["perplexity"], results["metrics"]["perplexity"]
    assert after < 0.8 * before, (before, after)
    if method != "full":
        assert results["trainable_params"] < results["total_params"]
    from hf_finetune.evaluation import evaluate_checkpoint

    # the saved checkpoint, reloaded (base + adapter for PEFT methods), scores exactly what the trained model did
    reloaded = evaluate_checkpoint(recipe_from_dict(raw), str(tmp_path / "run"))
    assert reloaded["metrics"]["perplexity"] == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_masked_lm_methods_learn(method: str, tiny_bert_mlm: Path, lm_data: Path, tmp_path: Path) -> None:
    lr = {"full": 3e-3, "lora": 1e-2, "adalora": 2e-2}[method]
    raw = lm_recipe(tiny_bert_mlm, lm_data, tmp_path / "run", task="masked_lm",
                    **{"method.name": method, "training.lr": lr, "training.max_steps": 40,
                       "training.eval_at_start": True})  # fmt: skip
    results = train(recipe_from_dict(raw))
    assert results["metrics"]["perplexity"] < 0.8 * results["initial_metrics"]["perplexity"], results[
        "metrics"
    ]


# ---- the chain: a pretraining run's output_dir as any recipe's model --------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_pretrained_gpt_fine_tunes_on_classification(
    method: str, pretrained_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    from tests.conftest import tiny_recipe

    raw = tiny_recipe(
        pretrained_run, data_dir, tmp_path / "cls", **{"method.name": method, "training.epochs": 2}
    )
    raw["training"]["lr"] = {"full": 3e-3, "lora": 1e-2, "prefix": 1e-2}[method]
    results = train(recipe_from_dict(raw))
    losses = logged_losses(tmp_path / "cls")
    assert losses[-1] < losses[0], losses
    assert results["metrics"]["accuracy"] > 0.5
    _, model, _, info = load_final(tmp_path / "cls")
    assert (
        type(model.get_base_model() if method != "full" else model).__name__
        == "GPT2ForSequenceClassification"
    )


def test_whole_word_masking_selects_whole_words(tiny_bert_mlm: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    recipe = recipe_from_dict(
        lm_recipe(tiny_bert_mlm, tmp_path, tmp_path, task="masked_lm", **{"lm.whole_word_mask": True})
    )
    task = get_task(recipe, tokenizer)
    texts = ["the horsefield birdroad foxmat " * 3 for _ in range(40)]  # long words: several word pieces each
    packed = task.preprocess(DatasetDict({"train": Dataset.from_dict({"text": texts})}))["train"]
    torch.manual_seed(0)
    batch = task.collator()([packed[i] for i in range(len(packed))])
    selected = batch["labels"] != -100
    pieces = [
        tokenizer.convert_ids_to_tokens(row) for row in torch.where(selected, batch["labels"], 0).tolist()
    ]
    assert selected.any()
    for row, sel in zip(pieces, selected.tolist(), strict=True):
        for i in range(1, len(row)):
            if row[i].startswith("##") and sel[i - 1] != sel[i] and row[i] != "[PAD]":
                pytest.fail(f"a word piece was masked apart from its word: {row[i - 1 : i + 1]}")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "roberta", "t5", "bart", "marian"])
def test_make_tiny_writes_a_loadable_model_and_tokenizer(arch: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    out = tmp_path / arch
    assert main(["make-tiny", "--arch", arch, "--output", str(out), "--vocab-size", "300"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "It was the best of times"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip().lower() == text.lower()
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == arch and (config.pad_token_id is not None or arch in ("gpt2", "llama"))
    model = AutoModel.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (out / "model.safetensors").is_file()


def test_language_modeling_bad_inputs(tiny_gpt2: Path, lm_data: Path, tmp_path: Path, capsys) -> None:
    def run(**extra: object) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(json.dumps(lm_recipe(tiny_gpt2, lm_data, tmp_path / "out", **extra)))
        assert main(["train", str(path)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-finetune: error")]
        assert len(err) == 1, err
        return err[0]

    assert "lm.block_size: 100" in run(**{"lm.block_size": 100})  # the tiny model has 64 positions
    assert "data.columns.text='body'" in run(**{"data.columns.text": "body"})
    assert "no mask token" in run(task="masked_lm")
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_generation_keeps_its_prompt_with_the_cache(
    method: str, pretrained_run: Path, tmp_path: Path, capsys
) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in shifted_story(64, 1)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in shifted_story(8, 2)])
    lr = {"prefix": 1e-2, "prompt": 1e-1}[method]
    raw = lm_recipe(pretrained_run, tmp_path, tmp_path / "run", **{"method.name": method, "training.lr": lr,
                                                                     "training.max_steps": 20})  # fmt: skip
    train(recipe_from_dict(raw))
    assert main(["generate", str(tmp_path / "run"), "--prompt", "the fox", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    _, model, tokenizer, _ = load_final(tmp_path / "run")
    from hf_finetune.tasks.language_modeling import generate

    # the command prints the prompt and the continuation the run's model generates for it
    continuation = generate(model, tokenizer, ["the fox"], max_new_tokens=8)[0]
    assert continuation and printed == "the fox" + continuation

    prompts = ["the cat flew over the", "the dog", "the horse flew"]
    cached = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, use_cache=False) == cached
    for prompt, text in zip(prompts, cached, strict=True):
        seq = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():  # greedy by hand: one full forward pass (virtual tokens included) per new token
            for _ in range(8):
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert tokenizer.decode(seq[0]) == prompt + text


# ---- the loop's own LM behaviour ----------------------------------------------------------------------------------


def test_label_smoothing_through_the_loop_is_the_smoothed_token_loss(
    tiny_gpt2: Path, lm_data: Path, tmp_path: Path
) -> None:
    """The first logged loss of a run with label smoothing is the smoothed cross-entropy of the first batch under the
    initial weights (the tiny model has no dropout), not the model's own unsmoothed loss."""
    import hf_finetune.engine as engine
    from hf_finetune.losses import smoothed_token_loss

    raw = lm_recipe(tiny_gpt2, lm_data, tmp_path / "run", **{
        "training.label_smoothing": 0.1, "training.max_steps": 2, "training.logging_every": 1,
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    run.train_loader.set_epoch(0)
    batch = next(iter(run.train_loader))
    with torch.no_grad():
        out = run.model(**batch)
    expected = smoothed_token_loss(out.logits, batch["labels"], shift=True, label_smoothing=0.1).item()
    engine.finish(run, engine.fit(run))
    first = logged_losses(tmp_path / "run")[0]
    assert first == pytest.approx(expected, rel=1e-5)
    # near-uniform initial predictions: smoothing moves the loss little, but well past the tolerance above
    assert first != pytest.approx(out.loss.item(), rel=1e-5)


def test_best_checkpoint_by_perplexity_is_the_lowest(tiny_gpt2: Path, lm_data: Path, tmp_path: Path) -> None:
    """Perplexity is lower-is-better (the task says so): rotation keeps the checkpoint with the lowest one."""
    out = tmp_path / "run"
    raw = lm_recipe(tiny_gpt2, lm_data, out, **{
        "training.max_steps": 12, "training.eval_every": 2, "training.save_every": 2,
        "training.save_total_limit": 1, "training.best_metric": "perplexity", "training.lr": 1e-2,
    })  # fmt: skip
    results = train(recipe_from_dict(raw))
    check_predictions(out, {"validation": None})
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r["validation/perplexity"] for r in log if "validation/perplexity" in r and r["step"] < 12}
    assert len(set(scored.values())) > 1, scored
    best_step = min(scored, key=scored.get)
    assert results["best_checkpoint"] == {"checkpoint": f"step_{best_step:08d}", "score": scored[best_step]}
    assert (out / "checkpoints" / f"step_{best_step:08d}").is_dir()


def test_fill_masks_in_batches_equal_one_text_at_a_time(tiny_bert_mlm: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from hf_finetune.tasks.language_modeling import fill_masks

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_mlm).eval()
    m = tokenizer.mask_token
    texts = [f"the cat {m} on the {m} and", f"the {m} ran home .", f"{m} dog"]
    batched = fill_masks(model, tokenizer, texts, top_k=3, batch_size=2)
    for text, got in zip(texts, batched, strict=True):
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        positions = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
        assert len(got["fills"]) == len(positions) == text.count(m)
        for pos, fills in zip(positions, got["fills"], strict=True):
            top = logits[pos].softmax(-1).topk(3)
            assert [f["token"] for f in fills] == [tokenizer.decode([i]).strip() for i in top.indices.tolist()]
            assert [f["probability"] for f in fills] == pytest.approx(top.values.tolist(), abs=1e-5)
