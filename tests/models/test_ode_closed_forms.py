"""The ODE core and the untied baseline, as a new user: closed-form answers of a
linear cell (matrix exponentials, the Runge-Kutta Taylor recursion), masks per time segment,
gradients against finite differences, a DataParallel replica under the adjoint, bad values."""

import math
import warnings

import pytest
import torch

import wtmodels as wt
from wtmodels.masks import apply_masks, mask_index
from wtmodels.ode import ODECore

N = 4
DT = torch.float64


class _LinCell(torch.nn.Module):
    """``f(z, x) = W z + x``: ``dz/dt = (W - I) z + x``, a masked ``nn.Linear`` inside."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N, N, bias=False)

    def forward(self, z, x):
        return self.lin(z) + x


def _cell(seed=0, k=0, schedule="cyclic"):
    torch.manual_seed(seed)
    cell = _LinCell()
    if k:
        cell = apply_masks(cell, k=k, density=0.5, schedule=schedule, types=(torch.nn.Linear,))
    return cell.double()


X = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))
I_N = torch.eye(N, dtype=DT)


def _exact(B, z, h):
    """``z(h)`` of ``dz/dt = B z + x`` from ``z``: ``e^{hB} z + B^{-1} (e^{hB} - I) x``."""
    E = torch.linalg.matrix_exp(h * B)
    return z @ E.T + X @ torch.linalg.solve(B, E - I_N).T


@pytest.mark.parametrize("method, tol, bound", [("dopri5", 1e-10, 1e-8),
                                               ("adaptive_heun", 1e-6, 1e-5)])
def test_linear_cell_matches_the_matrix_exponential(method, tol, bound):
    cell = _cell()
    core = ODECore(cell, depth=3, T=2.0, method=method, rtol=tol, atol=tol)
    with torch.no_grad():
        z = core(X)
    exact = _exact(cell.lin.weight.detach() - I_N, torch.zeros_like(X), 2.0)
    assert (z - exact).abs().max() < bound


@pytest.mark.parametrize("method, order, evals", [("euler", 1, 1), ("midpoint", 2, 2),
                                                  ("heun2", 2, 2), ("heun3", 3, 3),
                                                  ("rk4", 4, 4)])
@pytest.mark.parametrize("depth", [1, 3, 7])
def test_fixed_grid_is_the_taylor_recursion_with_depth_steps(method, order, evals, depth):
    # for a linear autonomous ODE every s-stage order-s (s <= 4) Runge-Kutta step is the Taylor
    # polynomial of order s: z += sum_j h^j / j! B^(j-1) (B z + x), with h = T / depth
    cell, T = _cell(), 2.0
    core = ODECore(cell, depth=depth, T=T, method=method)
    with torch.no_grad():
        z = core(X)
    B, h, ref = cell.lin.weight.detach() - I_N, T / depth, torch.zeros_like(X)
    for _ in range(depth):
        term, inc = ref @ B.T + X, torch.zeros_like(X)
        for j in range(1, order + 1):
            inc = inc + h**j / math.factorial(j) * term
            term = term @ B.T
        ref = ref + inc
    assert (z - ref).abs().max() < 1e-12
    assert core.last_stats == {"nfe": float(evals * depth), "cell_evals": float(evals * depth)}


@pytest.mark.parametrize("schedule", ["cyclic", "block"])
@pytest.mark.parametrize("depth, k, test_depth", [(5, 3, None), (5, 3, 7), (4, 2, 2)])
@pytest.mark.parametrize("adjoint", [False, True])
def test_segment_t_integrates_with_mask_index_t(schedule, depth, k, test_depth, adjoint):
    # the exact solution is a product of matrix exponentials, one per segment of length
    # T / depth, segment t with mask mask_index(t, D, K, schedule) (D = the test-time depth)
    cell, T = _cell(k=k, schedule=schedule), 2.0
    core = ODECore(cell, depth=depth, T=T, method="dopri5", rtol=1e-11, atol=1e-11,
                   adjoint=adjoint)
    d = depth
    if test_depth:
        core.set_depth(test_depth)
        d = test_depth
    with torch.no_grad():
        z = core(X)
    W, M = cell.lin.weight.detach(), cell.lin.weight_masks
    ref = torch.zeros_like(X)
    for t in range(d):
        ref = _exact(W * M[mask_index(t, d, k, schedule)] - I_N, ref, T / depth)
    assert (z - ref).abs().max() < 1e-9


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_match_finite_differences(adjoint):
    cell = _cell(seed=1, k=2)
    core = ODECore(cell, depth=3, T=1.5, method="dopri5", rtol=1e-11, atol=1e-11,
                   adjoint=adjoint)
    x = X.clone().requires_grad_(True)
    (core(x) ** 3).sum().backward()
    eps, w = 1e-6, cell.lin.weight
    with torch.no_grad():
        for i, j in [(0, 0), (1, 2), (3, 1), (2, 3)]:
            w[i, j] += eps
            up = (core(X) ** 3).sum()
            w[i, j] -= 2 * eps
            down = (core(X) ** 3).sum()
            w[i, j] += eps
            assert abs(w.grad[i, j] - (up - down) / (2 * eps)) < 1e-7
        for idx in [(0, 0), (2, 3)]:
            xp, xm = X.clone(), X.clone()
            xp[idx] += eps
            xm[idx] -= eps
            fd = ((core(xp) ** 3).sum() - (core(xm) ** 3).sum()) / (2 * eps)
            assert abs(x.grad[idx] - fd) < 1e-7
    never = ~cell.lin.weight_masks.any(0)  # in no mask: no gradient at all
    assert never.any() and (w.grad[never] == 0).all()


def _data_parallel_replica(module):
    """What ``torch.nn.parallel.replicate`` makes per device (it needs CUDA devices): module
    copies without ``_parameters``, holding non-leaf copies of the parameters as attributes."""
    replica = module._replicate_for_data_parallel()
    for key, param in module._parameters.items():
        setattr(replica, key, None if param is None else param * 1)
    for name, child in module._modules.items():
        if child is not None:
            replica._modules[name] = _data_parallel_replica(child)
    return replica


def test_adjoint_trains_the_cell_of_a_data_parallel_replica():
    # the adjoint was given cell.parameters(), empty on a replica: under nn.DataParallel the
    # cell got no gradient at all (None) while the stem and head trained
    x = torch.randn(2, 1, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = wt.create_model("test_ode", in_chans=1, norm="none", ode_method="dopri5",
                                ode_rtol=1e-9, ode_atol=1e-9, ode_adjoint=adjoint,
                                ode_T=1.0).double()
        _data_parallel_replica(model)(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, direct in grads[0].items():
        adj = grads[1][name]
        assert adj is not None, name
        # ReLU kinks limit the adjoint's agreement (README: ~1e-3 with norm="none")
        assert (adj - direct).abs().max() <= 1e-2 * direct.abs().max(), name


@pytest.mark.parametrize("kwargs, message", [
    ({"rtol": math.inf}, "ode_rtol must be a finite number > 0"),
    ({"atol": float("nan")}, "ode_atol must be a finite number > 0"),
    ({"rtol": "1e-3"}, "ode_rtol must be a finite number > 0"),
    ({"T": "3"}, "ode_T must be a finite number > 0"),
    ({"atol": -1e-3}, "ode_atol must be a finite number > 0"),
    ({"adjoint": "no"}, "ode_adjoint must be true or false"),
])
def test_odecore_refuses_what_model_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ODECore(_LinCell(), depth=2, method="dopri5", **kwargs)
    fields = {"rtol": "ode_rtol", "atol": "ode_atol", "T": "ode_T", "adjoint": "ode_adjoint"}
    (key, value), = kwargs.items()
    with pytest.raises(ValueError, match=fields[key]):
        wt.get_config("test_ode", **{fields[key]: value})


def test_untied_first_cells_never_train_as_the_readme_counts():
    # README: untied_s's first cells hold 92,736 parameters, 92,448 of which never train (two
    # convs 2 x 9 w^2, first norm 2w, second norm's scale w, for w = 32 and 64)
    model = wt.create_model("untied_s")
    assert sum(p.numel() for p in model.parameters()) == 576_554  # "577k"
    model(torch.randn(2, 3, 8, 8)).logsumexp(1).mean().backward()
    first = [p for core in model.cores for p in core.cells[0].parameters()]
    assert sum(p.numel() for p in first) == sum(18 * w * w + 6 * w for w in (32, 64)) == 92_736
    dead = sum(p.numel() for p in first if p.grad is None or not p.grad.any())
    assert dead == sum(18 * w * w + 3 * w for w in (32, 64)) == 92_448


@pytest.mark.parametrize("name, extra", [("test_ode", {"mask_k": 2}),
                                         ("test_ode", {"ode_adjoint": True, "norm": "none"}),
                                         ("test_untied", {"mask_k": 2, "dropout": 0.2})])
def test_tiny_variants_train_and_round_trip(name, extra):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wt.create_model(name, in_chans=1, num_classes=3, **extra)
        other = wt.create_model(name, in_chans=1, num_classes=3, **extra)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    assert torch.equal(model(x), other(x))
