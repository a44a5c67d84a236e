"""Translation and summarization: every model family x method trains with falling loss, generation survives a
save/reload, labels are masked where they should be, and the metric modules equal the libraries called directly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from hf_finetune.checkpoint import load_final
from hf_finetune.cli import main
from hf_finetune.engine import train
from hf_finetune.metrics import load_metric
from hf_finetune.recipe import apply_override, recipe_from_dict
from hf_finetune.scratch import Dims, write_scratch_model
from hf_finetune.tasks import get_task
from tests.conftest import write_jsonl
from tests.test_predictions import check_predictions, rows_in

LEXICON = {"the": "der", "cat": "katze", "dog": "hund", "sees": "sieht", "eats": "isst", "big": "grosse",
           "small": "kleine", "bird": "vogel", "fish": "fisch", "and": "und", "red": "rote", "old": "alte"}  # fmt: skip


def pairs(n: int, seed: int) -> list[dict]:
    """Word-by-word 'translation' with a fixed lexicon: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    words = list(LEXICON)
    rows = []
    for _ in range(n):
        src = rng.choices(words, k=rng.randint(3, 7))
        rows.append({"en": " ".join(src), "de": " ".join(LEXICON[w] for w in src)})
    return rows


def corpus() -> list[str]:
    return [t for r in pairs(400, 0) for t in (r["en"], r["de"])]


DIMS = Dims(layers=2, d_model=32, heads=4, max_positions=128, vocab_size=160, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq-models")
    return {
        arch: write_scratch_model(root / arch, arch, corpus(), DIMS)
        for arch in ("t5", "bart", "gpt2", "bert")
    }


def write_mt_data(folder: Path) -> Path:
    write_jsonl(folder / "train.jsonl", pairs(192, 1))
    validation = pairs(16, 2)
    for row in validation:  # a second, worse reference: scoring must use both
        row["references"] = [row["de"], row["de"].replace("der", "die")]
    write_jsonl(folder / "validation.jsonl", validation)
    return folder


@pytest.fixture
def mt_data(tmp_path: Path) -> Path:
    return write_mt_data(tmp_path)


@pytest.fixture(scope="session")
def warm_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny encoder-decoder and decoder-only model after 40 steps of full fine-tuning on the lexicon: methods
    that freeze the body (prompt tuning, IA3) need a model whose features carry the task, as a real checkpoint's do."""
    root = tmp_path_factory.mktemp("warm")
    data = write_mt_data(root)
    warm = {}
    for family in ("t5", "bart", "gpt2"):
        raw = mt_recipe(
            tiny_models[family], data, root / family, **{"training.max_steps": 40, "training.lr": 5e-3}
        )
        train(recipe_from_dict(raw))
        warm[family] = root / family  # a run's output_dir is a model.name_or_path
    return warm


def mt_recipe(model: Path, data: Path, out: Path, **extra: object) -> dict:
    raw: dict = {
        "task": "translation",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": {"path": str(data / "train.jsonl")},
            "validation": {"path": str(data / "validation.jsonl")},
            "columns": {"source": "en", "target": "de", "references": "references"},
        },
        "method": {"name": "full"},
        "seq2seq": {"num_beams": 1, "max_target_length": 24},
        "training": {
            "max_steps": 30,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "logging_every": 5,
            "max_length": 24,
        },  # fmt: skip
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


FAMILIES = {
    "t5": {},
    "bart": {},
    "gpt2": {},
    "bert2bert": {"model.encoder_decoder_from": "BERT"},
}
LR = {"full": 3e-3, "lora": 3e-3, "adalora": 1e-2, "prefix": 1e-2, "prompt": 3e-2, "ia3": 1e-2}


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "prefix", "prompt", "ia3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_and_method_train_and_reload(
    family: str,
    method: str,
    tiny_models: dict[str, Path],
    warm_models: dict[str, Path],
    mt_data: Path,
    tmp_path: Path,
) -> None:
    model = tiny_models["bert"] if family == "bert2bert" else warm_models[family]
    extra = {k: str(model) if v == "BERT" else v for k, v in FAMILIES[family].items()}
    raw = mt_recipe(model, mt_data, tmp_path / "run", **extra, **{"method.name": method, "training.lr": LR[method],
                                                                   "training.eval_at_start": True})  # fmt: skip
    results = train(recipe_from_dict(raw))
    assert results["metrics"]["eval_loss"] < results["initial_metrics"]["eval_loss"], results
    assert {"bleu", "chrf", "eval_loss"} <= set(results["metrics"])
    # reloaded from disk, the checkpoint generates exactly what the trained model scored
    from hf_finetune.evaluation import evaluate_checkpoint

    again = evaluate_checkpoint(recipe_from_dict(raw), str(tmp_path / "run"))["metrics"]
    assert again["bleu"] == pytest.approx(results["metrics"]["bleu"], abs=1e-9)
    assert again["eval_loss"] == pytest.approx(results["metrics"]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_full_fine_tuning_learns_the_lexicon(
    family: str, tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
):
    raw = mt_recipe(tiny_models[family], mt_data, tmp_path / "run", **{"training.max_steps": 150, "training.lr": 5e-3,
                                                                       "training.eval_at_start": True})  # fmt: skip
    results = train(recipe_from_dict(raw))
    before, after = results["initial_metrics"], results["metrics"]
    check_predictions(tmp_path / "run", {"validation": rows_in(mt_data / "validation.jsonl")})
    assert after["chrf"] > before["chrf"] + 10 and after["bleu"] > before["bleu"], (before, after)
    assert after["eval_loss"] < before["eval_loss"] / 3
    src = write_jsonl(tmp_path / "in.jsonl", [{"en": "the big cat"}, {"en": "the dog eats the red fish"}])
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))
    assert main(["predict", str(path), f"checkpoint={tmp_path / 'run'}", "--input", str(src),
                 "--output", str(tmp_path / "out.jsonl")]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["en"] for r in rows] == ["the big cat", "the dog eats the red fish"]
    assert all(isinstance(r["generated"], str) for r in rows)


def test_decoder_only_labels_mask_the_source(
    tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
) -> None:
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    recipe = recipe_from_dict(mt_recipe(tiny_models["gpt2"], mt_data, tmp_path))
    task = get_task(recipe, tokenizer)
    raw = DatasetDict({"train": Dataset.from_list(pairs(8, 3))})
    row = task.preprocess(raw)["train"][0]
    source = tokenizer(pairs(8, 3)[0]["en"], add_special_tokens=False)["input_ids"]
    target = tokenizer(pairs(8, 3)[0]["de"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert row["input_ids"] == source + [eos] + target + [eos]
    assert row["labels"] == [-100] * (len(source) + 1) + target + [eos]
    assert task.decoder_only and task.peft_task_type == "CAUSAL_LM"


def test_encoder_decoder_labels_are_the_target(
    tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
) -> None:
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    for family in ("t5", "bert2bert"):
        path = tiny_models["bert" if family == "bert2bert" else "t5"]
        extra = {"model.encoder_decoder_from": str(path)} if family == "bert2bert" else {}
        tokenizer = AutoTokenizer.from_pretrained(path)
        task = get_task(
            recipe_from_dict(mt_recipe(path, mt_data, tmp_path, **extra, **{"seq2seq.source_prefix": "x: "})), tokenizer
        )
        row = task.preprocess(DatasetDict({"train": Dataset.from_list(pairs(4, 3))}))["train"][0]
        assert row["input_ids"] == tokenizer("x: " + pairs(4, 3)[0]["en"])["input_ids"]
        target = tokenizer(text_target=pairs(4, 3)[0]["de"])["input_ids"]
        # BERT2BERT's decoder starts from [CLS], so the labels begin after it
        assert row["labels"] == (target[1:] if family == "bert2bert" else target)


def test_translation_metric_equals_sacrebleu() -> None:
    rng = random.Random(0)
    preds, refs = [], []
    for r in pairs(30, 5):
        second = rng.random() < 0.5
        words = (r["de"].replace("der", "die") if second else r["de"]).split()
        cut = rng.randint(1, len(words))
        preds.append(" ".join(words[:cut] + sorted(words[cut:])))
        refs.append([r["de"]] + ([r["de"].replace("der", "die")] if second else []))
    ours = load_metric("translation").compute(predictions=preds, references=refs)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    single = load_metric("translation").compute(predictions=preds, references=[[r[0]] for r in refs])
    assert ours["bleu"] > single["bleu"], "the second reference counts"


def test_summarization_metric_equals_rouge_score() -> None:
    preds = ["The cat sat on the mat. It purred loudly.", "Dogs were running in the parks today."]
    refs = [["A cat was sitting on a mat. It purred.", "The cat sat."], ["The dog runs in the park."]]
    ours = load_metric("summarization").compute(predictions=preds, references=refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[key].fmeasure for r in rs) for p, rs in zip(preds, refs, strict=True)]
        assert ours[key] == pytest.approx(100 * sum(best) / len(best))
    lsum = [
        max(scorer.score(r.replace(". ", ".\n"), p.replace(". ", ".\n"))["rougeLsum"].fmeasure for r in rs)
        for p, rs in zip(preds, refs, strict=True)
    ]
    assert ours["rougeLsum"] == pytest.approx(100 * sum(lsum) / len(lsum))


def test_summarization_reports_the_lead_baseline(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rows = [
        {"document": f"{r['en']}. and then more words follow here.", "summary": r["en"]} for r in pairs(64, 7)
    ]
    write_jsonl(tmp_path / "train.jsonl", rows[:48])
    write_jsonl(tmp_path / "validation.jsonl", rows[48:])
    raw = mt_recipe(tiny_models["bart"], tmp_path, tmp_path / "run", task="summarization", **{
        "data.columns.source": "document", "data.columns.target": "summary", "data.columns.references": None,
        "training.max_steps": 10,
    })  # fmt: skip
    metrics = train(recipe_from_dict(raw))["metrics"]
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "lead_rouge1", "lead_rougeLsum"} <= set(metrics)
    saved = check_predictions(tmp_path / "run", {"validation": 16})["validation"]
    assert saved[0]["document"] == rows[48]["document"] and saved[0]["reference"] == rows[48]["summary"]
    # the lead sentence here is exactly the summary plus a full stop
    assert metrics["lead_rouge1"] == pytest.approx(100.0)


def test_prefix_generation_is_the_same_with_and_without_the_cache(
    tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
) -> None:
    raw = mt_recipe(
        tiny_models["t5"], mt_data, tmp_path / "run", **{"method.name": "prefix", "training.lr": 1e-2}
    )
    train(recipe_from_dict(raw))
    _, model, tokenizer, _ = load_final(tmp_path / "run")
    # the loaded prefix-tuned model has the method's generation cache fix installed
    enc = tokenizer(["the cat sees the dog", "the fish"], return_tensors="pt", padding=True)
    with torch.no_grad():
        cached = model.generate(**enc, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(**enc, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_label_smoothing_is_the_smoothed_cross_entropy(
    tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_finetune.losses import smoothed_token_loss

    recipe = recipe_from_dict(
        mt_recipe(tiny_models["t5"], mt_data, tmp_path, **{"training.label_smoothing": 0.1})
    )
    task = get_task(recipe)
    task.load_model(str(tiny_models["t5"]))  # the model family decides how labels align
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["t5"])
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["t5"])
    enc = tokenizer(["the cat sees"], return_tensors="pt")
    labels = tokenizer(text_target=["der katze sieht"], return_tensors="pt")["input_ids"]
    out = model(**enc, labels=labels)
    smoothed = smoothed_token_loss(out.logits, labels, task.shift_labels, recipe.training.label_smoothing)
    logp = out.logits.log_softmax(-1)[0]
    nll = -logp.gather(1, labels[0].unsqueeze(1)).mean()
    by_hand = 0.9 * nll - 0.1 * logp.mean(-1).mean()
    assert smoothed.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(nll.item(), rel=1e-5)


def test_smoothed_loss_aligns_a_decoder_only_models_labels(
    tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path
):
    """A decoder-only model's logits at t predict the label at t + 1: with no smoothing our loss is the model's own."""
    from transformers import AutoTokenizer

    from hf_finetune.losses import smoothed_token_loss

    recipe = recipe_from_dict(mt_recipe(tiny_models["gpt2"], mt_data, tmp_path))
    task = get_task(recipe)
    model = task.load_model(str(tiny_models["gpt2"]))
    assert task.shift_labels
    ids = AutoTokenizer.from_pretrained(tiny_models["gpt2"])(["the cat sees der katze"], return_tensors="pt")
    labels = ids["input_ids"].clone()
    labels[0, :3] = -100  # the source part carries no loss
    out = model(**ids, labels=labels)
    ours = smoothed_token_loss(out.logits, labels, task.shift_labels, recipe.training.label_smoothing)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_seq2seq_bad_inputs(tiny_models: dict[str, Path], mt_data: Path, tmp_path: Path, capsys) -> None:
    def run(rows: list[dict] | None = None, model: str = "t5", **extra: object) -> str:
        data = tmp_path / "bad"
        data.mkdir(exist_ok=True)
        write_jsonl(data / "train.jsonl", rows or pairs(16, 1))
        write_jsonl(data / "validation.jsonl", pairs(4, 2))
        path = tmp_path / "recipe.yaml"
        path.write_text(json.dumps(mt_recipe(tiny_models[model], data, tmp_path / "out", **extra)))
        assert main(["train", str(path)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-finetune: error")]
        assert len(err) == 1, err
        return err[0]

    assert "data.columns.source='english'" in run(**{"data.columns.source": "english"})
    assert "data.train row 1: column 'de'" in run(rows=[pairs(1, 0)[0], {"en": "the cat", "de": ""}])
    assert "training.label_smoothing" in run(**{"training.label_smoothing": 1.5})
    # a decoder-only model holds source, target and PEFT's virtual tokens in one 128-position sequence
    long = {"training.max_length": 64, "seq2seq.max_target_length": 50, "method.name": "prefix"}
    # fp32 on a CPU pads to the longest row, so padding takes no positions here
    assert "training.max_length: 64 + 50 (seq2seq.max_target_length) + 20 (prefix virtual tokens) is longer" in run(
        model="gpt2", **long
    )
    assert "set training.max_length<=58" in run(model="gpt2", **long)
    # bf16 on a CPU pads to width buckets: 114 tokens to 128, 14 positions more
    assert "+ 14 (padding to a width bucket)" in run(model="gpt2", **long, **{"training.precision": "bf16"})
    assert not (tmp_path / "out" / "results.json").exists()


def test_marian_positions_stay_fixed_so_a_reload_scores_the_same(mt_data: Path, tmp_path: Path) -> None:
    """transformers 5 leaves Marian's sinusoidal positions trainable but never saves them (see freeze_unsaved)."""
    from hf_finetune.evaluation import evaluate_checkpoint

    marian = write_scratch_model(tmp_path / "marian", "marian", corpus(), DIMS)
    raw = mt_recipe(marian, mt_data, tmp_path / "run", **{"training.max_steps": 30, "training.lr": 5e-3})
    results = train(recipe_from_dict(raw))
    again = evaluate_checkpoint(recipe_from_dict(raw), str(tmp_path / "run"))["metrics"]
    assert again["eval_loss"] == pytest.approx(results["metrics"]["eval_loss"], rel=1e-6)
    assert again["chrf"] == pytest.approx(results["metrics"]["chrf"], abs=1e-9)
