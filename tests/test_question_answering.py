"""Extractive QA: windows over long contexts, gold spans through offsets, post-processing across windows, the
SQuAD metric against hand-computed values and an independent implementation of the official script, and every
method through the one loop."""

from __future__ import annotations

import collections
import json
import math
import random
import re
import string
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_bert, write_jsonl
from test_predictions import check_predictions
from transformers import BertTokenizer

import hf_finetune.engine as engine
from hf_finetune.checkpoint import load_final
from hf_finetune.cli import main
from hf_finetune.data import load_split, load_splits
from hf_finetune.device import Padding
from hf_finetune.errors import InputError
from hf_finetune.metrics import load_metric
from hf_finetune.recipe import SplitConfig, apply_override, recipe_from_dict
from hf_finetune.tasks.question_answering import QuestionAnsweringTask, SpanCollector

FILLER = "the a river city north south old new large small on in by near of and".split()
CITIES = "paris rome berlin madrid vienna oslo".split()
QUESTION = "which city is named here"


def qa_rows(n: int, seed: int, words: tuple[int, int] = (6, 30), answer_words: int = 1) -> list[dict]:
    """Contexts of filler words with one city phrase in them; the answer is that phrase (learnable from the token
    identities alone, so frozen-body methods can learn it too)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        context_words = rng.choices(FILLER, k=rng.randint(*words))
        answer = " ".join(rng.choices(CITIES, k=rng.randint(1, answer_words)))
        pos = rng.randint(0, len(context_words))
        before = " ".join(context_words[:pos])
        context = " ".join(context_words[:pos] + [answer] + context_words[pos:])
        start = len(before) + (1 if before else 0)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"s{seed}-{i}",
                "question": QUESTION,
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_qa_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [r["context"] for r in qa_rows(300, seed=0)] + [QUESTION] * 50
    folder = tmp_path_factory.mktemp("tiny-qa-bert")
    return build_tiny_bert(folder, corpus, vocab_size=100, max_positions=128)


@pytest.fixture
def qa_data(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", qa_rows(128, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", qa_rows(40, seed=2, words=(6, 60)))
    return tmp_path


def qa_recipe(model: Path, data: Path, out: Path, **extra: object) -> dict:
    raw: dict = {
        "task": "question_answering",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": {"path": str(data / "train.jsonl")},
            "validation": {"path": str(data / "validation.jsonl")},
        },
        "training": {
            "epochs": 2,
            "batch_size": 16,
            "max_length": 48,
            "logging_every": 2,
            "warmup_ratio": 0.0,
        },
        "qa": {"doc_stride": 16},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


# ---- windows ---------------------------------------------------------------------------------------------------


def test_windows_cover_the_context_and_gold_spans_map_back_to_the_answer(tiny_qa_bert: Path) -> None:
    tokenizer = BertTokenizer.from_pretrained(tiny_qa_bert)
    task = QuestionAnsweringTask(
        recipe_from_dict(qa_recipe(tiny_qa_bert, Path("."), Path("."), **{"training.max_length": 24}))
    )
    task.qa.doc_stride = 6  # questions take 5 tokens + 3 special: 16 left for the context
    rows = qa_rows(200, seed=5, words=(0, 60), answer_words=3)
    batch = {k: [r[k] for r in rows] for k in rows[0]} | {"index": list(range(len(rows)))}
    task.setup(tokenizer, Padding())
    feats = task.features(batch, keep_offsets=True)
    by_example = collections.defaultdict(list)
    for f in range(len(feats["input_ids"])):
        by_example[feats["example_index"][f]].append(f)
    multi_window = 0
    for i, row in enumerate(rows):
        context, answer = row["context"], row["answers"]["text"][0]
        covered, found = set(), 0
        multi_window += len(by_example[i]) > 1
        for f in by_example[i]:
            offsets = feats["offset_mapping"][f]
            assert len(feats["input_ids"][f]) <= 24
            for a, b in offsets:
                covered.update(range(a, b))
            s, e = feats["start_positions"][f], feats["end_positions"][f]
            if s == feats["cls_index"][f]:
                assert e == s
                continue
            found += 1
            assert context[offsets[s][0] : offsets[e][1]] == answer
        assert {k for k, ch in enumerate(context) if not ch.isspace()} <= covered, i
        # consecutive windows overlap by doc_stride tokens, so an answer that long or shorter is whole in one
        if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= task.qa.doc_stride:
            assert found >= 1, (i, context)
    assert multi_window > 50  # the property was exercised on long contexts


# ---- post-processing -------------------------------------------------------------------------------------------


def reference_postprocess(
    start: list[float], end: list[float], offsets: list, n_best: int, max_len: int
) -> tuple:
    """transformers' utils_qa.postprocess_qa_predictions for one window, v1 (n_best starts x n_best ends)."""
    starts = sorted(range(len(start)), key=lambda i: -start[i])[:n_best]
    ends = sorted(range(len(end)), key=lambda i: -end[i])[:n_best]
    best = None
    for s in starts:
        for e in ends:
            if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_len:
                continue
            score = start[s] + end[e]
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


def test_collector_equals_the_reference_postprocessing_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        length = 24
        offsets = [[-1, -1]] * 4 + [[3 * k, 3 * k + 2] for k in range(length - 5)] + [[-1, -1]]
        start, end = torch.randn(1, length, generator=gen), torch.randn(1, length, generator=gen)
        collector = SpanCollector(n_best=20, max_answer_length=5, with_null=False)
        collector.add([0], start, end, [offsets], [0])
        context = "x" * 100
        got = collector.answer(0, context)
        want = reference_postprocess(start[0].tolist(), end[0].tolist(), offsets, n_best=length, max_len=5)
        assert (got["start"], got["end"]) == (want[1], want[2]), trial


def test_best_span_is_picked_across_windows_and_invalid_spans_never_win() -> None:
    context = "alpha beta gamma delta epsilon"
    # two windows over the same example; token offsets into the context, [-1, -1] outside it
    w1 = [[-1, -1], [0, 5], [6, 10], [11, 16], [-1, -1]]
    w2 = [[-1, -1], [11, 16], [17, 22], [23, 30], [-1, -1]]
    neg = -10.0
    s1 = torch.tensor([[50.0, 2.0, neg, neg, 40.0]])  # CLS and SEP score high but are not context
    e1 = torch.tensor([[50.0, neg, 3.0, neg, 40.0]])  # best valid in w1: "alpha beta" = 5
    s2 = torch.tensor([[neg, neg, 1.0, 9.0, neg]])  # end before start ("epsilon" .. "delta") must not win
    e2 = torch.tensor([[neg, neg, 4.0, 0.5, neg]])  # best valid in w2: "delta" = 5 or "epsilon" = 9.5
    collector = SpanCollector(n_best=5, max_answer_length=3, with_null=False)
    collector.add([0], s1, e1, [w1], [0])
    collector.add([0], s2, e2, [w2], [0])
    best = collector.answer(0, context)
    assert best["answer"] == "epsilon" and (best["start"], best["end"]) == (23, 30)
    assert 0 < best["score"] <= 1

    short = SpanCollector(n_best=5, max_answer_length=1, with_null=False)
    short.add([0], s1, e1, [w1], [0])
    assert short.answer(0, context)["answer"] in {"alpha", "beta"}  # "alpha beta" is 2 tokens


def test_version_2_null_answer_wins_by_threshold() -> None:
    offsets = [[[-1, -1], [0, 3], [4, 7], [-1, -1]]]
    start, end = torch.tensor([[3.0, 1.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, 1.5, 0.0]])
    collector = SpanCollector(n_best=5, max_answer_length=5, with_null=True)
    collector.add([0], start, end, offsets, [0])
    # null 6.0 vs best span 2.5: no answer unless the threshold is above 3.5
    assert collector.answer(0, "foo bar", null_threshold=0.0)["answer"] == ""
    assert collector.answer(0, "foo bar", null_threshold=4.0)["answer"] == "foo bar"


# ---- metric ----------------------------------------------------------------------------------------------------


def official_v11(dataset: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    """SQuAD v1.1's evaluate-v1.1.py as published: normalise (lower, drop punctuation, drop a/an/the, collapse
    whitespace), F1 over normalised tokens, EM on normalised strings, max over ground truths, mean x 100."""

    def norm(s: str) -> str:
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    def f1(pred: str, gold: str) -> float:
        p, g = norm(pred).split(), norm(gold).split()
        same = sum((collections.Counter(p) & collections.Counter(g)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    em = f = 0.0
    for qa in dataset:
        golds = qa["answers"]["text"]
        pred = predictions[qa["id"]]
        em += max(float(norm(pred) == norm(g)) for g in golds)
        f += max(f1(pred, g) for g in golds)
    return {"exact_match": 100 * em / len(dataset), "f1": 100 * f / len(dataset)}


def test_squad_metric_equals_hand_computed_values() -> None:
    refs = [
        ("1", ["Eiffel tower", "tower"], "The Eiffel Tower!"),  # case, article, punctuation: EM 1, F1 1
        ("2", ["Paris"], "in the city of Paris"),  # "in city of paris": P 1/4, R 1 -> F1 0.4
        ("3", ["apple", "day apple"], "an apple a day"),  # "apple day": F1 1 against "day apple", EM 0
        ("4", ["1,000 men"], ""),  # empty prediction scores 0
    ]
    metric = load_metric("squad")
    result = metric.compute(
        predictions=[{"id": i, "prediction_text": p} for i, _, p in refs],
        references=[{"id": i, "answers": {"text": g, "answer_start": [0] * len(g)}} for i, g, _ in refs],
    )
    assert result["exact_match"] == pytest.approx(25.0)
    assert result["f1"] == pytest.approx(100 * (1 + 0.4 + 1 + 0) / 4)


def test_squad_metric_version_2_splits() -> None:
    metric = load_metric("squad")
    result = metric.compute(
        predictions=[
            {"id": "a", "prediction_text": "rome"},
            {"id": "b", "prediction_text": ""},
            {"id": "c", "prediction_text": "oslo"},
        ],
        references=[
            {"id": "a", "answers": {"text": ["Rome."], "answer_start": [0]}},
            {"id": "b", "answers": {"text": [], "answer_start": []}},
            {"id": "c", "answers": {"text": [], "answer_start": []}},
        ],
        version_2_with_negative=True,
    )
    assert result["exact_match"] == pytest.approx(200 / 3) and result["f1"] == pytest.approx(200 / 3)
    assert (result["HasAns_exact"], result["HasAns_total"]) == (100.0, 1)
    assert (result["NoAns_exact"], result["NoAns_total"]) == (50.0, 2)


# ---- data ------------------------------------------------------------------------------------------------------


def test_official_nested_squad_json_is_flattened(tmp_path: Path) -> None:
    doc = {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "rome is old",
                        "qas": [
                            {"id": "x1", "question": "q?", "answers": [{"text": "rome", "answer_start": 0}]},
                            {"id": "x2", "question": "q2?", "answers": [{"text": "old", "answer_start": 8}]},
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "dev.json").write_text(json.dumps(doc))
    ds = load_split(SplitConfig(path=str(tmp_path / "dev.json")), "data.validation")
    assert ds["id"] == ["x1", "x2"] and ds["context"] == ["rome is old"] * 2
    assert ds[1]["answers"] == {"text": ["old"], "answer_start": [8]}


def test_misaligned_answer_is_an_error_naming_the_id_or_is_dropped_and_counted(
    tiny_qa_bert: Path, qa_data: Path, tmp_path: Path
) -> None:
    rows = qa_rows(10, seed=7)
    rows[3]["answers"]["answer_start"] = [rows[3]["answers"]["answer_start"][0] + 1]
    write_jsonl(qa_data / "train.jsonl", rows)
    raw = qa_recipe(tiny_qa_bert, qa_data, tmp_path / "out")
    recipe = recipe_from_dict(raw)
    with pytest.raises(InputError, match=r"data\.train row 3 \(id 's7-3'\).*qa\.misaligned_answers=drop"):
        QuestionAnsweringTask(recipe).prepare(load_splits(recipe.data))
    apply_override(raw, "qa.misaligned_answers=drop")
    recipe = recipe_from_dict(raw)
    task, splits = QuestionAnsweringTask(recipe), load_splits(recipe.data)
    task.prepare(splits)
    assert task.dropped == {"train": 1} and len(splits["train"]) == 9 and "s7-3" not in splits["train"]["id"]


# ---- methods through the loop ----------------------------------------------------------------------------------

LRS = {"full": 3e-3, "lora": 1e-2, "adalora": 5e-2, "prefix": 1e-2}
TRAINABLE = {"full": ("",), "lora": ("lora_", "qa_outputs"), "adalora": ("lora_", "qa_outputs"),
             "prefix": ("prefix_encoder", "qa_outputs")}  # fmt: skip


@pytest.mark.parametrize("method", list(LRS))
def test_method_trains_only_its_parameters_and_reloads(
    method: str, tiny_qa_bert: Path, qa_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = qa_recipe(
        tiny_qa_bert,
        qa_data,
        out,
        **{"method.name": method, "training.lr": LRS[method], "training.epochs": 3},
    )
    run = engine.setup(recipe_from_dict(raw))
    seen = {"model": run.unwrapped, "before": {n: p.detach().clone() for n, p in run.unwrapped.named_parameters()}}
    results = engine.finish(run, engine.fit(run))
    assert {"exact_match", "f1", "eval_loss"} <= results["metrics"].keys()
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

    model = seen["model"]
    for name, param in model.named_parameters():
        intended = any(key in name for key in TRAINABLE[method]) and "original_module" not in name
        assert param.requires_grad == intended, name
        if not intended and "ranknum" not in name:  # AdaLoRA's rank count follows its layers' kept ranks
            assert torch.equal(param, seen["before"][name]), name
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, seen["before"][n])
    ]
    assert any("qa_outputs" in n for n in changed) and (
        method == "full" or any("qa_outputs" not in n for n in changed)
    )

    _, reloaded, tokenizer, _ = load_final(out)
    batch = tokenizer(
        [QUESTION] * 2, ["near rome the river", "old oslo city"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        a, b = model.eval()(**batch), reloaded(**batch)
    # AdaLoRA too: its trained layers shrink to the kept ranks, as PEFT rebuilds them from the saved rank pattern
    assert torch.equal(a.start_logits, b.start_logits) and torch.equal(a.end_logits, b.end_logits)


def test_cli_predictions_scored_by_the_official_algorithm_equal_our_metric(
    tiny_qa_bert: Path, qa_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    raw = qa_recipe(tiny_qa_bert, qa_data, out, **{"method.name": "full", "training.lr": 3e-3})
    recipe_file = tmp_path / "recipe.json"  # JSON is YAML
    recipe_file.write_text(json.dumps(raw))
    assert main(["train", str(recipe_file)]) == 0
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert results["f1"] > 50  # the cue is learnable: a trained model finds most cities

    validation = [json.loads(line) for line in (qa_data / "validation.jsonl").read_text().splitlines()]
    saved = check_predictions(out, {"validation": len(validation)})["validation"]
    assert [r["id"] for r in saved] == [r["id"] for r in validation]
    questions = tmp_path / "q.jsonl"
    write_jsonl(
        questions, [{"id": r["id"], "question": r["question"], "context": r["context"]} for r in validation]
    )
    answers = tmp_path / "a.jsonl"
    assert (
        main(
            [
                "predict",
                str(recipe_file),
                f"checkpoint={out}",
                "--input",
                str(questions),
                "--output",
                str(answers),
            ]
        )
        == 0
    )
    predicted = [json.loads(line) for line in answers.read_text().splitlines()]
    for row in predicted:
        assert row["context"][row["start"] : row["end"]] == row["answer"] and 0 <= row["score"] <= 1
    official = official_v11(validation, {r["id"]: r["answer"] for r in predicted})
    assert math.isclose(official["exact_match"], results["exact_match"], abs_tol=1e-6)
    assert math.isclose(official["f1"], results["f1"], abs_tol=1e-6)

    capsys.readouterr()
    assert main(["eval", str(recipe_file), f"checkpoint={out}", "--predictions", str(tmp_path / "eval")]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert again["f1"] == pytest.approx(results["f1"], abs=1e-9)
    # eval's rows are training's: the same answer to every question
    rows = [json.loads(x) for x in (tmp_path / "eval" / "validation.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in saved]
    # and predict's: answer by answer, not only on average
    assert [r["answer"] for r in predicted] == [r["prediction"] for r in saved]


def test_version_2_trains_with_unanswerable_questions_and_reports_the_splits(
    tiny_qa_bert: Path, qa_data: Path, tmp_path: Path
) -> None:
    rows = qa_rows(64, seed=8)
    for row in rows[::3]:  # a third without the city: no answer
        row["context"] = " ".join(w for w in row["context"].split() if w not in CITIES) or "the river"
        row["answers"] = {"text": [], "answer_start": []}
    write_jsonl(qa_data / "train.jsonl", rows)
    write_jsonl(qa_data / "validation.jsonl", rows[:30])
    raw = qa_recipe(tiny_qa_bert, qa_data, tmp_path / "v1")
    with pytest.raises(InputError, match=r"row 0 \(id 's8-0'\): no answer.*version_2_with_negative"):
        engine.train(recipe_from_dict(raw))
    raw = qa_recipe(
        tiny_qa_bert, qa_data, tmp_path / "v2", **{"qa.version_2_with_negative": True, "training.lr": 3e-3}
    )
    metrics = engine.train(recipe_from_dict(raw))["metrics"]
    assert metrics["NoAns_total"] == 10 and metrics["HasAns_total"] == 20
    assert {"exact_match", "f1", "HasAns_f1", "NoAns_f1", "eval_loss"} <= metrics.keys()


def test_csv_with_answers_as_json_and_other_column_names(tiny_qa_bert: Path, tmp_path: Path) -> None:
    import csv as csv_module

    rows = qa_rows(48, seed=9)
    for name in ("train", "validation"):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            writer = csv_module.writer(f)
            writer.writerow(["qid", "q", "passage", "gold"])
            for r in rows:
                writer.writerow([r["id"], r["question"], r["context"], json.dumps(r["answers"])])
    raw = qa_recipe(tiny_qa_bert, tmp_path, tmp_path / "out")
    raw["data"] = {
        "train": {"path": str(tmp_path / "train.csv")},
        "validation": {"path": str(tmp_path / "validation.csv")},
        "columns": {"id": "qid", "question": "q", "context": "passage", "answers": "gold"},
    }
    raw["training"]["max_steps"] = 2
    recipe = recipe_from_dict(raw)
    splits = load_splits(recipe.data)
    QuestionAnsweringTask(recipe).prepare(splits)  # the JSON column read back as SQuAD answers, under our names
    assert splits["validation"]["answers"] == [r["answers"] for r in rows]
    assert splits["validation"]["id"] == [r["id"] for r in rows]
    results = engine.train(recipe)
    assert results["steps"] == 2 and {"exact_match", "f1", "eval_loss"} <= results["metrics"].keys()
