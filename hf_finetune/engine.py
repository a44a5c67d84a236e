"""The one training loop, on `accelerate.Accelerator`, serving every task and method."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from hf_finetune import checkpoint
from hf_finetune.data import load_splits
from hf_finetune.hub import resolve_model
from hf_finetune.methods import apply_method, build_optimizer, default_lr, resolve_method
from hf_finetune.recipe import Recipe
from hf_finetune.sampling import LengthGroupedSampler, eval_loader
from hf_finetune.system import choose_precision, peak_memory_mb, versions
from hf_finetune.tasks import get_task


def steps_per_epoch(num_examples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: accelerate deals whole batches round-robin to processes and syncs at the end."""
    batches_per_process = math.ceil(math.ceil(num_examples / batch_size) / world_size)
    return math.ceil(batches_per_process / grad_accum)


def train(recipe: Recipe) -> dict[str, Any]:
    t = recipe.training
    out = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=choose_precision(t.precision),
        log_with="tensorboard",
        project_dir=str(out),
    )
    set_seed(t.seed)
    task = get_task(recipe)
    raw = load_splits(recipe.data)
    task.prepare(raw)  # every data problem surfaces before weights load

    model_path = resolve_model(recipe.model.name_or_path, recipe.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers ship without a pad token; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    with accelerator.main_process_first():  # one process tokenises, the others read datasets' cache
        encoded = task.preprocess(raw, tokenizer)
    train_set = encoded["train"]
    per_epoch = steps_per_epoch(len(train_set), t.batch_size, accelerator.num_processes, t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(per_epoch * t.epochs))
    epochs = math.ceil(total_steps / per_epoch)

    method = resolve_method(recipe.method, total_steps)
    lr = t.lr or default_lr(method.name)
    model = task.load_model(model_path)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model, on_step_end = apply_method(model, method, task.peft_task_type, task.head_modules, total_steps)
    trainable, total = count_parameters(model)

    collate = task.collator(tokenizer)
    sampler = LengthGroupedSampler(
        train_set["length"], t.batch_size * t.grad_accum, t.seed, t.group_by_length
    )
    train_loader = DataLoader(
        train_set.remove_columns("length"), t.batch_size, sampler=sampler, collate_fn=collate
    )
    eval_loaders = {
        split: eval_loader(encoded[split], t.eval_batch, collate)
        for split in ("validation", "test")
        if split in encoded
    }
    optimizer = build_optimizer(model, method, lr, t.weight_decay)
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}

    resolved = {**recipe.to_dict(), "method": method.__dict__, "training": {**t.__dict__, "lr": lr}}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not t.resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        (out / "recipe.resolved.json").write_text(json.dumps(resolved, indent=2))
    accelerator.init_trackers("tensorboard")
    log = checkpoint.MetricsLog(out / "metrics.jsonl", accelerator)

    step, skip = 0, 0
    if t.resume:
        step = checkpoint.load_latest(accelerator, out)
        skip = (step * t.grad_accum) % len(
            train_loader
        )  # micro-batches of the interrupted epoch already seen
    progress = tqdm(
        total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train"
    )
    model.train()
    samples, micro_batches = 0, 0
    running_loss = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    start = time.perf_counter()
    last_eval: dict[str, float] = {}
    for epoch in range(step // per_epoch, epochs):
        sampler.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        skip = 0
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if accelerator.sync_gradients and on_step_end is not None:
                    on_step_end(accelerator.unwrap_model(model), step + 1)
                optimizer.zero_grad()
            running_loss += loss.detach()
            micro_batches += 1
            samples += batch["input_ids"].shape[0]
            tokens += (
                batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            )
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % t.logging_every == 0 or step == total_steps:
                # one host-device sync per logging interval, not per step
                mean_loss = accelerator.reduce(running_loss, "mean").item() / micro_batches
                running_loss.zero_()
                micro_batches = 0
                log.write({"step": step, "epoch": epoch, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{mean_loss:.4f}")
            if (
                t.eval_every
                and step % t.eval_every == 0
                and step < total_steps
                and "validation" in eval_loaders
            ):
                last_eval = task.evaluate(model, eval_loaders["validation"], accelerator)
                log.write({"step": step, **{f"validation/{k}": v for k, v in last_eval.items()}})
            if t.save_every and step % t.save_every == 0:
                checkpoint.save_state(accelerator, out, step)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    runtime = time.perf_counter() - start
    tokens = int(tokens)
    progress.close()

    metrics = (
        task.evaluate(model, eval_loaders["validation"], accelerator) if "validation" in eval_loaders else {}
    )
    test_metrics = (
        task.evaluate(model, eval_loaders["test"], accelerator, "test") if "test" in eval_loaders else None
    )
    log.write({"step": step, **{f"validation/{k}": v for k, v in metrics.items()}})
    world = accelerator.num_processes
    results = {
        "task": recipe.task,
        "method": method.name,
        "model": recipe.model.name_or_path,
        "metrics": metrics,
        **({"test_metrics": test_metrics} if test_metrics is not None else {}),
        "trainable_params": trainable,
        "total_params": total,
        "train_runtime_s": runtime,
        # counts are this process's; every process sees the same number of batches, so scale by the world size
        "train_samples_per_s": samples * world / runtime if runtime else 0.0,
        "train_tokens_per_s": tokens * world / runtime if runtime else 0.0,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "steps": step,
        "epochs": step / per_epoch,
        "seed": t.seed,
        "world_size": world,
        "global_batch_size": t.batch_size * t.grad_accum * world,
        "precision": accelerator.mixed_precision,
        "versions": versions(),
        "recipe_hash": recipe.run_hash(),
        "recipe": resolved,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_final(
            accelerator.unwrap_model(model), tokenizer, task, recipe, method.name, out / "model"
        )
        checkpoint.write_json_atomic(out / "results.json", results)
    accelerator.end_training()
    return results


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
