"""DEQ core against known answers: on a contractive cell its gradients are the unrolled ones."""

import pytest
import torch
from torch import nn

import wtmodels as wt
from wtmodels.cores import DEQCore, UnrolledCore


class ContractiveCell(nn.Module):
    """``f(z, x) = tanh(conv(z) + x)`` with a small conv: a contraction in z (Lipschitz < 1)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


@pytest.mark.parametrize("mask_k", [0, 2])
def test_deq_gradients_match_unrolled_on_contractive_cell(mask_k):
    torch.manual_seed(0)
    cell = ContractiveCell().double()
    if mask_k:
        wt.apply_masks(cell, k=mask_k, density=0.5)  # DEQ: fixed point of f_1 o f_0
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    grads, outputs = [], []
    deq = wt.DEQ(f_solver="anderson", f_max_iter=80, f_tol=1e-12, b_solver="anderson",
                 b_max_iter=80, b_tol=1e-12, grad="ift")
    for core in (DEQCore(cell, deq, depth=1), UnrolledCore(cell, depth=60)):  # 60 = 30 x K
        cell.zero_grad()
        x.grad = None
        z = core(x)
        ((z - target) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in cell.parameters()])
        outputs.append(z.detach())
    assert core.last_stats["cell_evals"] == 60
    for g_deq, g_unrolled in zip(*grads):
        assert torch.allclose(g_deq, g_unrolled, rtol=1e-6, atol=1e-9)
    # the unrolled iteration is at the fixed point the solver found
    assert torch.allclose(outputs[0], outputs[1], atol=1e-10)


def test_deq_counts_composite_cell_evaluations():
    torch.manual_seed(0)
    cell = wt.apply_masks(ContractiveCell(), k=3, density=0.5)
    core = DEQCore(cell, wt.DEQ(f_max_iter=7, f_tol=1e-30, grad="phantom", phantom_steps=2),
                   depth=1)
    core(torch.randn(1, 4, 3, 3))
    # every solver step is K = 3 masked applications; the phantom gradient adds 2 steps
    assert core.last_stats["nstep"] == 7
    assert core.last_stats["cell_evals"] == 3 * (7 + 2)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
@pytest.mark.parametrize("mask_k", [0, 2])
def test_parametrized_cell_weights_train_in_every_gradient_mode(norm, grad, mask_k):
    # the weight parametrization is cached per forward: its first evaluation must carry a graph
    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, grad=grad, mask_k=mask_k, **{norm: True})
    model(torch.randn(2, 1, 8, 8)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
