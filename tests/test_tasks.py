"""The task registry, the recipe's task names and the module files stay in sync; task collators pad as intended."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import hf_finetune.tasks as tasks
from hf_finetune.device import Padding, RulePadding, bucket_width, padding_for
from hf_finetune.errors import InputError
from hf_finetune.recipe import Recipe, recipe_from_dict
from hf_finetune.tasks.classification import ClassificationTask


def test_registry_names_every_task_module_and_each_task_its_own_name() -> None:
    files = {p.stem for p in Path(tasks.__file__).parent.glob("*.py") if p.stem not in ("__init__", "base")}
    modules = {Path(sys.modules[cls.__module__].__file__).stem for cls in tasks.TASKS.values()}
    assert modules == files, "every task module is registered, and nothing else"
    for name, cls in tasks.TASKS.items():
        assert cls.name == name
        assert cls.primary_metric in cls.metrics and cls.metrics["eval_loss"] is False
        task = tasks.get_task(Recipe(task=name))
        if name != "masked_lm":  # PEFT has no masked-LM task type
            assert task.peft_task_type
        if name in ("classification", "question_answering"):  # fresh heads; LM and seq2seq heads are pretrained
            assert task.head_modules


def test_recipe_rejects_an_unknown_task_with_the_nearest_name() -> None:
    with pytest.raises(InputError, match=r"'task': 'clasification' is not one of .*did you mean 'classification'"):
        recipe_from_dict({"task": "clasification", "data": {"train": {"path": "x"}}})


@pytest.mark.parametrize(
    ("device", "precision", "longest", "width"),
    [("cpu", "bf16", 5, 5), ("cpu", "bf16", 17, 20), ("cpu", "no", 17, 17), ("cuda", "bf16", 5, 8), ("cuda", "no", 17, 24)],
)
def test_classification_pads_to_multiples_of_8_on_gpus_and_to_width_buckets_on_cpus_in_bf16(
    tiny_bert: Path, device: str, precision: str, longest: int, width: int
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = ClassificationTask(Recipe())
    task.setup(tokenizer, padding_for(device, precision))
    collate = task.collator()
    batch = collate([{"input_ids": list(range(1, longest + 1)), "labels": 0}, {"input_ids": [1, 2], "labels": 1}])
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [longest, 2]
    assert (batch["input_ids"][0, longest:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1]


def test_cpu_tuning_off_pads_to_the_longest_row() -> None:
    assert padding_for("cpu", "bf16", "off") == Padding() and padding_for("cpu", "bf16", "auto") == Padding(buckets=True)
    assert padding_for("cuda", "bf16", "off") == Padding(multiple=8)


def test_width_buckets_keep_three_leading_bits() -> None:
    widths = [bucket_width(w) for w in range(1, 1025)]
    assert widths[:16] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16]
    for w, b in enumerate(widths, start=1):
        assert w <= b <= 1.25 * w and bucket_width(b) == b
        assert b >> max(b.bit_length() - 3, 0) << max(b.bit_length() - 3, 0) == b  # only the top three bits set
    assert widths == sorted(widths)
    assert len(set(widths[:128])) == 24 and len(set(widths)) == 36  # 8, then four per doubling


def test_bucketed_padding_stops_at_max_length(tiny_bert: Path) -> None:
    collate = RulePadding(AutoTokenizer.from_pretrained(tiny_bert), max_length=18, rule=Padding(buckets=True))
    batch = collate([{"input_ids": list(range(1, 18))}, {"input_ids": [1]}])
    assert batch["input_ids"].shape == (2, 18)  # the bucket, 20, capped
