"""The CPU fast path of models.dropout.Dropout against torch's own dropout, and seeding.seed_device."""

import pytest
import torch
import torch.nn.functional as F

from dsrh_lightning.models.dropout import Dropout
from dsrh_lightning.seeding import seed_device


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(192, 1440), (7, 3, 5)])
def test_same_output_gradient_and_generator_state_as_torch_dropout(p, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for f in (lambda t: F.dropout(t, p, training=True), Dropout(p).train()):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        out = f(xi)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        results.append((out.detach(), xi.grad, torch.rand(3)))  # the next draw: as many numbers consumed
    (o1, g1, n1), (o2, g2, n2) = results
    assert torch.equal(o1, o2)
    assert torch.equal(g1, g2)
    assert torch.equal(n1, n2)
    kept = (o1 != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.2  # a mask was drawn at all


def test_eval_mode_is_identity_and_edge_probabilities_fall_back():
    x = torch.randn(4, 6)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    t = torch.randn(6, 4).t()  # non-contiguous: torch's own path
    torch.manual_seed(5)
    a = F.dropout(t, 0.5, training=True)
    torch.manual_seed(5)
    assert torch.equal(Dropout(0.5).train()(t), a)


def test_seed_device_on_cpu_draws_what_manual_seed_draws():
    torch.manual_seed(77)
    expected = (torch.rand(5), torch.randn(5), torch.empty(50).bernoulli_(0.3))
    torch.manual_seed(0)
    seed_device(77, torch.device("cpu"))
    got = (torch.rand(5), torch.randn(5), torch.empty(50).bernoulli_(0.3))
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
