"""Every method through the one loop on a tiny BERT: loss falls, only the intended weights change, the saved
output reloads to identical logits, and LoRA-family merges agree with the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_finetune.engine as engine
from hf_finetune.checkpoint import load_final
from hf_finetune.evaluation import evaluate_checkpoint
from hf_finetune.merging import merge_checkpoint
from hf_finetune.methods import METHOD_NAMES, get_method
from hf_finetune.recipe import recipe_from_dict

# learning rates for a randomly initialised 32-wide model, larger than the defaults tuned for MiniLM
LRS = {
    "full": 1e-3, "lora": 1e-2, "adalora": 2e-2, "prefix": 1e-3, "prompt": 1e-2, "ia3": 1e-2, "dora": 1e-2,
    "lokr": 2e-2, "vera": 5e-2,
}  # fmt: skip
# the parameters each method may train; everything else must stay bit-identical
TRAINABLE = {
    "full": ("",),
    "lora": ("lora_", "classifier"),
    "dora": ("lora_", "classifier"),
    "adalora": ("lora_", "classifier"),
    "ia3": ("ia3_", "classifier", "pooler"),
    "prompt": ("prompt_encoder", "classifier", "pooler"),
    "prefix": ("prefix_encoder", "classifier", "pooler"),
    "lokr": ("lokr_", "classifier"),
    "vera": ("vera_lambda_", "classifier"),
}
RESULT_KEYS = {
    "task", "method", "model", "metrics", "trainable_params", "total_params", "train_runtime_s",
    "train_samples_per_s", "train_tokens_per_s", "peak_memory_mb", "steps", "epochs", "seed", "world_size",
    "global_batch_size", "versions", "recipe",
}  # fmt: skip


def train_capturing(raw: dict) -> tuple[dict, torch.nn.Module, dict]:
    """Train through the engine's seams, keeping the trainable model and its parameters as they were before the first
    step."""
    run = engine.setup(recipe_from_dict(raw))
    model = run.unwrapped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = engine.finish(run, engine.fit(run))
    return results, model, before


def check_trained_parameters(
    method: str, model: torch.nn.Module, before: dict[str, torch.Tensor], allowed: tuple[str, ...] | None = None
) -> None:
    """Exactly the parameters `method` may train (`allowed`, default TRAINABLE's) require grad and changed; every
    other one is bit-identical."""
    allowed = allowed or TRAINABLE[method]
    for name, param in model.named_parameters():
        # PEFT keeps a frozen copy of each fully trained head module beside the trained one
        intended = any(key in name for key in allowed) and "original_module" not in name
        assert param.requires_grad == intended, name
        changed = not torch.equal(param.detach(), before[name])
        if method == "adalora" and "lora_E" in name and not param.any():
            continue  # every rank of this module pruned by the budget: E is back at its zero init, as it should be
        if method == "adalora" and "ranknum" in name:
            continue  # the rank count, set to the kept ranks when the layers shrink to them after training
        assert changed == intended, f"{name}: changed={changed}, intended={intended}"


def logits_of(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_every_method_is_tested() -> None:
    # bitsandbytes' 4-bit kernels need layers at least one 64-wide block wide, and this BERT is 32 wide:
    # tests/test_qlora.py trains QLoRA on 64-wide models
    assert set(LRS) == set(TRAINABLE) == set(METHOD_NAMES) - {"qlora"}


@pytest.mark.parametrize("method", list(LRS))
def test_method_trains_only_its_parameters_and_reloads(
    method: str, tiny_bert_pretrained: Path, data_dir: Path, tmp_path: Path
) -> None:
    tiny_bert = tiny_bert_pretrained
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": method, "training.lr": LRS[method]})
    results, model, before = train_capturing(raw)

    assert RESULT_KEYS <= results.keys()
    assert json.loads((out / "results.json").read_text())["metrics"] == results["metrics"]
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses

    allowed = TRAINABLE[method]
    check_trained_parameters(method, model, before)
    # counted before the first step (AdaLoRA's layers shrink to their kept ranks once training ends)
    assert results["trainable_params"] == sum(before[n].numel() for n, p in model.named_parameters() if p.requires_grad)

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["the movie was good", "a very boring plot and it is bad", "this film"]
    _, reloaded, _, info = load_final(out)
    assert info["method"] == method
    assert torch.equal(logits_of(reloaded, tokenizer, texts), logits_of(model, tokenizer, texts))

    if get_method(method).mergeable:
        merged_dir = merge_checkpoint(out, tmp_path / "merged")
        merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
        adapters = [key for key in allowed if key.endswith("_")]
        assert adapters and not any(key in n for n, _ in merged.named_parameters() for key in adapters)
        torch.testing.assert_close(logits_of(merged, tokenizer, texts), logits_of(model, tokenizer, texts))


def test_full_finetune_learns_the_task(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{"method.name": "full", "training.lr": 2e-3})
    raw["training"]["epochs"] = 6
    results = engine.train(recipe_from_dict(raw))
    assert results["metrics"]["accuracy"] >= 0.9, results["metrics"]


def test_adalora_reallocates_ranks(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    raw = tiny_recipe(
        tiny_bert, data_dir, tmp_path / "run", **{"method.name": "adalora", "training.lr": 2e-2}
    )
    _, model, _ = train_capturing(raw)
    config = model.peft_config["default"]
    ranks = config.rank_pattern
    assert ranks, "update_and_allocate never ran: rank_pattern is empty"
    kept = [sum(mask) for mask in ranks.values()]
    assert sum(kept) < config.init_r * len(kept), "the budget was not pruned"
    assert len(set(kept)) > 1, "ranks were not reallocated unevenly across layers"
    saved = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert saved["rank_pattern"], "the rank pattern was not saved with the adapter"


def test_periodic_eval_save_and_resume(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    overrides = {
        "method.name": "lora",
        "training.lr": 1e-2,
        "training.save_every": 8,
        "training.eval_every": 16,
    }
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **overrides)
    first = engine.train(recipe_from_dict(raw))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in log if "validation/accuracy" in r]
    assert eval_steps == [16, 32, 48] and first["steps"] == 48
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints][-1] == f"step_{first['steps'] // 8 * 8:08d}"
    raw["training"]["resume"] = True
    again = engine.train(recipe_from_dict(raw))
    assert again["steps"] == first["steps"]


@pytest.mark.parametrize(("method", "warmup"), [("full", 0.06), ("lora", 0.1)])
def test_warmup_defaults_to_the_methods_own(
    method: str, warmup: float, tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    """With `training.warmup_ratio` unset the schedule warms up over the method's own share of the 20 steps (full 6%:
    1 step, LoRA 10%: 2), as the learning rate logged after step 2 shows; results.json records the value used."""
    raw = tiny_recipe(
        tiny_bert, data_dir, tmp_path / "run", **{"method.name": method, "training.max_steps": 20}
    )
    raw["training"].update(lr=1e-3, logging_every=2)
    del raw["training"]["warmup_ratio"]
    results = engine.train(recipe_from_dict(raw))
    assert results["recipe"]["training"]["warmup_ratio"] == warmup
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr_after_2 = next(r["lr"] for r in log if r.get("step") == 2 and "lr" in r)
    warm = int(warmup * 20)
    expected = 1e-3 * (2 / warm if 2 < warm else (20 - 2) / (20 - warm))
    assert lr_after_2 == pytest.approx(expected)


def test_compiled_training_saves_the_plain_model(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    """`training.compile=true` trains through torch.compile (accelerate's regional compilation): graphs are compiled,
    and the saved adapter has the plain model's keys and, reloaded without compiling, scores the validation split as
    the compiled model did at the end of training."""
    torch._dynamo.reset()
    raw = tiny_recipe(
        tiny_bert, data_dir, tmp_path / "run", **{"method.name": "lora", "training.max_steps": 4, "training.compile": True}
    )
    raw["training"]["lr"] = LRS["lora"]
    recipe = recipe_from_dict(raw)
    results = engine.train(recipe)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    _, model, _, _ = load_final(str(tmp_path / "run" / "model"))
    assert not any("_orig_mod" in k for k in model.state_dict())
    eager = evaluate_checkpoint(recipe, str(tmp_path / "run" / "model"))["metrics"]
    assert eager["eval_loss"] == pytest.approx(results["metrics"]["eval_loss"], abs=1e-5)
    assert eager["accuracy"] == results["metrics"]["accuracy"]


def test_runs_in_one_process_each_get_their_own_precision(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    """accelerate keeps one AcceleratorState per process; the engine resets it per run, so a second run with another
    precision neither fails nor inherits the first one's."""
    done = {}
    for precision in ("bf16", "fp32"):
        raw = tiny_recipe(
            tiny_bert, data_dir, tmp_path / precision, **{"training.max_steps": 2, "training.precision": precision}
        )
        done[precision] = engine.train(recipe_from_dict(raw))["precision"]
    assert done == {"bf16": "bf16", "fp32": "no"}


def no_dropout_copy(model: Path, folder: Path) -> Path:
    """The tiny model with its dropout off, so that runs which batch differently can agree."""
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_grad_accum_equals_the_large_batch_run(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    """Two accumulated micro-batches of 16 make the same optimizer steps as batches of 32, up to float rounding (each
    micro-batch pads to its own longest row)."""
    model = no_dropout_copy(tiny_bert, tmp_path / "model")
    runs = {}
    for name, batch, accum in (("large", 32, 1), ("accumulated", 16, 2)):
        raw = tiny_recipe(model, data_dir, tmp_path / name, **{
            "method.name": "full", "training.lr": 1e-3, "training.max_steps": 6, "training.batch_size": batch,
            "training.grad_accum": accum, "training.logging_every": 1,
        })  # fmt: skip
        runs[name] = engine.train(recipe_from_dict(raw))
    large, accumulated = runs["large"], runs["accumulated"]
    assert large["steps"] == accumulated["steps"] == 6 and accumulated["global_batch_size"] == 32
    loss = {n: [r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
                if "loss" in r] for n in runs}  # fmt: skip
    assert loss["large"][0] != loss["large"][-1]  # the weights moved
    assert loss["accumulated"] == pytest.approx(loss["large"], rel=1e-5)
    assert accumulated["metrics"]["eval_loss"] == pytest.approx(large["metrics"]["eval_loss"], rel=1e-5)
    a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / n / "model") for n in runs)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_test_split_is_scored_after_training_and_matches_a_reload(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    from conftest import sentences, write_jsonl

    write_jsonl(data_dir / "test.jsonl", sentences(40, seed=9))
    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{"method.name": "lora", "training.lr": LRS["lora"]})
    raw["data"]["test"] = {"path": str(data_dir / "test.jsonl")}
    recipe = recipe_from_dict(raw)
    results = engine.train(recipe)
    assert results["test_metrics"].keys() == results["metrics"].keys()
    assert results["test_metrics"] != results["metrics"]  # another split, other numbers
    again = evaluate_checkpoint(recipe, str(tmp_path / "run"))
    assert again["test_metrics"]["accuracy"] == results["test_metrics"]["accuracy"]
    assert again["test_metrics"]["eval_loss"] == pytest.approx(results["test_metrics"]["eval_loss"], abs=1e-6)


def test_cosine_schedule_sets_each_steps_learning_rate(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    import math

    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{
        "training.scheduler": "cosine", "training.max_steps": 8, "training.logging_every": 1, "training.lr": 1e-3,
    })  # fmt: skip
    engine.train(recipe_from_dict(raw))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in log if "lr" in r}
    # transformers' cosine decay without warm-up: the lr after step k is half a cosine period in k / 8
    assert lrs == pytest.approx({k: 1e-3 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)})


@pytest.mark.parametrize("tuning", ["auto", "off"])
def test_cpu_tuning_off_keeps_torchs_dropout_and_peft_casts(
    tuning: str, tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hf_finetune.dropout import FastDropout

    raw = tiny_recipe(tiny_bert, data_dir, tmp_path / "run", **{
        "method.name": "lora", "training.max_steps": 1, "training.precision": "bf16", "training.cpu_tuning": tuning,
    })  # fmt: skip
    run = engine.setup(recipe_from_dict(raw))
    dropouts = [m for m in run.unwrapped.modules() if isinstance(m, torch.nn.Dropout)]
    casting = [m.cast_input_dtype_enabled for m in run.unwrapped.modules() if isinstance(m, BaseTunerLayer)]
    engine.finish(run, engine.fit(run))
    assert dropouts and casting
    if tuning == "off":
        assert all(type(m) is torch.nn.Dropout for m in dropouts) and all(casting)
    else:
        assert all(type(m) is FastDropout for m in dropouts) and not any(casting)
