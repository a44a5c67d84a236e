"""`model/README.md`: a Hugging Face model card (YAML metadata, then prose) filled from the finished run, so that a
model folder moved or pushed on its own still says what it is, how well it did and how to make it again."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from hf_finetune.methods import get_method
from hf_finetune.recipe import Recipe
from hf_finetune.tasks import TASKS

# recipe method settings worth a line in the card, where the method has them
METHOD_KEYS = ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "init_r", "target_r")


def _library(folder: Path) -> str:
    """Which library loads the folder as it is: PEFT for an adapter, transformers for a whole model; our own
    prefix/prompt modules need hf-finetune."""
    if (folder / "adapter_config.json").is_file():
        return "peft"
    if (folder / "config.json").is_file() and any(folder.glob("model*.safetensors")):
        return "transformers"
    return "hf-finetune"


# PEFT's Auto class for each task type its adapter_config.json may name; masked LM has none (PEFT's generic PeftModel)
PEFT_AUTO = {
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
}


def plain_loading_code(folder: Path, name: str | None = None) -> str | None:
    """Python that loads the saved model with transformers (and PEFT for an adapter) alone, or None where only
    hf-finetune can (its own prefix/prompt modules). `name`: how the code names the folder (default: its path)."""
    from hf_finetune.checkpoint import INFO_NAME

    info = json.loads((folder / INFO_NAME).read_text())
    where = repr(name or str(folder))
    auto = info.get("auto_class")
    if auto is None:
        return None
    tokenizer = f"tokenizer = AutoTokenizer.from_pretrained({where})"
    if _library(folder) == "transformers":
        from transformers.pipelines import SUPPORTED_TASKS

        tag = TASKS[info["task"]].pipeline_tag
        # transformers 5 dropped the question-answering, translation and summarization pipelines
        pipe = tag in SUPPORTED_TASKS
        return "\n".join([
            f"from transformers import {auto}, AutoTokenizer" + (", pipeline" if pipe else ""),
            "",
            f"model = {auto}.from_pretrained({where})",
            tokenizer,
            *([f"pipe = pipeline({tag!r}, model={where})"] if pipe else []),
        ])  # fmt: skip
    if _library(folder) != "peft":
        return None
    adapter = json.loads((folder / "adapter_config.json").read_text())
    task_type = adapter.get("task_type")
    config = dict(info.get("head_config", {}))
    if "id2label" in config:  # JSON made its keys strings
        config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    first, loading = get_method(info["method"]).load_code(adapter)
    head = "".join(f", {k}={v!r}" for k, v in config.items()) + loading
    if task_type in PEFT_AUTO:
        peft_auto = PEFT_AUTO[task_type]
        return "\n".join([
            f"from peft import {peft_auto}",
            "from transformers import AutoTokenizer",
            *first,
            "",
            "# the base model comes from adapter_config.json's base_model_name_or_path; the head's labels are given",
            "# here because PEFT builds the base model from the base model's own config first",
            f"model = {peft_auto}.from_pretrained({where}{head})",
            tokenizer,
        ])  # fmt: skip
    base = repr(info["base_model"])
    return "\n".join([
        "from peft import PeftModel",
        f"from transformers import {auto}, AutoTokenizer",
        *first,
        "",
        f"model = PeftModel.from_pretrained({auto}.from_pretrained({base}{head}), {where})",
        tokenizer,
    ])  # fmt: skip


def _datasets(recipe: Recipe) -> list[str]:
    names = {s.name for s in (recipe.data.train, recipe.data.validation, recipe.data.test) if s is not None and s.name}
    return sorted(names)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def command_line() -> str | None:
    """The `hf-finetune ...` command this process runs, when it was started from the command line."""
    script = Path(sys.argv[0])
    if script.name != "hf-finetune" and script.parent.name != "hf_finetune":  # the console script, or python -m
        return None
    return shlex.join(["hf-finetune", *sys.argv[1:]])


def write_model_card(folder: Path, recipe: Recipe, results: dict[str, Any], notes: list[str] | None = None) -> None:
    """`folder/README.md`, replacing the stub PEFT's save_pretrained leaves there; written whole or not at all.
    `notes`: the task's own lines for the Training section (e.g. a chat template's added tokens)."""
    from hf_finetune.checkpoint import disk_errors

    target, tmp = folder / "README.md", folder / ".README.md.tmp"
    with disk_errors(target, tmp):
        tmp.write_text(model_card(folder, recipe, results, command_line(), notes))
        os.replace(tmp, target)


def model_card(
    folder: Path, recipe: Recipe, results: dict[str, Any], command: str | None = None, notes: list[str] | None = None
) -> str:
    """The card's text for the model saved in `folder` by the run that produced `results`."""
    t, method = recipe.training, results["method"]
    base = None if recipe.model.from_scratch is not None else recipe.model.name_or_path
    meta: dict[str, Any] = {
        "library_name": _library(folder),
        **({"base_model": base} if base else {}),
        "pipeline_tag": TASKS[recipe.task].pipeline_tag,
        "tags": ["hf-finetune", recipe.task, method],
        **({"datasets": _datasets(recipe)} if _datasets(recipe) else {}),
        "metrics": sorted(k for k in results["metrics"] if k != "eval_loss") or ["eval_loss"],
    }
    data = recipe.data
    splits = ", ".join(
        f"{name}: `{s.path or s.name}`" + (f" (first {s.max_samples} rows)" if s.max_samples else "")
        for name, s in (("train", data.train), ("validation", data.validation), ("test", data.test))
        if s is not None
    )
    settings = results["recipe"]["method"]
    hyper = ", ".join(f"{k}={settings[k]}" for k in METHOD_KEYS if settings.get(k) is not None)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(str(recipe.output_dir)).name or 'model'}: {recipe.task}, {method}",
        "",
        "Fine-tuned with hf-finetune from "
        f"`{base or results['model']}` for **{recipe.task}** with **{method}**"
        + (f" ({hyper})" if hyper else "")
        + f": {results['trainable_params']:,} of {results['total_params']:,} parameters trained.",
        "",
        "## Training",
        "",
        f"- data: {splits}",
        f"- {results['steps']} optimizer steps ({results['epochs']:.2f} epochs), global batch "
        f"{results['global_batch_size']}, lr {results['recipe']['training']['lr']}, {t.scheduler} schedule, "
        f"warm-up {results['recipe']['training']['warmup_ratio']}, weight decay {t.weight_decay}, seed {t.seed}",
        f"- precision {'fp32' if results['precision'] == 'no' else results['precision']}, "
        f"{results['world_size']} process(es) on "
        f"{results['versions'].get('device', '?')}; {results['train_runtime_s']:.0f} s of training",
        "- " + ", ".join(f"{k} {results['versions'][k]}" for k in ("torch", "transformers", "peft", "accelerate")
                         if k in results["versions"]),  # fmt: skip
    ]
    if results.get("final_model"):
        lines.append(f"- final model: {results['final_model']}")
    lines += [f"- {note}" for note in notes or []]
    lines += ["", "## Results", "", "| split | " + " | ".join(meta["metrics"]) + " |",
              "|---|" + "---|" * len(meta["metrics"])]  # fmt: skip
    for split, key in (("validation", "metrics"), ("test", "test_metrics")):
        if results.get(key):
            lines.append(f"| {split} | " + " | ".join(_fmt(results[key].get(m, "-")) for m in meta["metrics"]) + " |")
    recipe_yaml = yaml.safe_dump({k: v for k, v in recipe.to_dict().items() if k != "compare"}, sort_keys=False)
    lines += [
        "",
        "## Reproduce",
        "",
        *([f"```bash\n{command}\n```", ""] if command else []),
        "The run's recipe (defaults left to hf-finetune, which fills them as above); save it as `recipe.yaml` and "
        "run `hf-finetune train recipe.yaml`:",
        "",
        "```yaml",
        recipe_yaml.strip(),
        "```",
        "",
        "## Use",
        "",
        "```bash",
        "hf-finetune predict recipe.yaml checkpoint=PATH_TO_THIS_FOLDER --input rows.jsonl --output predictions.jsonl",
        "```",
        "",
    ]
    code = plain_loading_code(folder)
    if code:
        lines += ["With transformers" + (" and PEFT" if "peft" in code else "") + " alone:", "", "```python", code,
                  "```", ""]  # fmt: skip
    else:
        lines += ["This method's modules are hf-finetune's own: load the folder with hf-finetune.", ""]
    return "\n".join(lines)
