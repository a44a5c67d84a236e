"""The model card in `model/README.md`: Hugging Face's format (huggingface_hub parses it), filled from the run, and
its recipe block reproduces the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from huggingface_hub import ModelCard

from hf_finetune.engine import train
from hf_finetune.recipe import recipe_from_dict


@pytest.mark.parametrize(("method", "library"), [("full", "transformers"), ("lora", "peft"), ("prefix", "hf-finetune")])
def test_model_card_parses_and_describes_the_run(
    method: str, library: str, tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": method, "training.max_steps": 3})
    results = train(recipe_from_dict(raw))
    card = ModelCard.load(out / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == library and meta["base_model"] == str(tiny_bert)
    assert meta["pipeline_tag"] == "text-classification"
    assert {"hf-finetune", "classification", method} <= set(meta["tags"])
    assert set(meta["metrics"]) == set(results["metrics"]) - {"eval_loss"}
    row = next(line for line in card.text.splitlines() if line.startswith("| validation |"))
    assert f"{results['metrics']['accuracy']:.4f}" in row
    assert f"{results['trainable_params']:,} of {results['total_params']:,}" in card.text
    # the recipe block is the resolved recipe: loaded back, it describes the very same run
    block = re.search(r"```yaml\n(.*?)```", card.text, re.S).group(1)
    again = recipe_from_dict(yaml.safe_load(block))
    assert again.run_hash() == json.loads((out / "results.json").read_text())["recipe_hash"]
