"""Recipes: every shipped file validates; unknown keys and bad values give errors naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_finetune.errors import InputError
from hf_finetune.recipe import Recipe, apply_override, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
SST2 = Path(__file__).parent.parent / "recipes" / "classification" / "sst2.yaml"


def test_recipes_cover_every_task() -> None:
    from hf_finetune.tasks import TASK_NAMES

    assert {load_recipe(path).task for path in RECIPES} == set(TASK_NAMES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parent.parent.parent)))
def test_every_recipe_loads_and_opens_with_its_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.train is not None and recipe.data.validation is not None
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"hf-finetune train {path.relative_to(path.parent.parent.parent)}" in header


def test_overrides_apply_with_yaml_types(tmp_path: Path) -> None:
    recipe = load_recipe(
        RECIPES[0],
        [
            "training.lr=3e-4",
            "method.name=adalora",
            "data.train.max_samples=10",
            "method.target_modules=[query,value]",
        ],
    )
    assert recipe.training.lr == 3e-4
    assert recipe.method.name == "adalora"
    assert recipe.data.train.max_samples == 10
    assert recipe.method.target_modules == ["query", "value"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.lrr=1", "unknown key 'training.lrr' (did you mean 'training.lr'?)"),
        ("trainig.lr=1", "unknown key 'trainig' (did you mean 'training'?)"),
        ("data.train.max_sample=5", "did you mean 'data.train.max_samples'?"),
        ("method.name=lorra", "'method.name': 'lorra' is not one of"),
        ("training.batch_size=abc", "'training.batch_size': expected an integer"),
        ("training.batch_size=0", "'training.batch_size': must be a positive integer"),
        ("training.precision=fp8", "'training.precision'"),
        ("training.warmup_ratio=1.5", "'training.warmup_ratio'"),
        ("training.group_by_length=maybe", "'training.group_by_length': expected true or false"),
    ],
)
def test_bad_recipes_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(InputError, match="sst2.yaml") as err:
        load_recipe(SST2, [override])
    assert expected in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(InputError) as err:
        recipe_from_dict({"trainin": {}, "method": {"name": "x"}, "data": {"train": {"path": "a"}}, "foo": 1})
    message = str(err.value)
    assert "'trainin'" in message and "'method.name'" in message and "'foo'" in message


def test_missing_train_split_and_bad_override_syntax() -> None:
    with pytest.raises(InputError, match="'data.train': a training split is required"):
        recipe_from_dict({})
    with pytest.raises(InputError, match="expected dotted.key=value"):
        apply_override({}, "training.lr")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [classification\n")
    with pytest.raises(InputError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
