"""FastDropout draws the same distribution as torch's dropout: i.i.d. drops at rate p, kept values scaled by 1/(1-p),
gradients masked the same way; it is reproducible under a seed and leaves weights and eval outputs untouched."""

from __future__ import annotations

import math

import pytest
import torch
from test_methods import tiny_classifier
from torch import nn

from hf_finetune.dropout import FastDropout, drop_positions, fast_dropout, use_fast_dropout
from hf_finetune.methods import apply_method, resolve_method
from hf_finetune.recipe import MethodConfig


@pytest.mark.parametrize(("p", "batch"), [(0.05, None), (0.3, None), (0.1, 3)])
def test_positions_are_iid_bernoulli(p: float, batch: int | None) -> None:
    """Every position is dropped at rate p, neighbours independently, and the count per draw has the binomial
    variance. A batch of 3 gaps makes nearly every draw continue across batches, so an off-by-one at the seams would
    move the rate."""
    torch.manual_seed(0)
    n, draws = 200, 3000
    counts = torch.zeros(n)
    per_draw, neighbours = [], 0
    for _ in range(draws):
        positions = drop_positions(n, p, batch=batch)
        assert positions.dtype == torch.int64
        assert bool((positions[1:] > positions[:-1]).all()), "positions repeat or go backwards"
        assert positions.numel() == 0 or 0 <= int(positions[0]) and int(positions[-1]) < n
        counts[positions] += 1
        per_draw.append(positions.numel())
        neighbours += int((positions[1:] - positions[:-1] == 1).sum())
    rate = counts.sum().item() / (n * draws)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / (n * draws))
    # each position separately (200 of them: 5 standard errors leaves room for the largest of 200 deviations)
    assert float((counts / draws - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / draws)
    variance = torch.tensor(per_draw, dtype=torch.float64).var().item()
    assert variance == pytest.approx(n * p * (1 - p), rel=0.15)
    # independence of neighbours: both of two adjacent positions dropped at rate p^2
    pairs = (n - 1) * draws
    assert abs(neighbours / pairs - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / pairs)


def test_kept_values_scale_and_gradients_follow_the_mask() -> None:
    torch.manual_seed(1)
    p = 0.25
    x = torch.arange(1.0, 4097.0).view(8, 16, 32).requires_grad_()
    y = fast_dropout(x, p)
    kept = y != 0
    assert y.shape == x.shape
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert torch.equal(y[kept], (x * (1 / (1 - p)))[kept])
    grad = torch.randn_like(x)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / (1 - p)), 0.0))


def test_same_seed_same_mask_and_non_contiguous_input() -> None:
    x = torch.randn(6, 40, 24).transpose(0, 1)  # not contiguous
    torch.manual_seed(3)
    a = fast_dropout(x, 0.1)
    torch.manual_seed(3)
    b = fast_dropout(x, 0.1)
    assert torch.equal(a, b) and a.shape == x.shape
    kept = a != 0
    assert torch.equal(a[kept], (x * (1 / 0.9))[kept])


def test_module_is_nn_dropout_outside_training() -> None:
    x = torch.randn(4, 8)
    module = FastDropout(0.5)
    assert torch.equal(module.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_use_fast_dropout_swaps_every_dropout_and_keeps_weights_and_outputs() -> None:
    torch.manual_seed(0)
    method = resolve_method(MethodConfig(name="lora"), 10)
    model, _ = apply_method(tiny_classifier(), method, "SEQ_CLS", ("classifier",), 10)
    before = sum(type(m) is nn.Dropout for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (3, 7))
    logits = model.eval()(input_ids=ids).logits
    assert use_fast_dropout(model) == before > 10  # the model's own dropouts and one per LoRA adapter
    assert not any(type(m) is nn.Dropout for m in model.modules())
    lora_dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert lora_dropouts and all(isinstance(m, FastDropout) and m.p == method.dropout for m in lora_dropouts)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(model.eval()(input_ids=ids).logits, logits)
    # in training the swapped modules really drop: two forwards differ
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
