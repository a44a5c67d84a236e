"""The one training loop, on `accelerate.Accelerator`, serving every task and method."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    TorchDynamoPlugin,
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, get_scheduler

from hf_finetune import checkpoint
from hf_finetune.data import load_splits
from hf_finetune.dropout import use_fast_dropout
from hf_finetune.errors import InputError
from hf_finetune.hub import resolve_model
from hf_finetune.methods import (
    apply_method,
    build_optimizer,
    default_lr,
    default_warmup_ratio,
    leave_input_casts_to_autocast,
    resolve_method,
    virtual_positions,
)
from hf_finetune.padding import MULTIPLE
from hf_finetune.recipe import Recipe, TrainingConfig
from hf_finetune.sampling import LengthGroupedSampler, eval_loader
from hf_finetune.system import choose_precision, peak_memory_mb, prepare_run, versions
from hf_finetune.tasks import TASKS, get_task


def steps_per_epoch(num_examples: int, global_batch: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: the loader deals global batches (split across processes) and accelerate syncs
    gradients at the end of the epoch even when the last accumulation window is short."""
    return math.ceil(math.ceil(num_examples / global_batch) / grad_accum)


def train(recipe: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Run the recipe; `overwrite` lets it replace a finished run in `output_dir` (otherwise refused)."""
    t = recipe.training
    out = Path(recipe.output_dir)
    accelerator = make_accelerator(t, out)
    world = accelerator.num_processes
    set_seed(t.seed)
    task = get_task(recipe)
    raw = load_splits(recipe.data)
    task.prepare(raw)  # every data problem surfaces before weights load
    checkpoint.check_output_dir(out, t.resume, overwrite)
    resume_from = checkpoint.find_resume_checkpoint(out, t.resume)

    if recipe.model.from_scratch is not None:
        model_path = build_from_scratch(recipe, task, raw, out, accelerator, resume_from is not None)
    else:
        model_path = resolve_model(
            recipe.model.encoder_decoder_from or recipe.model.name_or_path, recipe.model.revision
        )
    check_model(model_path, recipe)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers ship without a pad token; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(task, "attach_tokenizer"):  # generation tasks decode their outputs when evaluating
        task.attach_tokenizer(tokenizer)
    with accelerator.main_process_first():  # one process tokenises, the others read datasets' cache
        encoded = task.preprocess(raw, tokenizer)
    train_set = encoded["train"]
    global_batch = t.batch_size * world
    per_epoch = steps_per_epoch(len(train_set), global_batch, t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(per_epoch * t.epochs))
    epochs = math.ceil(total_steps / per_epoch)

    method = resolve_method(recipe.method, total_steps)
    lr = t.lr or default_lr(method.name)
    warmup_ratio = t.warmup_ratio if t.warmup_ratio is not None else default_warmup_ratio(method.name)
    model = task.load_model(model_path)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model, on_step_end = apply_method(model, method, task.peft_task_type, task.head_modules, total_steps)
    # dropout with the same distribution as torch's, its CPU masks ~3x cheaper: a LoRA step on MiniLM ran ~15% faster
    # (hf_finetune/dropout.py, docs/benchmarks.md); on other devices torch's own dropout runs unchanged. Not when
    # compiling: its sampling loop has data-dependent sizes that dynamo cannot trace, and inductor fuses torch's own.
    if not t.compile:
        use_fast_dropout(model)
    if accelerator.mixed_precision != "no":
        leave_input_casts_to_autocast(model)
    trainable, total = count_parameters(model)

    train_loader, eval_loaders = build_loaders(task, encoded, tokenizer, t, world)
    # fused AdamW: on one CPU thread the for-loop AdamW spends ~230 ms per step on MiniLM's 22.7M parameters, the
    # fused kernel ~50 ms; training ran 1.11x faster (docs/benchmarks.md, issue #8). Other devices keep the for-loop.
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = build_optimizer(model, method, lr, t.weight_decay, fused=fused)
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=int(warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}

    resolved = {
        **recipe.to_dict(),
        "method": method.__dict__,
        "training": {**t.__dict__, "lr": lr, "warmup_ratio": warmup_ratio},
    }
    state: dict[str, Any] = {"step": 0, "running_loss": 0.0, "micro_batches": 0}
    if resume_from is not None:
        state = checkpoint.load_state(
            accelerator,
            resume_from,
            global_batch * t.grad_accum,
            on_step_end,
            unwrapped(accelerator, model),
        )
    step = state["step"]
    if accelerator.is_main_process:
        checkpoint.prepare_output_dir(out, step, replace=overwrite and not t.resume, resolved=resolved)
    accelerator.init_trackers("tensorboard")
    log = checkpoint.MetricsLog(out / "metrics.jsonl", accelerator)
    initial: dict[str, dict[str, float]] = {}
    if t.eval_at_start and step == 0:
        for split, loader in eval_loaders.items():
            initial[split] = task.evaluate(model, loader, accelerator, split)
            log.write({"step": 0, **{f"{split}/{k}": v for k, v in initial[split].items()}})
    higher_is_better = "loss" not in t.best_metric

    progress = tqdm(
        total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train"
    )
    model.train()
    samples, micro_batches = 0, state["micro_batches"]
    # the interrupted run's loss since its last log line, so the next line averages the same micro-batches
    running_loss = torch.tensor(state["running_loss"], device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    window_bad = False
    start = time.perf_counter()
    for epoch in range(step // per_epoch, epochs):
        train_loader.set_epoch(epoch)  # accelerate's loader reseeds the sampler from its own epoch counter
        # micro-batches of this epoch the checkpoint already covers
        skip = (step - epoch * per_epoch) * t.grad_accum
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(**batch)
                loss = outputs.loss if not t.label_smoothing else smoothed_loss(outputs, batch, t, task)
                # the same verdict on every process, so all of them take the same branch
                bad = accelerator.reduce((~torch.isfinite(loss.detach())).float(), "sum").item() > 0
                if bad and not t.skip_nonfinite_batches:
                    raise InputError(nonfinite_message(step + 1, loss, out))
                window_bad |= bad
                if not window_bad:
                    accelerator.backward(loss)
                if accelerator.sync_gradients and not window_bad:
                    if t.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                scheduler.step()
                if accelerator.sync_gradients and on_step_end is not None and not window_bad:
                    on_step_end(unwrapped(accelerator, model), step + 1)
                optimizer.zero_grad()  # a skipped window's partial gradients go too
            if not bad:
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
            if window_bad:
                log.write({"step": step, "epoch": epoch, "skipped_nonfinite_batch": True})
                window_bad = False
            if (step % t.logging_every == 0 or step == total_steps) and micro_batches:
                # one host-device sync per logging interval, not per step
                mean_loss = accelerator.reduce(running_loss, "mean").item() / micro_batches
                running_loss.zero_()
                micro_batches = 0
                log.write({"step": step, "epoch": epoch, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{mean_loss:.4f}")
            scores = None
            if (
                t.eval_every
                and step % t.eval_every == 0
                and step < total_steps
                and "validation" in eval_loaders
            ):
                scores = task.evaluate(model, eval_loaders["validation"], accelerator)
                if t.best_metric not in scores:
                    raise InputError(
                        f"training.best_metric: {t.best_metric!r} is not one of {', '.join(scores)}"
                    )
                log.write({"step": step, **{f"validation/{k}": v for k, v in scores.items()}})
            if t.save_every and step % t.save_every == 0:
                state = {
                    "step": step,
                    "running_loss": accelerator.reduce(running_loss, "mean").item(),
                    "micro_batches": micro_batches,
                    "global_batch": global_batch * t.grad_accum,
                    "score": scores.get(t.best_metric) if scores else None,
                }
                checkpoint.save_state(
                    accelerator, out, state, t.save_total_limit, higher_is_better,
                    on_step_end, unwrapped(accelerator, model),
                )  # fmt: skip
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
    best = out / "checkpoints" / "best.json"
    results = {
        "task": recipe.task,
        "method": method.name,
        "model": recipe.model.name_or_path if recipe.model.from_scratch is None else model_path,
        "metrics": metrics,
        **({"initial_metrics": initial["validation"]} if "validation" in initial else {}),
        **({"initial_test_metrics": initial["test"]} if "test" in initial else {}),
        **({"test_metrics": test_metrics} if test_metrics is not None else {}),
        "trainable_params": trainable,
        "total_params": total,
        "train_runtime_s": runtime,
        # counts are this process's; every process sees the same number of examples, so scale by the world size
        "train_samples_per_s": samples * world / runtime if runtime else 0.0,
        "train_tokens_per_s": tokens * world / runtime if runtime else 0.0,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "steps": step,
        "epochs": step / per_epoch,
        "seed": t.seed,
        "world_size": world,
        "global_batch_size": global_batch * t.grad_accum,
        "precision": accelerator.mixed_precision,
        **({"best_checkpoint": json.loads(best.read_text())} if best.is_file() else {}),
        "versions": versions(),
        "recipe_hash": recipe.run_hash(),
        "recipe": resolved,
    }
    check_replicas_agree(accelerator, unwrapped(accelerator, model))
    # FSDP and DeepSpeed ZeRO-3 hold shards: the full state is gathered collectively, on every process
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = accelerator.get_state_dict(model) if sharded else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_final(
            unwrapped(accelerator, model), tokenizer, task, recipe, method.name, out / "model", full_state,
            base_model=model_path if recipe.model.from_scratch or recipe.model.encoder_decoder_from else None,
        )  # fmt: skip
        checkpoint.write_json_atomic(out / "results.json", results)
    accelerator.wait_for_everyone()  # tear the process group down together, not while process 0 still writes
    if world > 1:
        # torch 2.13 + gloo: a DDP Reducer left to the garbage collector at interpreter exit destroys the process
        # group while holding the GIL, and the gloo thread still releasing the last collective waits for that GIL: a
        # deadlock at exit (1 run in ~4 here). Free the wrapped model while the group lives, then let that thread finish.
        del model, optimizer, scheduler, train_loader, eval_loaders
        accelerator.free_memory()
        gc.collect()
        time.sleep(0.2)
    accelerator.end_training()
    return results


def smoothed_loss(outputs: Any, batch: dict[str, torch.Tensor], t: TrainingConfig, task: Any) -> torch.Tensor:
    """Mean token cross-entropy with label smoothing (transformers' models compute theirs without it). It replaces the
    model's loss, so a regulariser PEFT adds to that loss (AdaLoRA's orthogonality term) is left out."""
    from hf_finetune.tasks.language_modeling import align_logits

    # token-level tasks only (the recipe allows label smoothing for those), each of which says how its labels align
    logits, labels = align_logits(outputs.logits, batch["labels"], task.shift_labels)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=t.label_smoothing
    )


def build_from_scratch(
    recipe: Recipe, task: Any, raw: Any, out: Path, accelerator: Accelerator, resuming: bool
) -> str:
    """`output_dir/init/`: the random-init model and the tokenizer trained on the training split, written once by the
    main process. A resumed run reuses it: a retrained tokenizer could number the vocabulary differently."""
    from hf_finetune.scratch import write_scratch_model

    scratch = recipe.model.from_scratch
    corpus = getattr(task, "tokenizer_corpus", None)
    if corpus is None and scratch.tokenizer is None:
        raise InputError(
            f"model.from_scratch: task {recipe.task} cannot train a tokenizer; set model.from_scratch.tokenizer"
        )
    folder = out / "init"
    if accelerator.is_main_process and not (resuming and (folder / "config.json").is_file()):
        tmp = out / ".init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        texts = corpus(raw) if scratch.tokenizer is None else ()
        write_scratch_model(tmp, scratch.architecture, texts, scratch, recipe.training.seed, scratch.tokenizer)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
    return str(folder)


def build_loaders(
    task: Any, encoded: Any, tokenizer: Any, t: TrainingConfig, world: int
) -> tuple[DataLoader, dict[str, DataLoader]]:
    """The training loader deals global batches (batch_size x processes), which accelerate splits across processes."""
    collate = task.collator(tokenizer)
    global_batch = t.batch_size * world
    train_set = encoded["train"]
    sampler = LengthGroupedSampler(
        train_set["length"], global_batch * t.grad_accum, t.seed, t.group_by_length
    )
    # its own generator: a DataLoader without one draws its worker seed from the global RNG at every iter(), which
    # a resumed run would do once more than the uninterrupted one, shifting every dropout mask after it
    train_loader = DataLoader(
        train_set.remove_columns("length"), global_batch, sampler=sampler, collate_fn=collate,
        generator=torch.Generator().manual_seed(t.seed),
    )  # fmt: skip
    eval_loaders = {
        split: eval_loader(encoded[split], t.eval_batch * world, collate)
        for split in ("validation", "test")
        if split in encoded
    }
    return train_loader, eval_loaders


def make_accelerator(t: TrainingConfig, out: Path) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    prepare_run()  # this recipe's precision and dynamo plugin, not a previous run's; ideep's cache capped
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=choose_precision(t.precision),
        log_with="tensorboard",
        project_dir=str(out),
        # The loader yields global batches that accelerate splits evenly across processes, so N processes with batch
        # b see exactly the batches of one process with batch N*b: same data order, same loss curve, same schedule
        # (the scheduler then steps once per optimizer step instead of N times).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # `accelerate launch --multi_gpu` on a machine without GPUs starts torchrun processes that accelerate 1.15
        # would run as unrelated single processes; cpu=True makes them one gloo process group
        cpu=launched > 1 and not has_device,
        # regional compilation compiles one encoder/decoder block and reuses it for the others (minutes less on a CPU)
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if t.compile else None,
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate sees {accelerator.num_processes}; "
            "they would train independently and write over each other's files"
        )
    return accelerator


def unwrapped(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without accelerate's (DDP, autocast) or torch.compile's wrappers: its own state-dict keys and
    methods (save_pretrained, PEFT's update_and_allocate)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def check_replicas_agree(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Every process must end with the same model: DDP syncs gradients, but state a method keeps outside them (AdaLoRA's
    rank pattern, decided from gradients on each process) could drift and would be saved from process 0 only."""
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return
    config = getattr(model, "peft_config", {}).get("default")
    fingerprint = (
        sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad),
        json.dumps(getattr(config, "rank_pattern", None), sort_keys=True, default=str),
    )
    seen = gather_object([fingerprint])
    if any(f != seen[0] for f in seen):
        raise RuntimeError(f"processes ended with different models (parameter sum, rank pattern): {seen}")


def nonfinite_message(step: int, loss: torch.Tensor, out: Path) -> str:
    done = checkpoint.complete_checkpoints(out)
    kept = f"the last good checkpoint is {done[-1]}" if done else "no checkpoint was written"
    return (
        f"training step {step}: loss is {loss.item()}; {kept}. Lower training.lr, or set "
        "training.skip_nonfinite_batches=true to skip such batches"
    )


def check_model(model_path: str, recipe: Recipe) -> None:
    """Config-level checks before any weights load: remote code allowed, max_length within the position table."""
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise InputError(
            f"model.name_or_path: {recipe.model.name_or_path} ships its own modelling code (auto_map in its "
            "config.json); set model.trust_remote_code=true only if you trust that code"
        ) from err
    local = Path(model_path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise InputError(
            f"model.name_or_path: {local} has no *.safetensors weights; only safetensors are loaded (pickled "
            ".bin/.pt files can run code): convert them, e.g. with transformers' save_pretrained"
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return
    # RoBERTa-style models number positions from padding_idx + 1, so their table holds that many fewer tokens
    offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0
    limit = positions - offset
    max_length = recipe.training.max_length or TASKS[recipe.task].default_max_length
    if recipe.task in ("causal_lm", "masked_lm"):
        max_length = recipe.lm.block_size or max_length
    key = "lm.block_size" if recipe.task.endswith("_lm") and recipe.lm.block_size else "training.max_length"
    # what else takes positions in the same sequence: a decoder-only model's target, and virtual tokens before it
    extra: dict[str, int] = {}
    decoder_only = not getattr(config, "is_encoder_decoder", False) and not recipe.model.encoder_decoder_from
    if recipe.task in ("translation", "summarization") and decoder_only:
        extra["seq2seq.max_target_length"] = recipe.seq2seq.max_target_length
    generative = recipe.task not in ("classification", "question_answering")
    virtual = virtual_positions(recipe.method, decoder_only, generative)
    if virtual:
        extra[f"{recipe.method.name} virtual tokens"] = virtual
    text = max_length + extra.get("seq2seq.max_target_length", 0)
    padded = -(-text // MULTIPLE) * MULTIPLE
    if extra and padded > text:  # the LM and seq2seq collators round widths up, and pads take positions too
        extra[f"padding to a multiple of {MULTIPLE}"] = padded - text
    if max_length + sum(extra.values()) > limit:
        parts = "".join(f" + {v} ({k})" for k, v in extra.items())
        raise InputError(
            f"{key}: {max_length}{parts} is longer than {recipe.model.name_or_path} can take "
            f"({limit} positions); set {key}<={limit - sum(extra.values())}"
        )


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
