"""The one training loop, on `accelerate.Accelerator`, serving every task and method.

`setup(recipe) -> Run` builds everything a run needs, `fit(run) -> LoopState` is the loop, `finish(run, state)`
evaluates, saves and writes results.json; `train` is the three in a row. Scripts and tests that need to look inside a
run (the model before its first step, a hook on it) call the three themselves.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from hf_finetune import checkpoint, lock
from hf_finetune.card import write_model_card
from hf_finetune.data import load_splits
from hf_finetune.device import cpu_process_settings, make_accelerator, padding_for, tune_model_for_cpu
from hf_finetune.errors import InputError, Stopped
from hf_finetune.hub import check_model, count_parameters, load_tokenizer, model_key, resolve_model
from hf_finetune.losses import separate_head, smoothed_token_loss, token_nll
from hf_finetune.methods import METHODS, Method, TaskInfo, build_optimizer, get_method
from hf_finetune.recipe import MethodConfig, Recipe
from hf_finetune.sampling import Schedule, build_loaders, make_schedule
from hf_finetune.scratch import build_from_scratch
from hf_finetune.streaming import Stream
from hf_finetune.system import peak_memory_mb, versions
from hf_finetune.tasks import Task, get_task
from hf_finetune.trackers import PROJECT, flat_config, make_trackers


@dataclass
class Run:
    """Everything `fit` and `finish` use, built by `setup`."""

    recipe: Recipe
    accelerator: Accelerator
    task: Task
    method: Method
    method_cfg: MethodConfig
    """The recipe's method section with the method's defaults filled in."""
    model: torch.nn.Module
    tokenizer: Any
    model_path: str
    train_loader: Any
    eval_loaders: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Schedule
    log: checkpoint.MetricsLog
    resolved: dict[str, Any]
    trainable: int
    total: int
    resumed: dict[str, Any]
    """The loop state of the checkpoint this run resumes from (step 0 for a fresh run)."""
    settings: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Process settings held for the run (the CPU tuning's), released by `finish`."""
    stream: Stream | None = None
    """The training split when it is streamed (its position goes into every checkpoint)."""
    head: torch.nn.Module | None = None
    """The output head applied apart from the body, in pieces, for the token loss (`losses.token_nll`); None where
    the model's own loss is used."""

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without accelerate's (DDP, autocast) or torch.compile's wrappers: its own state-dict keys and
        methods (save_pretrained, PEFT's update_and_allocate)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


@dataclass
class LoopState:
    step: int = 0
    micro_batches: int = 0
    """Micro-batches since the last log line, whose summed loss is `running_loss`."""
    running_loss: Any = 0.0
    samples: int = 0
    tokens: Any = 0
    runtime: float = 0.0
    initial: dict[str, dict[str, float]] = field(default_factory=dict)
    window_bad: bool = False
    best_score: float | None = None
    """The best `best_metric` of the periodic evaluations so far (early stopping's reference)."""
    evals_without_improvement: int = 0
    stopped_early: bool = False


def train(recipe: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Run the recipe; `overwrite` lets it replace a finished run in `output_dir` (otherwise refused)."""
    run = setup(recipe, overwrite)
    try:
        return finish(run, fit(run))
    finally:
        run.settings.close()


def setup(recipe: Recipe, overwrite: bool = False) -> Run:
    t, out = recipe.training, Path(recipe.output_dir)
    accelerator = make_accelerator(t, out)
    on_cpu = accelerator.device.type == "cpu"
    settings = contextlib.ExitStack()
    settings.enter_context(cpu_process_settings(on_cpu and t.cpu_tuning == "auto"))
    try:
        return _setup(recipe, overwrite, accelerator, settings)
    except BaseException:
        settings.close()
        raise


def _setup(recipe: Recipe, overwrite: bool, accelerator: Accelerator, settings: contextlib.ExitStack) -> Run:
    t, out, world = recipe.training, Path(recipe.output_dir), accelerator.num_processes
    set_seed(t.seed)
    method = get_method(recipe.method.name)
    if t.gradient_checkpointing and method.no_gradient_checkpointing:
        raise InputError(
            f"training.gradient_checkpointing: method {method.name} cannot use it ({method.no_gradient_checkpointing});"
            " turn one of them off"
        )
    task = get_task(recipe)
    raw = load_splits(recipe.data)
    task.prepare(raw)  # every data problem surfaces before weights load
    check_not_in_use(accelerator, out)
    checkpoint.check_output_dir(out, t.resume, overwrite)
    resume_from = checkpoint.find_resume_checkpoint(out, t.resume)
    if recipe.model.from_scratch is not None:
        model_path = build_from_scratch(recipe, task, raw, out, accelerator, resume_from is not None)
    else:
        source = recipe.model.encoder_decoder_from or recipe.model.name_or_path
        model_path = resolve_model(source, recipe.model.revision, model_key(recipe))
    padding = padding_for(accelerator.device.type, accelerator.mixed_precision, t.cpu_tuning)
    check_model(model_path, recipe, task, method, padding)
    tokenizer = load_tokenizer(model_path, recipe)
    task.setup(tokenizer, padding)
    if task.new_token_ids and not (method.saves_whole_model or method.trains_new_tokens):
        able = ", ".join(n for n, m in METHODS.items() if m.saves_whole_model or m.trains_new_tokens)
        raise InputError(
            f"method.name: {method.name} cannot train the {len(task.new_token_ids)} tokens the chat template adds to "
            f"the tokenizer; use {able}, or a template whose tokens the tokenizer has"
        )
    with accelerator.main_process_first():  # one process tokenises, the others read datasets' cache
        encoded = task.preprocess(raw)
    stream = encoded["train"] if isinstance(encoded["train"], Stream) else None
    schedule = make_schedule(None if stream else len(encoded["train"]), t, world)
    cfg = method.resolve(recipe.method, schedule.total_steps)
    problems = method.check(cfg, schedule.total_steps)
    if problems:
        raise InputError("; ".join(problems))
    lr = t.lr or method.defaults["lr"]
    warmup_ratio = t.warmup_ratio if t.warmup_ratio is not None else method.warmup_ratio

    info = TaskInfo(task.peft_task_type, task.head_modules, schedule.total_steps, task.new_token_ids)
    task.model_kwargs = method.load_kwargs(info)
    model = task.load_model(model_path)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model, method.name)
    model = method.apply(model, cfg, info)
    if accelerator.device.type == "cpu" and t.cpu_tuning == "auto":
        tune_model_for_cpu(model, accelerator.mixed_precision, compiling=t.compile)
    trainable, total = count_parameters(model)

    train_loader, eval_loaders = build_loaders(task, encoded, t, world)
    # fused AdamW: on one CPU thread the for-loop AdamW spends ~230 ms per step on MiniLM's 22.7M parameters, the
    # fused kernel ~50 ms; training ran 1.11x faster (docs/benchmarks.md, "fused AdamW"). Other devices keep the loop.
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = build_optimizer(model, cfg, lr, t.weight_decay, fused=fused)
    scheduler = get_scheduler(
        t.scheduler, optimizer, num_warmup_steps=int(warmup_ratio * schedule.total_steps),
        num_training_steps=schedule.total_steps,
    )  # fmt: skip
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    inner = getattr(train_loader, "base_dataloader", train_loader)
    if stream is not None and inner.generator is None:
        # accelerate dispatches a stream's batches through a new loader without our generator, whose iter() would
        # draw its seed from the global RNG: once more in a resumed run than in the unbroken one, shifting dropout
        inner.generator = torch.Generator().manual_seed(t.seed)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    resolved = {
        **recipe.to_dict(),
        "method": cfg.__dict__,
        "training": {
            **t.__dict__, "lr": lr, "warmup_ratio": warmup_ratio,
            "group_by_length": task.group_by_length if t.group_by_length is None else t.group_by_length,
        },  # fmt: skip
    }
    resumed: dict[str, Any] = {"step": 0, "running_loss": 0.0, "micro_batches": 0}
    if resume_from is not None:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        resumed = checkpoint.load_state(accelerator, resume_from, schedule.global_batch, method, unwrapped)
        if stream is not None:
            stream.resume(resumed["stream"], resumed["step"] * schedule.global_batch)
    if accelerator.is_main_process:
        settings.callback(lock.release, lock.acquire(out))  # released with the run's other settings, however it ends
        checkpoint.prepare_output_dir(out, resumed["step"], replace=overwrite and not t.resume, resolved=resolved)
    accelerator.log_with = make_trackers(t.report_to, out)  # accelerate's tracker objects, started by init_trackers
    accelerator.init_trackers(PROJECT, config=flat_config(resolved))
    log = checkpoint.MetricsLog(out / "metrics.jsonl", accelerator)
    # a method's own loss term (AdaLoRA's) comes only with the model's loss, which needs the whole batch's logits
    head = separate_head(model, accelerator) if task.chunked_head and not method.adds_loss_term else None
    return Run(
        recipe, accelerator, task, method, cfg, model, tokenizer, model_path, train_loader, eval_loaders,
        optimizer, scheduler, schedule, log, resolved, trainable, total, resumed, settings, stream, head,
    )  # fmt: skip


def enable_gradient_checkpointing(model: torch.nn.Module, method: str) -> None:
    """transformers' own checkpointing of every layer, before the method wraps the model. Non-reentrant
    (`use_reentrant=False`, what torch recommends): it needs no input that requires grad, so frozen embeddings under
    LoRA/IA3/prompt tuning need no `enable_input_require_grads` hook, and it replays dropout's RNG exactly."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(
            f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_not_in_use(accelerator: Accelerator, out: Path) -> None:
    """Exit 2 when a live run holds `out`: the first process looks, and every process gets its verdict."""
    problem = None
    if accelerator.is_main_process:
        try:
            lock.check_unlocked(out)
        except InputError as err:
            problem = str(err)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise InputError(problem)


def fit(run: Run) -> LoopState:
    """The loop: accumulate, clip, step, schedule, the method's hook, logging, periodic evaluation and checkpoints."""
    t, acc, sched = run.recipe.training, run.accelerator, run.schedule
    state = LoopState(step=run.resumed["step"], micro_batches=run.resumed["micro_batches"])
    stopping = run.resumed.get("early_stopping") or {}
    state.best_score = stopping.get("best_score")
    state.evals_without_improvement = stopping.get("evals_without_improvement", 0)
    # the interrupted run's loss since its last log line, so the next line averages the same micro-batches
    state.running_loss = torch.tensor(run.resumed["running_loss"], device=acc.device)
    state.tokens = torch.zeros((), dtype=torch.long, device=acc.device)
    if t.eval_at_start and state.step == 0:
        for split in run.eval_loaders:
            state.initial[split] = evaluate(run, split, step=0)
    progress = tqdm(total=sched.total_steps, initial=state.step, disable=not acc.is_local_main_process, desc="train")
    run.model.train()
    start = time.perf_counter()
    with StopSignals() as signals:
        _loop(run, state, progress, signals)
    state.runtime = time.perf_counter() - start
    progress.close()
    return state


def _loop(run: Run, state: LoopState, progress: Any, signals: StopSignals) -> None:
    t, acc, sched = run.recipe.training, run.accelerator, run.schedule
    for epoch in range(state.step // sched.per_epoch, sched.epochs):
        run.train_loader.set_epoch(epoch)  # accelerate's loader reseeds the sampler from its own epoch counter
        # micro-batches the checkpoint covers (a stream starts at its checkpointed position itself)
        skip = 0 if run.stream else (state.step - epoch * sched.per_epoch) * t.grad_accum
        loader = acc.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        for window in windows(loader, t.grad_accum):
            train_window(run, state, window)
            state.step += 1
            progress.update(1)
            if state.window_bad:
                run.log.write({"step": state.step, "epoch": epoch, "skipped_nonfinite_batch": True})
                state.window_bad = False
            if (state.step % t.logging_every == 0 or state.step == sched.total_steps) and state.micro_batches:
                loss = log_loss(run, state, epoch)
                progress.set_postfix(loss=f"{loss:.4f}")
            scores = None
            if t.eval_every and state.step % t.eval_every == 0 and state.step < sched.total_steps:
                scores = evaluate(run, "validation", state.step) if "validation" in run.eval_loaders else None
                if scores is not None and t.early_stopping_patience:
                    state.stopped_early = no_improvement(run, state, scores) >= t.early_stopping_patience
            saved = None
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                saved = save_checkpoint(run, state, scores)
            if state.step >= sched.total_steps or state.stopped_early:
                break
            signum = signals.agreed(acc)
            if signum:
                stop_on_signal(run, state, signum, saved)
        if state.step >= sched.total_steps or state.stopped_early:
            break


class StopSignals:
    """SIGTERM (pre-emption, `kill`, a scheduler's time limit) and SIGINT (Ctrl-C) during training ask for a stop at
    the end of the current optimizer step; a second one aborts at once. Outside the main thread (where Python cannot
    install handlers) signals keep their default action."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # the second signal: the default action, now (no checkpoint)
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\nhf-finetune: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)  # fmt: skip

    def agreed(self, acc: Accelerator) -> int:
        """The signal to stop on, the same on every process: each checks at every step, so all stop at the same one."""
        if acc.num_processes == 1:
            return self.received
        return int(acc.reduce(torch.tensor(self.received, device=acc.device), "max").item())


def stop_on_signal(run: Run, state: LoopState, signum: int, saved: Path | None) -> None:
    """Write the checkpoint of this step (unless the periodic one just did) and end the run with `Stopped`."""
    path = saved or save_checkpoint(run, state, None)
    name = signal.Signals(signum).name
    raise Stopped(
        f"stopped by {name} after step {state.step} of {run.schedule.total_steps}; checkpoint {path}. Continue "
        "with the same command plus training.resume=true",
        signum,
    )


def windows(loader: Any, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The loader's micro-batches in accumulation windows of `size` (the epoch's last one may be shorter)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train_window(run: Run, state: LoopState, window: list[dict[str, torch.Tensor]]) -> None:
    """One optimizer step: forward and backward of each micro-batch of the window (gradients synchronised across
    processes on the last only), then clipping, the step (unless the window held a non-finite loss) and the method's
    hook. The window is read whole first, as transformers' Trainer does, so that a token-level loss can be divided by
    the tokens of the whole window (`token_normaliser`)."""
    t, acc = run.recipe.training, run.accelerator
    scale = token_normaliser(run, window)
    for i, batch in enumerate(window):
        sync = i == len(window) - 1
        # the window's end is known here, not counted: accelerate's optimizer and scheduler wrappers read this flag
        acc.gradient_state._set_sync_gradients(sync)
        with contextlib.nullcontext() if sync else acc.no_sync(run.model):
            loss, logged = micro_batch_loss(run, batch, scale)
            # the same verdict on every process, so all of them take the same branch
            bad = acc.reduce((~torch.isfinite(loss.detach())).float(), "sum").item() > 0
            if bad and not t.skip_nonfinite_batches:
                raise InputError(nonfinite_message(state.step + 1, loss, run.out))
            state.window_bad |= bad
            if not state.window_bad:
                acc.backward(loss)
        if sync and not state.window_bad:
            if t.max_grad_norm:
                acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm)
            run.optimizer.step()
        run.scheduler.step()
        if sync and run.method.on_step_end is not None and not state.window_bad:
            run.method.on_step_end(run.unwrapped, state.step + 1)
        run.optimizer.zero_grad()  # a skipped window's partial gradients go too
        if not bad:
            state.running_loss += logged
            state.micro_batches += 1
        state.samples += batch["input_ids"].shape[0]
        state.tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()


def token_normaliser(run: Run, window: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """For a token-level task accumulating over micro-batches or processes: grad_accum x processes / the scored
    tokens of the whole window on every process, the factor that turns a micro-batch's summed token loss into its
    share of the window's token mean once accelerate has divided by grad_accum and DDP averaged over processes.
    A mean of per-micro-batch means would weight a token of a short batch above one of a long batch. None where the
    model's own mean is already the window's (one micro-batch, one process) or the loss is per example."""
    acc = run.accelerator
    if not run.task.token_level or acc.gradient_accumulation_steps * acc.num_processes == 1:
        return None
    shift = 1 if run.task.shift_labels else 0
    scored = sum((b["labels"][:, shift:] != -100).sum() for b in window)
    total = acc.reduce(torch.as_tensor(scored, device=acc.device), "sum")
    return acc.gradient_accumulation_steps * acc.num_processes / total.clamp(min=1).float()


def micro_batch_loss(
    run: Run, batch: dict[str, torch.Tensor], scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to back-propagate for one micro-batch, and its detached value for the log (the window's token mean
    over the micro-batches, when `scale` applies)."""
    t = run.recipe.training
    if run.head is not None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with run.accelerator.autocast():
            nll, labels = token_nll(run.model, inputs, batch["labels"], run.task.shift_labels, run.head,
                                    t.label_smoothing)  # fmt: skip
        summed = nll.sum()
        loss = summed / (labels != -100).sum().clamp(min=1) if scale is None else summed * scale
        return loss, loss.detach().float()
    with run.accelerator.autocast():
        outputs = run.model(**batch)
    if scale is None:
        if t.label_smoothing:
            loss = smoothed_token_loss(outputs.logits, batch["labels"], run.task.shift_labels, t.label_smoothing)
        else:
            loss = outputs.loss
        return loss, loss.detach()
    summed, count = smoothed_token_loss(
        outputs.logits, batch["labels"], run.task.shift_labels, t.label_smoothing, reduction="sum"
    )
    loss = summed * scale
    if run.method.adds_loss_term:
        # the term a method adds to the model's loss (AdaLoRA's orthogonality penalty), kept per micro-batch
        loss = loss + (outputs.loss - summed / count.clamp(min=1))
    return loss, (summed * scale).detach().float()


def no_improvement(run: Run, state: LoopState, scores: dict[str, float]) -> int:
    """Count this evaluation for early stopping: returns how many evaluations in a row have not improved on the best
    by more than `early_stopping_threshold` (a non-finite score never improves)."""
    t = run.recipe.training
    value = scores.get(t.best_metric)
    gain = None
    if value is not None and math.isfinite(value):
        gain = math.inf if state.best_score is None else value - state.best_score
        gain = gain if run.task.higher_is_better(t.best_metric) else -gain
    if gain is not None and gain > t.early_stopping_threshold:
        state.best_score, state.evals_without_improvement = value, 0
    else:
        state.evals_without_improvement += 1
    if state.evals_without_improvement >= (t.early_stopping_patience or math.inf):
        run.log.write({"step": state.step, "early_stopping": f"no improvement of {t.best_metric} in "
                       f"{state.evals_without_improvement} evaluations; best {state.best_score}"})  # fmt: skip
    return state.evals_without_improvement


def log_loss(run: Run, state: LoopState, epoch: int) -> float:
    """The mean loss since the last log line: one host-device sync per logging interval, not per step."""
    loss = run.accelerator.reduce(state.running_loss, "mean").item() / state.micro_batches
    state.running_loss.zero_()
    state.micro_batches = 0
    run.log.write({"step": state.step, "epoch": epoch, "loss": loss, "lr": run.scheduler.get_last_lr()[0]})
    return loss


def evaluate(run: Run, split: str, step: int, predictions: bool = False, log: bool = True) -> dict[str, float]:
    """The task's metrics on `split`, logged unless `log` is off; with `predictions`, also each example's row in
    `output_dir/predictions/<split>.jsonl`."""
    records: list[dict] | None = [] if predictions else None
    scores = run.task.evaluate(run.model, run.eval_loaders[split], run.accelerator, split, records=records)
    if log:
        run.log.write({"step": step, **{f"{split}/{k}": v for k, v in scores.items()}})
    if records is not None and run.accelerator.is_main_process:
        checkpoint.write_jsonl_atomic(run.out / "predictions" / f"{split}.jsonl", records)
    return scores


def save_checkpoint(run: Run, state: LoopState, scores: dict[str, float] | None) -> Path:
    t = run.recipe.training
    loop = {
        "step": state.step,
        "running_loss": run.accelerator.reduce(state.running_loss, "mean").item(),
        "micro_batches": state.micro_batches,
        "global_batch": run.schedule.global_batch,
        "score": scores.get(t.best_metric) if scores else None,
        **({"stream": run.stream.position_of(state.step * run.schedule.global_batch)} if run.stream else {}),
        "early_stopping": {
            "best_score": state.best_score,
            "evals_without_improvement": state.evals_without_improvement,
        },
    }
    higher = run.task.higher_is_better(t.best_metric)
    return checkpoint.save_state(
        run.accelerator, run.out, loop, t.checkpoint_keep, higher, run.method, run.unwrapped
    )


def finish(run: Run, state: LoopState) -> dict[str, Any]:
    """Final evaluation on validation (and test), the model folder and results.json; then the run's teardown."""
    recipe, acc, out = run.recipe, run.accelerator, run.out
    final_model = load_best(run, state) if recipe.training.best_at_end else None
    if run.method.on_train_end is not None:
        run.method.on_train_end(run.unwrapped)
    metrics = evaluate(run, "validation", state.step, predictions=True) if "validation" in run.eval_loaders else {}
    has_test = "test" in run.eval_loaders
    test_metrics = evaluate(run, "test", state.step, predictions=True, log=False) if has_test else None
    if not metrics:
        run.log.write({"step": state.step})
    best = out / "checkpoints" / "best.json"
    world, runtime = acc.num_processes, state.runtime
    results = {
        "task": recipe.task,
        "method": run.method.name,
        "model": recipe.model.name_or_path if recipe.model.from_scratch is None else run.model_path,
        "primary_metric": run.task.primary_metric,
        "metrics": metrics,
        **({"initial_metrics": state.initial["validation"]} if "validation" in state.initial else {}),
        **({"initial_test_metrics": state.initial["test"]} if "test" in state.initial else {}),
        **({"test_metrics": test_metrics} if test_metrics is not None else {}),
        "trainable_params": run.trainable,
        "total_params": run.total,
        "train_runtime_s": runtime,
        # counts are this process's; every process sees the same number of examples, so scale by the world size
        "train_samples_per_s": state.samples * world / runtime if runtime else 0.0,
        "train_tokens_per_s": int(state.tokens) * world / runtime if runtime else 0.0,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "steps": state.step,
        "epochs": state.step / run.schedule.per_epoch,
        "seed": recipe.training.seed,
        "world_size": world,
        "distributed_type": str(acc.distributed_type.value),  # NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED
        "global_batch_size": run.schedule.global_batch,
        "precision": acc.mixed_precision,
        **({"best_checkpoint": json.loads(best.read_text())} if best.is_file() else {}),
        **({"final_model": final_model} if final_model else {}),
        **({"early_stopping": stopping_summary(run, state)} if recipe.training.early_stopping_patience else {}),
        "versions": versions(),
        "recipe_hash": recipe.run_hash(),
        "recipe": run.resolved,
    }
    check_replicas_agree(run)
    # FSDP and DeepSpeed ZeRO-3 hold shards: the full state is gathered collectively, on every process
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = acc.get_state_dict(run.model) if sharded else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        base = run.model_path if recipe.model.from_scratch or recipe.model.encoder_decoder_from else None
        checkpoint.save_final(run.unwrapped, run.tokenizer, run.task, recipe, run.method, out / "model", full_state, base)
        write_model_card(out / "model", recipe, results, run.task.card_notes())
        checkpoint.write_json_atomic(out / "results.json", results)
    acc.wait_for_everyone()  # tear the process group down together, not while process 0 still writes
    if world > 1:
        # torch 2.13 + gloo: a DDP Reducer left to the garbage collector at interpreter exit destroys the process
        # group while holding the GIL, and the gloo thread still releasing the last collective waits for that GIL: a
        # deadlock at exit (1 run in ~4 here). Free the wrapped model while the group lives, then let that thread finish.
        run.model = run.optimizer = run.scheduler = run.train_loader = None
        run.eval_loaders = {}
        acc.free_memory()
        gc.collect()
        time.sleep(0.2)
    acc.end_training()
    run.settings.close()
    return results


def load_best(run: Run, state: LoopState) -> str:
    """`training.load_best_at_end`: put the best scored checkpoint's weights into the model when they beat the last
    step's (an early stop's last evaluation did not; a finished run's last step is scored here). Returns which
    model the run ends with."""
    t = run.recipe.training
    best_file = run.out / "checkpoints" / "best.json"
    if not best_file.is_file():
        return "last step (no scored checkpoint)"
    best = json.loads(best_file.read_text())
    if not state.stopped_early:
        last = evaluate(run, "validation", state.step, log=False).get(t.best_metric, math.nan)
        gain = best["score"] - last if run.task.higher_is_better(t.best_metric) else last - best["score"]
        if math.isfinite(last) and not gain > 0:
            return f"last step ({t.best_metric} {last} against the best checkpoint's {best['score']})"
    checkpoint.load_state(
        run.accelerator, run.out / "checkpoints" / best["checkpoint"], run.schedule.global_batch, run.method,
        run.unwrapped,
    )  # fmt: skip
    return f"{best['checkpoint']} (best {t.best_metric} {best['score']})"


def stopping_summary(run: Run, state: LoopState) -> dict[str, Any]:
    t = run.recipe.training
    return {
        "stopped": state.stopped_early,
        "step": state.step,
        "reason": (
            f"{state.evals_without_improvement} evaluations without improving {t.best_metric} by more than "
            f"{t.early_stopping_threshold}" if state.stopped_early else "ran to the end"
        ),
        "best_score": state.best_score,
        "patience": t.early_stopping_patience,
    }


def check_replicas_agree(run: Run) -> None:
    """Every process must end with the same model: DDP syncs gradients, but state a method keeps outside them (its
    `fingerprint`) could drift and would be saved from process 0 only."""
    if run.accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return
    model = run.unwrapped
    fingerprint = (
        sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad),
        run.method.fingerprint(model),
    )
    seen = gather_object([fingerprint])
    if any(f != seen[0] for f in seen):
        raise RuntimeError(f"processes ended with different models (parameter sum, method state): {seen}")


def nonfinite_message(step: int, loss: torch.Tensor, out: Path) -> str:
    done = checkpoint.complete_checkpoints(out)
    kept = f"the last good checkpoint is {done[-1]}" if done else "no checkpoint was written"
    return (
        f"training step {step}: loss is {loss.item()}; {kept}. Lower training.lr, or set "
        "training.skip_nonfinite_batches=true to skip such batches"
    )


