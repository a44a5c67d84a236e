"""Method defaults resolve as documented, AdaLoRA's schedule follows the run length, LoRA+ groups its learning rates,
and leaving PEFT's input casts to autocast changes no bit of a bf16 step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import BertConfig, BertForSequenceClassification

from hf_finetune.device import leave_input_casts_to_autocast
from hf_finetune.dropout import use_fast_dropout
from hf_finetune.errors import InputError
from hf_finetune.methods import apply_method, build_optimizer, build_peft_config, get_method, resolve_method
from hf_finetune.recipe import MethodConfig


def tiny_classifier() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return BertForSequenceClassification(config)


def test_defaults_fill_unset_fields_and_recipe_values_win() -> None:
    resolved = resolve_method(MethodConfig(name="lora", alpha=8), total_steps=100)
    assert resolved.r == get_method("lora").defaults["r"]
    assert resolved.alpha == 8


def test_adalora_schedule_scales_with_the_run() -> None:
    short, long = (
        resolve_method(MethodConfig(name="adalora"), 100),
        resolve_method(MethodConfig(name="adalora"), 1000),
    )
    assert (short.tinit, short.tfinal, short.deltaT) == (10, 20, 1)
    assert (long.tinit, long.tfinal, long.deltaT) == (100, 200, 10)
    config = build_peft_config(long, "SEQ_CLS", 1000)
    assert config.total_step == 1000 and config.init_r == long.r and config.target_r == long.target_r
    with pytest.raises(InputError, match="must be below the run's 20 optimizer steps"):
        build_peft_config(
            resolve_method(MethodConfig(name="adalora", tinit=10, tfinal=10), 20), "SEQ_CLS", 20
        )


def test_full_has_no_peft_config() -> None:
    assert build_peft_config(resolve_method(MethodConfig(name="full"), 10), "SEQ_CLS", 10) is None


def test_loraplus_gives_b_matrices_the_larger_rate() -> None:
    method = resolve_method(MethodConfig(name="lora", loraplus_lr_ratio=16), 10)
    model, _ = apply_method(tiny_classifier(), method, "SEQ_CLS", ("classifier",), 10)
    optimizer = build_optimizer(model, method, lr=1e-3, weight_decay=0.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    b = [n for n in named if "lora_B" in n]
    a = [n for n in named if "lora_A" in n]
    assert b and a
    assert all(lr_of[id(named[n])] == pytest.approx(16e-3) for n in b)
    assert all(lr_of[id(named[n])] == pytest.approx(1e-3) for n in a)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(lr_of) == trainable


def test_plain_optimizer_skips_decay_on_biases_and_norms() -> None:
    model = tiny_classifier()
    method = resolve_method(MethodConfig(name="full"), 10)
    optimizer = build_optimizer(model, method, lr=1e-4, weight_decay=0.01)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim == 2 and "LayerNorm" not in name), name
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize("loraplus", [None, 16])
def test_fused_adamw_matches_the_loop_and_reaches_loraplus(loraplus: float | None) -> None:
    """The engine asks for fused AdamW on CPU and CUDA (a fraction of the loop's step time); same update either way."""
    method = resolve_method(MethodConfig(name="lora", loraplus_lr_ratio=loraplus), 10)
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = apply_method(tiny_classifier(), method, "SEQ_CLS", ("classifier",), 10)
        optimizer = build_optimizer(model, method, lr=1e-3, weight_decay=0.01, fused=fused)
        assert all(g["fused"] is fused for g in optimizer.param_groups)
        for _ in range(3):
            model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([1])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models.append(model)
    for (name, loop), fused_p in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(loop, fused_p, msg=name)


def test_leaving_input_casts_to_autocast_changes_no_bit() -> None:
    """Under bf16 autocast, skipping PEFT's cast of bf16 inputs up to the fp32 adapter dtype gives the same logits and
    the same adapter gradients, dropout included (the same seed draws the same drops)."""
    torch.manual_seed(0)
    method = resolve_method(MethodConfig(name="lora"), 10)
    model, _ = apply_method(tiny_classifier(), method, "SEQ_CLS", ("classifier",), 10)
    use_fast_dropout(model)
    model.train()
    ids, labels = torch.randint(0, 50, (4, 9)), torch.tensor([0, 1, 1, 0])
    input_dtypes = set()
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.register_forward_pre_hook(lambda _, args: input_dtypes.add(args[0].dtype))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out.logits, grads

    logits, grads = run()
    assert input_dtypes == {torch.float32, torch.bfloat16}  # some adapters really get bf16 inputs
    assert leave_input_casts_to_autocast(model) > 0
    logits_after, grads_after = run()
    assert torch.equal(logits_after, logits)
    assert grads_after.keys() == grads.keys() and any("lora_A" in n for n in grads)
    assert all(torch.equal(grads_after[n], g) for n, g in grads.items())


ROOT = Path(__file__).resolve().parent.parent


def test_registry_names_every_method_module_and_each_method_its_own_name() -> None:
    from hf_finetune.methods import METHODS

    shared = {"__init__", "base", "registry", "virtual_tokens"}
    files = {p.stem for p in (ROOT / "hf_finetune" / "methods").glob("*.py")} - shared
    assert files == set(METHODS), "one module per method, each registered under its module's name"
    for name, method in METHODS.items():
        assert method.name == name and "lr" in method.defaults


def test_readme_methods_table_is_the_registry() -> None:
    """The README's methods table: one row per registered method, in registry order, with its default lr."""
    from hf_finetune.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- methods table -->", 2)[1].strip().splitlines()
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in rows] == list(METHODS)
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    lr = header.index("default lr")
    assert [float(r[lr]) for r in rows] == [m.defaults["lr"] for m in METHODS.values()]


def test_no_module_outside_its_registry_names_a_method_or_a_task() -> None:
    """Method names as literals only under hf_finetune/methods/, task names only under hf_finetune/tasks/: everything
    else asks the registries. ("prompt" is also the field that generation inputs carry, and "chat" the command that
    talks to a chat run.)"""
    from hf_finetune.methods import METHOD_NAMES
    from hf_finetune.tasks import TASK_NAMES

    fields = {'"prompt"', "'prompt'"}
    for names, home, allowed in ((METHOD_NAMES, "methods", fields), (TASK_NAMES, "tasks", set())):
        alternatives = "|".join(names)
        pattern = re.compile(rf"""(["'])({alternatives})\1""")
        for path in (ROOT / "hf_finetune").rglob("*.py"):
            if home in path.relative_to(ROOT / "hf_finetune").parts:
                continue
            commands = {'"chat"'} if path.name == "cli.py" else set()
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                hits = {m.group(0) for m in pattern.finditer(line)} - allowed - commands
                assert not hits, f"{path.relative_to(ROOT)}:{number} names {hits}"
