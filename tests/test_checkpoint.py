"""checkpoint.py without training: rotation keeps the newest K plus the best, a log cut short by a crash is trimmed,
an empty or partial saved adapter fails loudly, and output_dir refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from hf_finetune import checkpoint
from hf_finetune.errors import InputError
from hf_finetune.methods.lora import METHOD as LORA


def fake_checkpoint(out: Path, step: int, score: float | None) -> None:
    folder = out / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / checkpoint.STATE_NAME).write_text(json.dumps({"step": step, "score": score}))


@pytest.mark.parametrize(("higher", "best"), [(True, 4), (False, 2)])
def test_rotation_keeps_newest_and_best(tmp_path: Path, higher: bool, best: int) -> None:
    for step, score in [(2, 0.1), (4, 0.9), (6, None), (8, 0.5), (10, 0.5)]:
        fake_checkpoint(tmp_path, step, score)
    (tmp_path / "checkpoints" / ".step_00000012.tmp").mkdir()  # a crash mid-write: never counted
    assert checkpoint.rotate_checkpoints(tmp_path, keep=2, higher_is_better=higher).name == f"step_{best:08d}"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best:08d}", "step_00000008", "step_00000010"})
    assert (
        json.loads((tmp_path / "checkpoints" / "best.json").read_text())["checkpoint"] == f"step_{best:08d}"
    )


def test_trim_metrics_drops_later_and_cut_lines(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 3, "loss": 1}\n{"step": 6, "loss": 2}\n{"step": 9, "lo')
    checkpoint.trim_metrics(log, 5)
    assert log.read_text() == '{"step": 3, "loss": 1}\n'
    checkpoint.trim_metrics(log, 0)
    assert not log.exists()


def test_verify_saved_fails_loudly_on_empty_or_partial_adapter(tmp_path: Path) -> None:
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = get_peft_model(
        BertForSequenceClassification(config), LoraConfig(target_modules=["query", "value"])
    )
    model.save_pretrained(tmp_path)
    checkpoint.verify_saved(LORA, model, tmp_path)  # what was just written reads back identical

    weights = tmp_path / "adapter_model.safetensors"
    save_file({}, str(weights))
    with pytest.raises(RuntimeError, match="empty"):
        checkpoint.verify_saved(LORA, model, tmp_path)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match="missing"):
        checkpoint.verify_saved(LORA, model, tmp_path)
    state[dropped] = torch.ones_like(get_peft_model_state_dict(model)[dropped]) * 7
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match="changed"):
        checkpoint.verify_saved(LORA, model, tmp_path)


def test_output_dir_checks(tmp_path: Path) -> None:
    checkpoint.check_output_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(InputError, match="already holds a run"):
        checkpoint.check_output_dir(tmp_path, resume=False, overwrite=False)
    checkpoint.check_output_dir(tmp_path, resume=False, overwrite=True)
    checkpoint.check_output_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(InputError, match="no complete checkpoint"):
        checkpoint.find_resume_checkpoint(tmp_path, True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        checkpoint.check_output_dir(tmp_path / "file", resume=True, overwrite=True)
