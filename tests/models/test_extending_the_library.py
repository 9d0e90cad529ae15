"""Extending the library with one's own code, through the documented routes only: a user's cell
(linear, MLP, transformer) in the four cores (``wtmodels.cores`` / ``wtmodels.ode.ODECore``),
masks on its layers (``apply_masks``), a registered variant (``@wt.register_model``) and a
registered solver (``wt.register_solver``) inside ``wt.DEQ``; every result against a closed form
or a hand computation, and a user's plausible mistakes against a ``ValueError``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels import models as model_registry
from wtmodels import solvers as solver_registry
from wtmodels.cores import DEQCore, UnrolledCore, UntiedCore
from wtmodels.masks import apply_masks, mask_index, remove_masks
from wtmodels.ode import ODECore

N = 6  # state size of the linear cell


class LinearCell(nn.Module):
    """``f(z, x) = A z + x``."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Linear(A.shape[0], A.shape[0], bias=False, dtype=A.dtype)
        with torch.no_grad():
            self.A.weight.copy_(A)

    def forward(self, z, x):
        return self.A(z) + x


class MLPCell(nn.Module):
    """``f(z, x) = tanh(W2 relu(W1 z + b1) + b2 + x)`` on flattened 8x8 images."""

    def __init__(self, d: int = 64, h: int = 32):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, z, x):
        return torch.tanh(self.l2(torch.relu(self.l1(z))) + x)


def _contraction(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g, dtype=torch.float64)
    return 0.5 * A / torch.linalg.matrix_norm(A, 2)  # spectral norm 0.5


def _x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# a linear cell in the four cores: closed forms


def test_linear_cell_unrolled_untied_deq_ode_match_closed_forms():
    A, x, D = _contraction(), _x(3, N), 5
    partial_sum = sum(torch.linalg.matrix_power(A, t) for t in range(D))  # z_D = sum A^t x
    cell = LinearCell(A)
    unrolled = UnrolledCore(cell, D)(x)
    torch.testing.assert_close(unrolled, x @ partial_sum.T, rtol=0, atol=1e-13)
    untied = UntiedCore([copy.deepcopy(cell) for _ in range(D)])(x)
    torch.testing.assert_close(untied, x @ partial_sum.T, rtol=0, atol=1e-13)

    deq = DEQCore(LinearCell(A), wt.DEQ(f_tol=1e-12, f_max_iter=200, b_tol=1e-12,
                                                 b_max_iter=200), depth=D)
    xg = x.clone().requires_grad_()
    z = deq(xg)
    inv = torch.linalg.inv(torch.eye(N, dtype=torch.float64) - A)
    torch.testing.assert_close(z, x @ inv.T, rtol=0, atol=1e-10)
    w = _x(3, N, seed=2)
    (z * w).sum().backward()
    u = w @ inv  # the adjoint (I - A)^-T w, per sample
    torch.testing.assert_close(xg.grad, u, rtol=0, atol=1e-9)
    torch.testing.assert_close(deq.cell.A.weight.grad, u.T @ z.detach(), rtol=0, atol=1e-9)

    T = 2.0  # dz/dt = (A - I) z + x, z(0) = 0: z(T) = (A - I)^-1 (expm((A - I) T) - I) x
    M = A - torch.eye(N, dtype=torch.float64)
    closed = torch.linalg.solve(M, torch.linalg.matrix_exp(M * T) - torch.eye(N, dtype=M.dtype))
    ode = ODECore(LinearCell(A), depth=4, T=T, method="dopri5", rtol=1e-10,
                  atol=1e-10)
    torch.testing.assert_close(ode(x), x @ closed.T, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------
# masks on a user's layers


def _by_hand(cell: MLPCell, x, depth, k, schedule, masks1, masks2):
    z = torch.zeros_like(x)
    for t in range(depth):
        i = mask_index(t, depth, k, schedule)
        h = torch.relu(F.linear(z, cell.l1.weight * masks1[i], cell.l1.bias))
        z = torch.tanh(F.linear(h, cell.l2.weight * masks2[i], cell.l2.bias) + x)
    return z


@pytest.mark.parametrize("schedule, expected", [("cyclic", [0, 1, 2, 0, 1, 2]),
                                                ("block", [0, 0, 1, 1, 2, 2])])
def test_masked_mlp_cell_uses_mask_of_its_schedule_and_round_trips(schedule, expected):
    D, K = 6, 3
    assert [mask_index(t, D, K, schedule) for t in range(D)] == expected
    cell = apply_masks(MLPCell().double(), k=K, density=0.5, seed=3, schedule=schedule,
                       types=(nn.Linear,))
    m1, m2 = cell.l1.weight_masks.clone(), cell.l2.weight_masks.clone()
    assert m1.shape == (K, 32, 64) and m1.dtype == torch.bool
    assert m1.flatten(1).sum(1).tolist() == [32 * 64 // 2] * K  # "random": exact count
    assert len({tuple(m.flatten().tolist()) for m in m1}) == K  # pairwise distinct
    x = _x(5, 64)
    reference = _by_hand(cell, x, D, K, schedule, m1, m2)
    torch.testing.assert_close(UnrolledCore(cell, D)(x), reference, rtol=0, atol=0)
    untied = UntiedCore([copy.deepcopy(cell) for _ in range(D)])
    torch.testing.assert_close(untied(x), reference, rtol=0, atol=0)

    buffer = io.BytesIO()
    torch.save(cell.state_dict(), buffer)
    buffer.seek(0)
    other = apply_masks(MLPCell().double(), k=K, density=0.5, seed=99, schedule=schedule,
                        types=(nn.Linear,))
    assert not torch.equal(other.l1.weight_masks, m1)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.l1.weight_masks, m1) and torch.equal(other.l2.weight_masks, m2)
    torch.testing.assert_close(UnrolledCore(other, D)(x), reference, rtol=0, atol=0)


def test_masked_deq_core_solves_the_k_periodic_composite():
    K = 3
    cell = apply_masks(MLPCell().double(), k=K, density=0.5, seed=1, types=(nn.Linear,))
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(0.3)
    x = _x(4, 64)
    z = DEQCore(cell, wt.DEQ(f_tol=1e-12, f_max_iter=200), depth=2)(x)
    # f_{K-1} o ... o f_0 by hand, from z: z again
    m1, m2 = cell.l1.weight_masks, cell.l2.weight_masks
    again = z.detach()
    for i in range(K):
        h = torch.relu(F.linear(again, cell.l1.weight * m1[i], cell.l1.bias))
        again = torch.tanh(F.linear(h, cell.l2.weight * m2[i], cell.l2.bias) + x)
    torch.testing.assert_close(again, z.detach(), rtol=0, atol=1e-11)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_transformer_cell_matches_hand_masked_copies(mode):
    class TransformerCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, z, x):
            return self.enc(z + x)

    torch.manual_seed(0)
    D, K = 4, 2
    cell = apply_masks(TransformerCell(), k=K, density=0.5, seed=0, types=nn.Linear)
    masked = sorted(n for n, m in cell.named_modules() if hasattr(m, "weight_masks"))
    assert masked == ["enc.linear1", "enc.linear2"]  # out_proj skipped, as documented
    x = torch.randn(3, 5, 16)
    copies = []
    for i in range(K):  # unmasked copies holding W * mask_i
        plain = remove_masks(copy.deepcopy(cell))
        with torch.no_grad():
            plain.enc.linear1.weight.mul_(cell.enc.linear1.weight_masks[i])
            plain.enc.linear2.weight.mul_(cell.enc.linear2.weight_masks[i])
        copies.append(plain.train(mode == "train"))
    core = UnrolledCore(cell, D).train(mode == "train")
    with torch.no_grad():
        z = torch.zeros_like(x)
        for t in range(D):
            z = copies[mask_index(t, D, K, "cyclic")](z, x)
        torch.testing.assert_close(core(x), z, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# a registered solver inside wt.DEQ (forward and backward)


def _direct(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
    """Exact solve of an affine ``f`` by probing its Jacobian: ``z = (I - J)^-1 f(0)``."""
    B, n = z0.shape[0], z0[0].numel()
    b = f(torch.zeros_like(z0)).reshape(B, n)
    eye = torch.eye(n, dtype=z0.dtype)
    J = torch.stack([f(eye[j].expand(B, n).reshape(z0.shape)).reshape(B, n) - b
                     for j in range(n)], -1)
    z = torch.linalg.solve(eye - J, b.unsqueeze(-1)).squeeze(-1)
    fz = f(z.reshape(z0.shape)).reshape(B, n)
    res = (fz - z).norm(dim=1)
    rel = res / (fz.norm(dim=1) + 1e-8)
    stats = wt.SolverStats(
        nstep=torch.full((B,), n + 2, dtype=torch.long), abs_lowest=res, rel_lowest=rel,
        converged=(res if stop_mode == "abs" else rel) <= tol,
        diverged=torch.zeros(B, dtype=torch.bool), abs_trace=res[:, None], rel_trace=rel[:, None])
    return z.reshape(z0.shape), stats


def test_registered_solver_runs_both_solves_of_the_deq():
    name = "direct_test_extending"
    wt.register_solver(name, _direct)
    try:
        with pytest.raises(ValueError, match="already registered"):
            wt.register_solver(name, _direct)
        A, x = _contraction(), _x(3, N).requires_grad_()
        lin = LinearCell(A).A
        deq = wt.DEQ(f_solver=name, b_solver=name, f_tol=1e-10, b_tol=1e-10)
        z, stats = deq(lambda z: lin(z) + x, torch.zeros(3, N, dtype=torch.float64))
        inv = torch.linalg.inv(torch.eye(N, dtype=torch.float64) - A)
        torch.testing.assert_close(z, x.detach() @ inv.T, rtol=0, atol=1e-13)
        assert stats.nstep.tolist() == [N + 2] * 3  # our solver's stats came back
        w = _x(3, N, seed=2)
        (z * w).sum().backward()
        u = w @ inv
        torch.testing.assert_close(x.grad, u, rtol=0, atol=1e-13)
        torch.testing.assert_close(lin.weight.grad, u.T @ z.detach(), rtol=0, atol=1e-13)
        assert deq.last_backward_stats.nstep.tolist() == [N + 2] * 3  # the adjoint: ours too
        with pytest.raises(ValueError, match="valid options: \\[\\]"):
            wt.DEQ(f_solver=name, f_opts={"m": 3})
    finally:
        solver_registry._SOLVERS.pop(name, None)


# --------------------------------------------------------------------------------------------
# a registered variant, and the mistakes of registering one


def test_registered_variant_builds_what_it_says():
    @wt.register_model
    def extending_tiny_masked():
        return dict(core="unrolled", depth=3, width=8, stages=1, norm_groups=4, mask_k=3)

    try:
        with pytest.raises(ValueError, match="already registered"):
            wt.register_model(extending_tiny_masked)
        model = wt.create_model("extending_tiny_masked", in_chans=1, num_classes=4)
        assert (model.config.depth, model.config.mask_k, model.config.num_classes) == (3, 3, 4)
        assert model.cores[0].cell.conv1.weight_masks.shape == (3, 8, 8, 3, 3)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
        assert model.core_stats() == {"cell_evals": 3.0}
    finally:
        model_registry._REGISTRY.pop("extending_tiny_masked", None)


def test_register_model_mistakes_are_value_errors():
    before = wt.list_models()
    with pytest.raises(ValueError, match="factory itself"):
        wt.register_model("my_variant")  # @wt.register_model("my_variant"): AttributeError
    with pytest.raises(ValueError, match="'<lambda>'"):
        wt.register_model(lambda: dict(core="deq"))  # was registered as "<lambda>"
    assert wt.list_models() == before

    def extending_returns_list():
        return ["core", "unrolled"]

    wt.register_model(extending_returns_list)
    try:  # was TypeError: 'list' object is not a mapping
        with pytest.raises(ValueError, match="must return a dict of ModelConfig fields"):
            wt.create_model("extending_returns_list")
    finally:
        model_registry._REGISTRY.pop("extending_returns_list", None)


# --------------------------------------------------------------------------------------------
# a cell whose output shape is not z's


class NarrowCell(nn.Module):
    """Returns (B, 32) for a (B, 64) state: a hidden width that is not the input's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 32)

    def forward(self, z, x):
        return torch.tanh(self.lin(z + x))


class BroadcastCell(nn.Module):
    """Adds ``x`` with a stray token dimension: (B, 64) -> (B, B, 64) by broadcasting."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, z, x):
        return torch.tanh(self.lin(z)) + x.unsqueeze(1)


CORE_BUILDERS = {
    "unrolled depth 1": lambda cell: UnrolledCore(cell, 1),
    "unrolled": lambda cell: UnrolledCore(cell, 3),
    "untied": lambda cell: UntiedCore([cell, copy.deepcopy(cell)]),
    "deq": lambda cell: DEQCore(cell, wt.DEQ(f_max_iter=5), 3),
    "ode": lambda cell: ODECore(cell, 2, method="rk4"),
}


@pytest.mark.parametrize("core", sorted(CORE_BUILDERS))
@pytest.mark.parametrize("cell_class", [NarrowCell, BroadcastCell])
def test_cell_with_another_output_shape_is_a_value_error_in_every_core(core, cell_class):
    # before: the unrolled core returned (4, 32) at depth 1 and (4, 4, 64) for the broadcasting
    # cell without a word; untied and ode failed deep in torch (size mismatch, expand)
    model = CORE_BUILDERS[core](cell_class())
    with pytest.raises(ValueError, match=r"must return a tensor of z's shape \(4, 64\)"):
        model(torch.randn(4, 64))
