"""Experiment trackers through accelerate's: each records the resolved recipe and the values of metrics.jsonl, read
back with the tracker's own reader (TensorBoard's event files, W&B's offline run folder, MLflow's client on a local
file store). A tracker that is not installed is a recipe error naming its pip package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import tiny_recipe
from test_bad_inputs import expect_exit_2

from hf_finetune.engine import train
from hf_finetune.recipe import recipe_from_dict


def logged(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file (`run-*.wandb`): LevelDB's log format (32 KiB blocks; records
    of 7-byte header, crc32 + length + type, full or in pieces) after a 7-byte W&B header. wandb 0.31 ships no Python
    reader of its own (its Go core reads these files)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pieces, at, block = [], b"", 7, 32768
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = int.from_bytes(data[at + 4 : at + 6], "little"), data[at + 6]
        pieces += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
        elif kind == 0:
            break  # zero padding at the end of the file
    return records


def run(tiny_bert: Path, data_dir: Path, out: Path, report_to: list[str]) -> dict:
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"training.max_steps": 6, "training.logging_every": 2,
                                                   "training.eval_every": 3, "training.report_to": report_to})  # fmt: skip
    return train(recipe_from_dict(raw))


def test_tensorboard_by_default_holds_the_logged_losses_and_the_recipe(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"training.max_steps": 6, "training.logging_every": 2})
    train(recipe_from_dict(raw))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars == pytest.approx(logged(out, "loss"), rel=1e-6)
    hparams = list((out / "tensorboard").glob("*/hparams.yml"))
    assert hparams and "training.lr" in hparams[0].read_text()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_writes_its_run_folder_with_config_and_summary(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    results = run(tiny_bert, data_dir, out, ["wandb"])
    (folder,) = (out / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    records = wandb_records(log)
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["training.max_steps"] == 6 and config["task"] == "classification"
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                if key not in ("_step", "_runtime", "_timestamp"):
                    history.setdefault(key, {})[items["_step"]] = value
    assert history["loss"] == pytest.approx(logged(out, "loss"), rel=1e-6)
    assert history["validation/accuracy"] == pytest.approx(logged(out, "validation/accuracy"))
    assert history["validation/accuracy"][6] == pytest.approx(results["metrics"]["accuracy"])
    assert not (out / "tensorboard").exists()  # only what report_to names


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_file_store_records_params_and_metric_history(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    out = tmp_path / "run"
    run(tiny_bert, data_dir, out, ["mlflow", "tensorboard"])
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "hf-finetune"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["training.max_steps"] == "6" and found.data.params["task"] == "classification"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx(logged(out, "loss"), rel=1e-6)
    accuracy = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "validation/accuracy")}
    assert accuracy == pytest.approx(logged(out, "validation/accuracy"))


def test_a_tracker_that_is_not_installed_names_its_package(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if importlib.util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_bert, data_dir, tmp_path / "run")))
    expect_exit_2(["train", str(recipe), "training.report_to=[comet_ml]"], capsys,
                  ["training.report_to", "pip install comet-ml"])  # fmt: skip
    expect_exit_2(["train", str(recipe), "training.report_to=[tensorbord]"], capsys,
                  ["training.report_to", "unknown tracker 'tensorbord'"])  # fmt: skip
    assert not (tmp_path / "run").exists()
