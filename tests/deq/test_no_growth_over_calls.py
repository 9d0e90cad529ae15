"""Nothing accumulates over many calls of ``wt.DEQ`` and of a DEQ model.

The known answer is zero: after a warm-up, further training steps, ``no_grad`` and
``inference_mode`` evaluations leave the same number of live Python tensors, the same number of
module hooks, and create no reference cycles (garbage that only ``gc`` frees keeps its autograd
graph, and the memory under it, until a full collection). Object counts, not RSS (noisy); the
kept CPU solver buffers have their own tests (tests/train/test_threads_and_workspace.py).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import wtmodels as wt


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _growth(step, n: int = 25, warm: int = 5, tries: int = 3) -> tuple[int, int, int]:
    """(live tensors gained, gc objects gained, cyclic garbage made) over ``n`` calls of
    ``step`` after ``warm`` calls; automatic collection is off while they run.

    Measured again (up to ``tries`` times) while it is not clean: a thread a test before left
    in this process (pytest-xdist runs many files in one) can make or free objects meanwhile,
    once; a leak grows on every try."""
    for attempt in range(tries):
        found = _growth_once(step, n, warm if attempt == 0 else 0)
        if found[0] == 0 and found[2] == 0:
            break
    return found


def _growth_once(step, n: int, warm: int) -> tuple[int, int, int]:
    for _ in range(warm):
        step()
    tensors, objects = _live_tensors(), len(gc.get_objects())
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            step()
        cyclic = gc.collect()  # unreachable objects that reference counting left behind
    finally:
        if enabled:
            gc.enable()
    return _live_tensors() - tensors, len(gc.get_objects()) - objects, cyclic


def _conv_cell(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    conv, norm = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
    with torch.no_grad():
        conv.weight.copy_(0.2 * torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(3, 4, 5, 5, generator=g)
    return (lambda z: torch.relu(norm(conv(z) + x))), x, conv


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_deq_training_and_evaluation_calls_leave_nothing_behind(grad):
    f, x, conv = _conv_cell()
    deq = wt.DEQ(f_max_iter=8, b_max_iter=8, grad=grad, jac_reg=True)

    def step():
        conv.zero_grad()
        deq.train()
        z, stats = deq(f, torch.zeros_like(x))
        (z.square().mean() + 0.1 * stats.jac_loss).backward()
        deq.eval()
        with torch.no_grad():
            deq(f, torch.zeros_like(x))
        with torch.inference_mode():
            deq(f, torch.zeros_like(x), jac_reg=False)

    tensors, objects, cyclic = _growth(step)
    # a leak of one tensor (a kept z*, stats, graph) per call reads >= 25 here
    assert tensors == 0 and cyclic == 0, (tensors, cyclic)
    assert objects < 25, objects
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    if grad == "ift":  # the latest adjoint solve's stats only: (B,) and at most b_max_iter wide
        stats = deq.last_backward_stats
        assert stats.nstep.shape == (3,) and stats.abs_trace.shape[1] <= 8


def test_deq_model_steps_keep_no_graphs_hooks_or_stats():
    torch.manual_seed(0)
    model = wt.create_model("test_deq", num_classes=3, in_chans=1, mask_k=2)
    cores = [m for m in model.modules() if hasattr(m, "set_jac_reg") and m is not model]
    for core in cores:
        core.set_jac_reg(True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for m in model.modules())

    def step():
        model.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.1 * sum(c.jac_loss() for c in cores)
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            for core in cores:
                core.set_jac_reg(False)
            model(x)
            for core in cores:
                core.set_jac_reg(True)

    before = hooks()
    tensors, objects, cyclic = _growth(step, n=15, warm=3)
    assert tensors == 0 and cyclic == 0, (tensors, cyclic)
    assert objects < 15, objects
    assert hooks() == before
