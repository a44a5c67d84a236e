"""Loading splits from every local format, resolving data roots, and the errors that name file, column or row."""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import pytest
from conftest import write_jsonl

from hf_finetune.data import load_split, load_splits, resolve_path
from hf_finetune.errors import InputError
from hf_finetune.recipe import ColumnsConfig, DataConfig, Recipe, SplitConfig
from hf_finetune.tasks.classification import ClassificationTask

ROWS = [{"text": f"row {i}", "label": ["neg", "pos"][i % 2]} for i in range(10)]


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "disk", "disk_dict", "folder"])
def test_every_local_format_loads_the_same_rows(fmt: str, tmp_path: Path) -> None:
    split = None
    if fmt == "csv":
        path = write_csv(tmp_path / "d.csv", ROWS)
    elif fmt == "tsv":
        path = write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t")
    elif fmt in ("jsonl", "json"):
        path = write_jsonl(tmp_path / f"d.{fmt}", ROWS)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif fmt == "disk_dict":
        path, split = tmp_path / "saved_dict", "dev"
        datasets.DatasetDict({"dev": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    else:
        path = tmp_path / "parts"
        path.mkdir()
        write_jsonl(path / "a.jsonl", ROWS[:4])
        write_jsonl(path / "b.jsonl", ROWS[4:])
    dataset = load_split(SplitConfig(path=str(path), split=split), "data.train")
    assert dataset.to_list() == ROWS


def test_max_samples_and_empty_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(load_split(SplitConfig(path=str(path), max_samples=3), "data.train")) == 3
    # skip then max_samples: a hold-out and the rest of one file, disjoint and together the whole
    held = load_split(SplitConfig(path=str(path), max_samples=2), "data.validation").to_list()
    rest = load_split(SplitConfig(path=str(path), skip=2), "data.train").to_list()
    assert held + rest == ROWS and held == ROWS[:2]
    streamed = load_split(SplitConfig(path=str(path), skip=2, streaming=True), "data.train")
    assert list(streamed) == rest
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(InputError, match="data.validation: split is empty"):
        load_split(SplitConfig(path=str(empty)), "data.validation")


def test_relative_paths_resolve_against_hf_finetune_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", ROWS)
    monkeypatch.setenv("HF_FINETUNE_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path / "sub")
    assert resolve_path("sub/d.jsonl") == tmp_path / "sub" / "d.jsonl"
    assert len(load_split(SplitConfig(path="sub/d.jsonl"), "data.train")) == len(ROWS)
    with pytest.raises(InputError, match="data.train.path: nowhere.jsonl not found"):
        load_split(SplitConfig(path="nowhere.jsonl"), "data.train")


def test_malformed_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 1}\n{"text": broken\n')
    with pytest.raises(InputError, match="bad.jsonl: cannot be parsed as json"):
        load_split(SplitConfig(path=str(bad)), "data.train")


def task_for(tmp_path: Path, train: list[dict], validation: list[dict], **columns: str) -> ClassificationTask:
    config = DataConfig(
        train=SplitConfig(path=str(write_jsonl(tmp_path / "train.jsonl", train))),
        validation=SplitConfig(path=str(write_jsonl(tmp_path / "validation.jsonl", validation))),
        columns=ColumnsConfig(**columns),
    )
    task = ClassificationTask(Recipe(data=config))
    task.prepare(load_splits(config))
    return task


def test_label_set_comes_from_train_sorted(tmp_path: Path) -> None:
    task = task_for(tmp_path, ROWS, ROWS[:2])
    assert task.labels == ["neg", "pos"]
    ints = [{"text": "x", "label": v} for v in (3, 1, 2, 1)]
    assert task_for(tmp_path, ints, ints[:1]).labels == [1, 2, 3]


def test_unseen_validation_label_names_the_row(tmp_path: Path) -> None:
    validation = [*ROWS[:3], {"text": "x", "label": "neutral"}]
    with pytest.raises(
        InputError, match=r"data.validation row 3: label 'neutral' not among the training labels"
    ):
        task_for(tmp_path, ROWS, validation)


def test_missing_column_names_the_key_and_the_columns(tmp_path: Path) -> None:
    with pytest.raises(
        InputError,
        match=r"data.train: column\(s\) data.columns.text='review' not found; the split has text, label",
    ):
        task_for(tmp_path, ROWS, ROWS, text="review")


def test_single_label_and_empty_label_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="single label"):
        task_for(tmp_path, [{"text": "a", "label": "pos"}] * 3, [{"text": "a", "label": "pos"}])
    with pytest.raises(InputError, match="data.train row 1: label column 'label' is empty"):
        task_for(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": None}], ROWS[:1])


def test_each_split_says_where_its_data_comes_from(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    local = write_csv(tmp_path / "train.csv", [{"text": "a b", "label": "x"}])
    load_split(SplitConfig(path=str(local)), "data.train")
    assert f"hf-finetune: data.train: {local}" in capsys.readouterr().err
    # not here: the Hub dataset of the same name, which this offline test cannot reach
    with pytest.raises(InputError, match="could not load Hub dataset 'nobody/none'"):
        load_split(SplitConfig(path=str(tmp_path / "missing.csv"), name="nobody/none"), "data.validation")
    said = capsys.readouterr().err
    assert f"data.validation: Hub dataset 'nobody/none' ({tmp_path / 'missing.csv'} not found locally)" in said
