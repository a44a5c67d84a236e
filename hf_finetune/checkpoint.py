"""What a run writes and reads back: metrics log, resumable state, the final model folder, results.json.

Everything lands in a temporary sibling first and is renamed into place, so a crash mid-write never leaves a
file or folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft.utils import SAFETENSORS_WEIGHTS_NAME as SAFE_ADAPTER_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hf_finetune.device import Padding
from hf_finetune.errors import DiskFull, InputError
from hf_finetune.hub import resolve_model
from hf_finetune.methods import Method, TaskInfo, get_method
from hf_finetune.recipe import Recipe, recipe_from_dict
from hf_finetune.tasks import Task, get_task

INFO_NAME = "hf_finetune.json"
STATE_NAME = "trainer_state.json"
HOOK_STATE_NAME = "method_state.safetensors"


class MetricsLog:
    """metrics.jsonl on the main process, and the same values to accelerate's trackers (TensorBoard)."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, record: dict[str, Any]) -> None:
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # a line cut short is dropped when the run resumes (trim_metrics)
                raise DiskFull(f"{self.path}: no space left on device while logging step {record['step']}") from err


def prepare_output_dir(out: Path, step: int, replace: bool, resolved: dict[str, Any]) -> None:
    """Main process only, once every check has passed: the folder, the log continued from `step`, the recipe."""
    out.mkdir(parents=True, exist_ok=True)
    if replace:
        # the replaced run's checkpoints: resuming from them later would mix two runs
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if step == 0:
        shutil.rmtree(out / "predictions", ignore_errors=True)  # the replaced run's, written by its final evaluation
    trim_metrics(out / "metrics.jsonl", step)
    (out / "recipe.resolved.json").write_text(json.dumps(resolved, indent=2))


def trim_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to `step`: a resumed run rewrites what the interrupted one logged after its checkpoint;
    a fresh run (step 0) starts a fresh log."""
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut short by the crash


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_errors(path, tmp):
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (numpy scalars and other odd values as strings), replacing `path` only when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_errors(path, tmp):
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)


# how torch's PytorchStreamWriter words a write that the file system refused
TORCH_WRITE_FAILURES = ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter failed")


@contextmanager
def disk_errors(target: Path, tmp: Path) -> Iterator[None]:
    """A full disk is the user's to fix: remove the partial `tmp` and say so in one line; `target` is untouched."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # torch.save (accelerate's optimizer and RNG files) reports a failed write as a RuntimeError of its
        # stream writer, without errno
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in TORCH_WRITE_FAILURES):
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(target.parent).free / 2**20
        reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise DiskFull(
            f"{target}: no space left on device while saving ({reason}; {free:.1f} MB free on "
            f"{target.parent}); the partial copy was removed and what was saved before is intact"
        ) from err


# Files a run writes; an output_dir holding any of them belongs to a run already.
RUN_MARKERS = ("results.json", "recipe.resolved.json", "metrics.jsonl", "checkpoints", "model")


def check_output_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse to mix a new run into another run's folder (or into a file) unless asked to."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir: {out} is a file, not a folder")
    if resume or overwrite or not out.is_dir():
        return
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found:
        raise InputError(
            f"output_dir: {out} already holds a run ({', '.join(found)}); pass --overwrite to replace it, "
            "training.resume=true to continue it, or choose another output_dir"
        )


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose state file was written: the rename happens after it, so these are whole."""
    return sorted(p for p in (out / "checkpoints").glob("step_*") if (p / STATE_NAME).exists())


def find_resume_checkpoint(out: Path, resume: bool | str) -> Path | None:
    """The checkpoint `training.resume` names: the newest in output_dir for `true`, or the given folder."""
    if isinstance(resume, str):
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise InputError(
                f"training.resume: {path} is not a checkpoint (no {STATE_NAME}); give a checkpoints/step_N folder"
            )
        return path
    done = complete_checkpoints(out) if resume else []
    if resume and not done and any((out / name).exists() for name in RUN_MARKERS):
        raise InputError(
            f"training.resume: {out} holds a run but no complete checkpoint to resume from; pass --overwrite to "
            "start it over"
        )
    return done[-1] if done else None


def load_state(
    accelerator: Accelerator, folder: Path, global_batch: int, method: Method, model: torch.nn.Module
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, every process's RNG states and the method's own state; returns the loop's
    own state.

    accelerate reads optimizer, scheduler and RNG files with `torch.load(weights_only=True)` plus an allow-list of
    numpy types (accelerate.utils.other.load); model weights come from safetensors."""
    state = json.loads((folder / STATE_NAME).read_text())
    if state.get("global_batch", global_batch) != global_batch:
        # the checkpoint's step counts batches of its own size: another size lands elsewhere in the data
        raise InputError(
            f"training.resume: {folder} was written with global batch {state['global_batch']}, this run has "
            f"{global_batch} (batch_size x processes x grad_accum); resume with the same settings"
        )
    accelerator.load_state(str(folder))
    if (folder / HOOK_STATE_NAME).is_file():
        with safe_open(str(folder / HOOK_STATE_NAME), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
        method.load_extra_state(model, load_file(str(folder / HOOK_STATE_NAME)), meta)
    return state


def save_state(
    accelerator: Accelerator,
    out: Path,
    state: dict[str, Any],
    keep: int | None,
    higher_is_better: bool,
    method: Method | None = None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Model/adapter, optimizer, scheduler and RNG states (accelerate), plus the loop's `state` (step, running loss,
    the evaluation at this step) in trainer_state.json, written last so its presence marks a whole checkpoint."""
    final = out / "checkpoints" / f"step_{state['step']:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    accelerator.wait_for_everyone()
    with disk_errors(final, tmp):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's RNG file is in before the rename
        if accelerator.is_main_process:
            if not any(f.stat().st_size for f in tmp.glob("*model*")):
                raise RuntimeError(f"{tmp}: accelerate wrote no model weights into the checkpoint")
            extra = method.extra_state(model) if method is not None else None
            if extra is not None:
                # a method's own state as safetensors, so resuming unpickles nothing of ours
                tensors = {k: v.detach().contiguous().cpu() for k, v in extra[0].items()}
                save_file(tensors, str(tmp / HOOK_STATE_NAME), metadata={"state": json.dumps(extra[1])})
            (tmp / STATE_NAME).write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            rotate_checkpoints(out, keep, higher_is_better)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(out: Path, keep: int | None, higher_is_better: bool) -> Path | None:
    """Keep the newest `keep` checkpoints and the best scored one; record the best in checkpoints/best.json."""
    done = complete_checkpoints(out)
    scored = [(json.loads((p / STATE_NAME).read_text()).get("score"), p) for p in done]
    scored = [(s, i, p) for i, (s, p) in enumerate(scored) if s is not None and math.isfinite(s)]
    best = None
    if scored:
        # ties go to the earlier checkpoint: it reached the score first
        score, _, best = min(scored, key=lambda sip: (-sip[0] if higher_is_better else sip[0], sip[1]))
        write_json_atomic(out / "checkpoints" / "best.json", {"checkpoint": best.name, "score": score})
    if keep is not None:
        for old in done[: max(0, len(done) - keep)]:
            if old != best:
                shutil.rmtree(old)
    return best


def name_base_model(folder: Path, base: str) -> None:
    """An adapter's config names its base model as the recipe gave it (a Hub id, or the user's own path), not the
    resolved local folder (the embedded MiniLM lives inside this machine's virtual environment): PEFT's
    `AutoPeftModel*` loaders read it to fetch the base model on any machine."""
    for name in ("adapter_config.json", "prefix_config.json", "prompt_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["base_model_name_or_path"] = base
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# PEFT task types whose head has a label set that plain loaders must be told (the base model's config has its own)
LABELLED_HEADS = ("SEQ_CLS", "TOKEN_CLS")


def head_config(model: torch.nn.Module) -> dict[str, Any]:
    """The head's size, labels and problem type: what `AutoPeftModelFor*.from_pretrained` needs as keyword arguments,
    since PEFT loads the base model from its own config (two labels, LABEL_0/LABEL_1) before the adapter's head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = base.config
    return {"num_labels": c.num_labels, "id2label": c.id2label, "label2id": c.label2id, "problem_type": c.problem_type}


def save_final(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    recipe: Recipe,
    method: Method,
    target: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model: str | None = None,
) -> None:
    """HF-format folder: the method's weights (an adapter for PEFT methods, the whole model for full fine-tuning,
    safetensors either way), the tokenizer, and what rebuilds the task.

    `state_dict` is the gathered full state under FSDP/DeepSpeed, where the model's own parameters are shards."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(target, tmp):
        method.save(model, tmp, state_dict)
        name_base_model(tmp, base_model or recipe.model.name_or_path)
        tokenizer.save_pretrained(tmp)
        info = {
            "task": recipe.task,
            "method": method.name,
            # what an adapter applies to: the recipe's model, or the from-scratch run's init/ folder
            "base_model": base_model or recipe.model.name_or_path,
            "recipe": recipe.to_dict(),
            "auto_class": task.auto_class,
            **({"head_config": head_config(model)} if task.peft_task_type in LABELLED_HEADS else {}),
        }
        (tmp / INFO_NAME).write_text(json.dumps({**info, **task.checkpoint_info()}, indent=2, default=str))
        verify_saved(method, model, tmp, compare=state_dict is None)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)


def verify_saved(method: Method, model: torch.nn.Module, folder: Path, compare: bool = True) -> None:
    """Read back what was just saved: an empty or partial adapter (the classic result of saving a still-wrapped
    DDP/FSDP model) must fail the run now, loudly, not at the next load."""
    weights, expected = method.saved_weights(model, folder)
    if not weights.exists() and weights.with_name(f"{weights.name}.index.json").exists():
        return  # sharded: transformers wrote and indexed every shard itself
    if not weights.is_file():
        raise RuntimeError(f"{weights}: not written by save_pretrained")
    loaded = load_file(str(weights))
    if not loaded:
        raise RuntimeError(f"{weights}: saved weights are empty")
    if expected is None:
        return
    missing = sorted(expected.keys() - loaded.keys())
    changed = [
        k for k, v in expected.items() if compare and k in loaded and not torch.equal(loaded[k], v.cpu())
    ]
    if missing or changed:
        raise RuntimeError(
            f"{weights}: reloaded adapter differs from the model: missing {missing}, changed {changed}"
        )


def find_model_dir(path: str | Path) -> Path:
    """Accept a run's output_dir or its model folder."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / INFO_NAME).exists():
            return candidate
    raise InputError(
        f"checkpoint: {path} holds no {INFO_NAME} (expected a run's output_dir or its model/ folder)"
    )


def load_final(
    path: str | Path, recipe: Recipe | None = None, padding: Padding | None = None
) -> tuple[Task, torch.nn.Module, Any, dict]:
    """(task, model, tokenizer, info) from a folder `save_final` wrote; the recipe defaults to the one saved there,
    the task's padding to the rule for this process's device."""
    folder = find_model_dir(path)
    info = json.loads((folder / INFO_NAME).read_text())
    recipe = recipe or recipe_from_dict(info["recipe"], source=str(folder / INFO_NAME))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers ship without one; batches need it
    task = get_task(recipe, tokenizer, padding)
    task.restore(info)
    if (folder / "adapter_config.json").exists() and not (folder / SAFE_ADAPTER_NAME).is_file():
        raise InputError(f"checkpoint: {folder} has no {SAFE_ADAPTER_NAME}; only safetensors weights are loaded")
    method = get_method(info["method"])
    task.model_kwargs = method.load_kwargs(TaskInfo(task.peft_task_type, task.head_modules))
    if method.saves_whole_model:
        model = task.load_model(str(folder))
    else:
        base = task.load_model(resolve_model(info["base_model"], recipe.model.revision))
        model = method.load(base, folder)
    return task, model.eval(), tokenizer, info
