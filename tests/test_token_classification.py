"""Token classification: the entity metric against seqeval, sub-word labels, windows over long rows, CoNLL column
files, every method through the loop, prediction with character offsets, and bad input."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_bert, write_jsonl
from datasets import Dataset
from seqeval.metrics import classification_report
from seqeval.metrics import f1_score as seqeval_f1
from test_bad_inputs import expect_exit_2
from test_engine import LRS, check_trained_parameters, train_capturing
from test_predictions import check_predictions, rows_in
from transformers import AutoModelForTokenClassification

import hf_finetune.engine as engine
from hf_finetune.checkpoint import load_final
from hf_finetune.data import load_split
from hf_finetune.errors import InputError
from hf_finetune.evaluation import evaluate_checkpoint
from hf_finetune.merging import merge_checkpoint
from hf_finetune.methods import get_method
from hf_finetune.metrics.entities.entities import entity_scores, spans
from hf_finetune.recipe import SplitConfig, apply_override, recipe_from_dict
from hf_finetune.tasks import get_task
from hf_finetune.tasks.token_classification import IGNORE

FILLER = "the a of in on said and to was at for with by from old big small".split()
ENTITIES = {
    "PER": [["alice"], ["bob", "smithson"], ["carol", "jones"], ["dave"]],
    "LOC": [["paris"], ["berlin"], ["new", "york"], ["lisbon"]],
    "ORG": [["acme", "corporation"], ["unesco"], ["reuters"]],
}


def ner_rows(n: int, seed: int, scheme: str = "IOB2") -> list[dict]:
    """Sentences of filler words with one to three entities, tagged by their identity (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 3)):
            filler = rng.choices(FILLER, k=rng.randint(1, 4))
            tokens += filler
            tags += ["O"] * len(filler)
            type_ = rng.choice(sorted(ENTITIES))
            words = rng.choice(ENTITIES[type_])
            tokens += words
            tags += [f"B-{type_}"] + [f"I-{type_}"] * (len(words) - 1)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


@pytest.fixture(scope="session")
def ner_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [" ".join(r["tokens"]) for r in ner_rows(400, seed=0)]
    # a vocabulary small enough that the longer names split into several sub-words
    return build_tiny_bert(tmp_path_factory.mktemp("ner-bert"), corpus, vocab_size=90, max_positions=128)


@pytest.fixture
def ner_data(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", ner_rows(192, seed=1))
    write_jsonl(tmp_path / "validation.jsonl", ner_rows(48, seed=2))
    return tmp_path


def ner_recipe(model: Path, data: Path, out: Path, **extra: object) -> dict:
    raw: dict = {
        "task": "token_classification",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": {"path": str(data / "train.jsonl")},
            "validation": {"path": str(data / "validation.jsonl")},
            "columns": {"tokens": "tokens", "tags": "ner_tags"},
        },
        "training": {"epochs": 3, "batch_size": 16, "max_length": 32, "logging_every": 3, "warmup_ratio": 0.0},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return raw


# ---- the entity metric ---------------------------------------------------------------------------------------------

TRICKY = [
    # I- without B- opens an entity (conlleval), in IOB1 data and in bad predictions alike
    (["I-PER", "I-PER", "O", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
    # a type change inside a run of I- splits it
    (["B-PER", "I-LOC", "I-LOC", "O"], ["B-PER", "I-PER", "I-PER", "O"]),
    # IOB1: B- only between two adjacent entities of one type
    (["I-ORG", "B-ORG", "I-ORG", "O", "I-MISC"], ["I-ORG", "I-ORG", "B-ORG", "O", "I-MISC"]),
    # IOBES: singles, ends without a begin, a begin without an end
    (["S-PER", "B-LOC", "E-LOC", "E-LOC", "O", "B-ORG"], ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG"]),
    (["O", "E-PER", "S-PER", "I-PER", "B-PER"], ["B-PER", "E-PER", "S-PER", "O", "S-PER"]),
    # entities at both ends, and an all-O prediction
    (["O", "O", "O"], ["B-LOC", "O", "B-PER"]),
    (["B-MISC", "I-MISC"], ["B-MISC", "I-MISC"]),
]


def seqeval_figures(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    figures = {
        "precision": report["micro avg"]["precision"],
        "recall": report["micro avg"]["recall"],
        "f1": seqeval_f1(gold, predicted, zero_division=0),
    }
    for type_, row in report.items():
        if not type_.endswith(" avg"):
            figures.update({f"{type_}_precision": row["precision"], f"{type_}_recall": row["recall"]})
            figures[f"{type_}_f1"] = row["f1-score"]
            figures[f"{type_}_number"] = row["support"]
    return figures


def test_entity_scores_equal_seqeval_on_tricky_sequences() -> None:
    predicted, gold = [p for p, _ in TRICKY], [g for _, g in TRICKY]
    ours = entity_scores(predicted, gold)
    theirs = seqeval_figures(predicted, gold)
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs, abs=1e-12)
    assert set(ours) - set(theirs) == {"accuracy"}
    # spot checks of the conlleval reading itself
    assert spans(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert spans(["S-PER", "B-LOC", "E-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]


def test_entity_scores_equal_seqeval_on_random_sequences() -> None:
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-ORG", "B-ORG"]
    for _ in range(50):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        predicted = [[t if rng.random() < 0.6 else rng.choice(tags) for t in row] for row in gold]
        ours = entity_scores(predicted, gold)
        theirs = seqeval_figures(predicted, gold)
        assert {k: ours[k] for k in theirs} == pytest.approx(theirs, abs=1e-12)


# ---- sub-words and windows -----------------------------------------------------------------------------------------


def task_for(model: Path, data: Path, tmp_path: Path, **extra: object):
    from transformers import AutoTokenizer

    recipe = recipe_from_dict(ner_recipe(model, data, tmp_path / "run", **extra))
    task = get_task(recipe, AutoTokenizer.from_pretrained(model))
    return task


def test_labels_sit_on_the_first_sub_word_or_on_every_sub_word(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    words = ["carol", "jones", "said", "bob", "smithson"]
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER"]
    for label_all in (False, True):
        task = task_for(ner_bert, ner_data, tmp_path, **{"token_classification.label_all_tokens": label_all})
        raw = DatasetDict({"train": Dataset.from_list([{"tokens": words, "ner_tags": tags}] * 2)})
        task.prepare(raw)
        encoded = task.tokenizer(words, is_split_into_words=True)
        word_ids = encoded.word_ids()
        assert len(word_ids) - 2 > len(words), "the tokenizer should split some of these words"
        feats = task.features([words], [tags], training=True)
        labels = feats["labels"][0]
        ids = {t: i for i, t in enumerate(task.labels)}
        for position, word in enumerate(word_ids):
            first = word is not None and (position == 0 or word_ids[position - 1] != word)
            if word is None:
                expected = IGNORE
            elif first:
                expected = ids[tags[word]]
            elif label_all:
                expected = ids[tags[word].replace("B-", "I-")]
            else:
                expected = IGNORE
            assert labels[position] == expected, (position, word, label_all)
        # scoring reads the first sub-word only, whatever the training labels
        scored = task.features([words], [tags], training=False)
        assert [w for w in scored["word_index"][0] if w >= 0] == list(range(len(words)))


def test_byte_level_words_are_tokenized_as_in_running_text(ner_data: Path, tmp_path: Path) -> None:
    """A byte-level BPE (RoBERTa, GPT-2) puts a word's leading space in its first token: pre-split words must get it,
    in training and in the tokenizer saved with the run."""
    from transformers import AutoTokenizer

    from hf_finetune.scratch import Dims, write_scratch_model

    corpus = [" ".join(r["tokens"]) for r in ner_rows(400, seed=0)]
    dims = Dims(layers=2, d_model=32, heads=4, ffn=64, max_positions=130, vocab_size=300)
    roberta = write_scratch_model(tmp_path / "roberta", "roberta", corpus, dims, seed=0)
    words = ["carol", "jones", "said", "bob", "smithson"]
    plain = AutoTokenizer.from_pretrained(roberta)
    running = plain(" " + " ".join(words), add_special_tokens=False)["input_ids"]
    assert plain(words, is_split_into_words=True, add_special_tokens=False)["input_ids"] != running
    out = tmp_path / "run"
    raw = ner_recipe(roberta, ner_data, out, **{"method.name": "full", "training.epochs": 1})
    task = get_task(recipe_from_dict(raw), AutoTokenizer.from_pretrained(roberta))
    encoded = task.features([words], None, training=False)
    assert [i for i in encoded["input_ids"][0] if i not in plain.all_special_ids] == running
    train_capturing(raw)
    saved = AutoTokenizer.from_pretrained(out / "model")
    assert saved(words, is_split_into_words=True, add_special_tokens=False)["input_ids"] == running


def test_a_long_row_is_windowed_and_every_word_scored_once(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    task = task_for(ner_bert, ner_data, tmp_path, **{"training.max_length": 16, "token_classification.stride": 4})
    from datasets import Dataset, DatasetDict

    long = ner_rows(1, seed=5)[0]
    while len(long["tokens"]) < 60:
        extra = ner_rows(1, seed=len(long["tokens"]))[0]
        long = {k: long[k] + extra[k] for k in long}
    task.prepare(DatasetDict({"train": Dataset.from_list([long] + ner_rows(8, seed=3))}))
    feats = task.features([long["tokens"]], [long["ner_tags"]], training=False)
    assert len(feats["input_ids"]) > 3 and max(feats["length"]) <= 16
    scored = sorted(w for row in feats["word_index"] for w in row if w >= 0)
    assert scored == list(range(len(long["tokens"])))
    labelled = sum(label != IGNORE for row in feats["labels"] for label in row)
    assert labelled == len(long["tokens"])


# ---- data ----------------------------------------------------------------------------------------------------------


def test_conll_column_files_are_read_into_words_and_tags(tmp_path: Path) -> None:
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n"
        "-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP B-LOC\n"
    )
    (tmp_path / "train.conll").write_text(text)
    rows = list(load_split(SplitConfig(path=str(tmp_path / "train.conll")), "data.train"))
    assert rows == [
        {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]},
    ]
    (tmp_path / "bad.conll").write_text("EU B-ORG\nlonely\n")
    with pytest.raises(InputError, match=r"bad.conll line 2"):
        load_split(SplitConfig(path=str(tmp_path / "bad.conll")), "data.train")


def test_int_tags_take_their_names_from_the_recipe(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    names = ["O", "B-PER", "I-PER"]
    rows = [{"tokens": ["alice", "said"], "ner_tags": [1, 0]}, {"tokens": ["bob", "smithson"], "ner_tags": [1, 2]}]
    task = task_for(ner_bert, ner_data, tmp_path, **{"token_classification.label_names": names})
    raw = DatasetDict({"train": Dataset.from_list(rows)})
    task.prepare(raw)
    assert task.labels == names and raw["train"][1]["tags"] == ["B-PER", "I-PER"]
    plain = task_for(ner_bert, ner_data, tmp_path)
    with pytest.raises(InputError, match=r"data.train row 0: tags are ids without names"):
        plain.prepare(DatasetDict({"train": Dataset.from_list(rows)}))
    # the Hub's layout: ids with their names in a ClassLabel feature
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    hub = task_for(ner_bert, ner_data, tmp_path)
    hub.prepare(DatasetDict({"train": Dataset.from_list(rows, features=features)}))
    assert hub.labels == names


@pytest.mark.parametrize(
    ("row", "split", "message"),
    [
        ({"tokens": ["alice", "said"], "ner_tags": ["B-PER"]}, "train", r"data.train row 3: 2 words but 1 tags"),
        ({"tokens": [], "ner_tags": []}, "train", r"data.train row 3: column 'tokens' must be a non-empty list"),
        ({"tokens": ["alice", " "], "ner_tags": ["B-PER", "O"]}, "train", r"data.train row 3: .* empty or non-text"),
        ({"tokens": ["alice"], "ner_tags": ["B-XYZ"]}, "validation", r"data.validation row 3: tag 'B-XYZ' not among"),
    ],
)
def test_bad_rows_exit_2_naming_the_row(
    row: dict, split: str, message: str, ner_bert: Path, ner_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = ner_data / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows.insert(3, row)
    write_jsonl(path, rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(ner_recipe(ner_bert, ner_data, tmp_path / "run")))
    line = expect_exit_2(["train", str(recipe)], capsys, [])
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


# ---- training, every method ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(LRS))
def test_every_method_trains_only_its_parameters_and_reloads(
    method: str, ner_bert: Path, ner_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = ner_recipe(ner_bert, ner_data, out, **{"method.name": method, "training.lr": LRS[method]})
    results, model, before = train_capturing(raw)
    assert results["primary_metric"] == "f1" and "f1" in results["metrics"]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses
    check_trained_parameters(method, model, before)

    task, reloaded, tokenizer, info = load_final(out)
    assert info["method"] == method and info["labels"] == task.labels == sorted(task.labels)
    batch = tokenizer([["alice", "said", "in", "new", "york"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
    # eval of the saved model gives the final validation figures
    scores = evaluate_checkpoint(recipe_from_dict(raw), str(out))
    assert scores["metrics"]["f1"] == pytest.approx(results["metrics"]["f1"], abs=1e-9)
    if get_method(method).mergeable:
        merged = merge_checkpoint(out, tmp_path / "merged")
        plain = AutoModelForTokenClassification.from_pretrained(merged)
        assert plain.config.id2label == dict(enumerate(task.labels))
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(**batch).logits, model(**batch).logits)


def test_full_finetuning_finds_the_entities_and_predict_gives_offsets(
    ner_bert: Path, ner_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = ner_recipe(ner_bert, ner_data, out, **{"method.name": "full", "training.lr": 3e-3, "training.epochs": 10})
    results, _, _ = train_capturing(raw)
    assert results["metrics"]["f1"] > 0.8, results["metrics"]
    rows = check_predictions(out, {"validation": rows_in(ner_data / "validation.jsonl")})["validation"]
    assert all(len(r["prediction"]) == len(r["reference"]) == len(r["tokens"]) for r in rows)
    task, model, _, _ = load_final(out, recipe_from_dict(raw))
    text = "  alice said   in new york to bob smithson"
    rows = [{"text": text}, {"tokens": ["said", "carol", "jones", "of", "acme", "corporation"]}]
    first, second = task.predict(model, rows)
    assert len(first["tags"]) == len(first["words"]) == 8
    found = {(e["type"], e["text"], e["start"], e["end"]) for e in first["entities"]}
    assert ("LOC", "new york", text.index("new"), text.index("york") + 4) in found
    for e in first["entities"]:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert [(e["type"], e["text"]) for e in second["entities"]] == [("PER", "carol jones"), ("ORG", "acme corporation")]


def test_windows_point_at_their_rows_across_map_batches(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    """datasets.map hands rows over 1,000 at a time: each window's example index must still count rows of the split."""
    from datasets import Dataset, DatasetDict

    rows = ner_rows(1500, seed=7)
    task = task_for(ner_bert, ner_data, tmp_path)
    raw = DatasetDict({"train": Dataset.from_list(rows[:200]), "validation": Dataset.from_list(rows)})
    task.prepare(raw)
    encoded = task.preprocess(raw)
    index, examples = task._eval["validation"]
    assert sorted(set(index["example_index"])) == list(range(1500)) and len(encoded["validation"]) >= 1500
    scored: dict[int, list[int]] = {}
    for words, example in zip(index["word_index"], index["example_index"], strict=True):
        scored.setdefault(example, []).extend(w for w in words if w >= 0)
    for example, words in scored.items():
        assert sorted(words) == list(range(len(examples[example]["words"]))), example


def test_compare_ranks_token_classification_runs_by_entity_f1(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    from hf_finetune.compare import compare

    raw = ner_recipe(ner_bert, ner_data, tmp_path / "cmp", **{"training.max_steps": 6})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    compare(str(recipe), ["full", "lora"], [1], train_fn=lambda r: engine.train(r, overwrite=True))
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["primary_metric"] == "f1"
    for row in data["runs"]:
        results = json.loads((tmp_path / "cmp" / row["method"] / "seed1" / "results.json").read_text())
        assert row["quality"] == results["metrics"]["f1"]


def test_batches_are_not_grouped_by_length_unless_asked(ner_bert: Path, ner_data: Path, tmp_path: Path) -> None:
    from hf_finetune.sampling import build_loaders

    for override, grouped in ((None, False), (True, True)):
        extra = {} if override is None else {"training.group_by_length": override}
        task = task_for(ner_bert, ner_data, tmp_path, **extra)
        encoded = {"train": Dataset.from_dict({"input_ids": [[1]] * 8, "length": [1] * 8})}
        loader, _ = build_loaders(task, encoded, task.recipe.training, world=1)
        assert loader.sampler.group_by_length is grouped
    out = tmp_path / "run"
    engine.train(recipe_from_dict(ner_recipe(ner_bert, ner_data, out, **{"training.max_steps": 1})))
    assert json.loads((out / "recipe.resolved.json").read_text())["training"]["group_by_length"] is False
