"""Tests of the ODE core: NFE counting, known answers, adjoint gradients, masks."""

import warnings

import pytest
import torch

import wtmodels as wt
from wtmodels.cells import ConvCell
from wtmodels.model_config import ModelConfig, fields_without_effect
from wtmodels.ode import ODECore

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_fixed_grid_nfe_is_known():
    model = wt.create_model("test_ode", in_chans=1, depth=3, ode_method="rk4")
    model(X)
    assert model.core_stats() == {"nfe": 12.0, "cell_evals": 12.0}  # 3 steps x 4 stages
    model.set_depth(5)  # T scales with the depth: 5 steps of the same size
    model(X)
    assert model.core_stats()["nfe"] == 20.0
    euler = wt.create_model("test_ode", in_chans=1, depth=3, ode_method="euler", stages=2)
    euler(X)
    assert euler.core_stats()["nfe"] == 6.0  # summed over the two stages


def test_euler_with_unit_steps_is_the_unrolled_model():
    # z + 1 * (f(z) - z) = f(z): Euler with step T / depth = 1 is the weight-tied iteration
    torch.manual_seed(0)
    unrolled = wt.create_model("test_wt", in_chans=1, depth=4, mask_k=2)
    ode = wt.create_model("test_ode", in_chans=1, depth=4, mask_k=2, ode_method="euler",
                          ode_T=4.0)
    ode.load_state_dict(unrolled.state_dict())
    assert torch.allclose(ode(X), unrolled(X), atol=1e-5)


def test_adaptive_nfe_grows_with_tolerance():
    nfe = []
    for tol in (1e-3, 1e-6):
        torch.manual_seed(0)
        model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5", ode_rtol=tol,
                                ode_atol=tol, norm="none")
        model(X)
        nfe.append(model.core_stats()["nfe"])
    assert nfe[0] >= 6 and nfe[1] > nfe[0]


def test_adjoint_gradients_match_direct_backprop():
    # norm="none" keeps the dynamics non-stiff; the residual gap comes from relu kinks and
    # shrinks with the tolerance (a missing gradient path would be off by O(1))
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5", ode_rtol=1e-6,
                                ode_atol=1e-6, ode_adjoint=adjoint, norm="none", mask_k=2,
                                ode_T=1.0).double()
        model(X[:1, :, :6, :6].double()).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert (grads[1][name] - g).abs().max() <= 2e-2 * g.abs().max(), name


def test_masks_in_time_segments():
    torch.manual_seed(0)
    core = ODECore(wt.apply_masks(ConvCell(8, norm_groups=4), k=2, schedule="block"), depth=4,
                   method="rk4")
    assert core._segments() == [(0, 2, 0), (2, 4, 1)]  # merged runs of one mask
    core = ODECore(wt.apply_masks(ConvCell(8, norm_groups=4), k=2), depth=3, method="rk4")
    assert core._segments() == [(0, 1, 0), (1, 2, 1), (2, 3, 0)]
    core(torch.randn(1, 8, 4, 4))
    assert core.last_stats["nfe"] == 12  # segments do not change the step count


def test_bad_arguments():
    with pytest.raises(ValueError, match="dopri5"):
        ODECore(ConvCell(8), depth=2, method="leapfrog")
    with pytest.raises(ValueError, match="ode_T"):
        ODECore(ConvCell(8), depth=2, T=-1.0)
    with pytest.raises(ValueError, match="depth"):
        ODECore(ConvCell(8), depth=0)


@pytest.mark.parametrize("depth, T", [(5, 3.0), (9, 3.0), (9, 1.0), (7, 0.7)])
def test_masked_segments_take_exactly_depth_fixed_steps(depth, T):
    # segment boundaries like 2.4 are not exact in binary: a step_size grid gained a ~1e-7 step
    model = wt.create_model("test_ode", in_chans=1, depth=depth, mask_k=2, ode_method="rk4",
                            ode_T=T)
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert model.core_stats()["nfe"] == 4 * depth


def test_adjoint_refuses_dropout_and_warns_with_norms_bad_end_times_refused():
    with pytest.raises(ValueError, match="ode_adjoint with dropout"):
        wt.create_model("test_ode", in_chans=1, ode_adjoint=True, dropout=0.2)
    with pytest.raises(ValueError, match="ode_adjoint with spectral_norm"):
        wt.create_model("test_ode", in_chans=1, ode_adjoint=True, spectral_norm=True)
    with pytest.warns(UserWarning, match="ill-conditioned") as caught:
        wt.create_model("test_ode", in_chans=1, ode_adjoint=True, stages=2, width=8,
                        norm_groups=4)
    assert sum("ill-conditioned" in str(w.message) for w in caught) == 1  # once per model
    for T in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="ode_T must be a finite number > 0"):
            wt.create_model("test_ode", in_chans=1, ode_T=T)


class _RelaxCell(torch.nn.Module):
    """``f(z, x) = z + x (1 - z)``: ``dz/dt = x (1 - z)``, exact ``z(T) = 1 - exp(-x T)``."""

    def forward(self, z, x):
        return z + x * (1 - z)


@pytest.mark.parametrize("adjoint", [False, True])
def test_adaptive_tolerance_holds_per_sample_whatever_the_batch(adjoint):
    # one stiff sample among 255 easy ones: torchdiffeq's default error norm (RMS over the whole
    # batch) diluted its error 16-fold and it came out 17-118x less accurate than alone
    x = torch.full((256, 1, 2, 2), 0.1, dtype=torch.float64)
    x[0] = 30.0
    exact = 1 - torch.exp(-x)
    core = ODECore(_RelaxCell(), depth=1, T=1.0, method="dopri5", rtol=1e-6, atol=1e-6,
                   adjoint=adjoint)
    with torch.no_grad():
        alone = core(x[:1])
        batched = core(x)
    assert (alone - exact[:1]).abs().max() < 1e-6
    assert (batched[:1] - exact[:1]).abs().max() < 1e-6
    assert torch.allclose(batched[:1], alone, rtol=0, atol=1e-12)
    assert (batched - exact).abs().max() < 1e-6


@pytest.mark.parametrize("method", ["implicit_adams", "fixed_adams"])
def test_implicit_adams_reads_the_tolerances(method):
    # its Adams-Moulton corrector iterates until rtol / atol are met: the run must not refuse
    # --ode-rtol as a setting without effect
    assert "ode_rtol" not in fields_without_effect(ModelConfig(core="ode", ode_method=method))
    assert "ode_rtol" in fields_without_effect(ModelConfig(core="ode", ode_method="rk4"))
    assert "ode_rtol" in fields_without_effect(ModelConfig(core="ode", ode_method="explicit_adams"))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for tol in (1e-1, 1e-7):
        torch.manual_seed(0)
        model = wt.create_model("test_ode", in_chans=1, ode_method=method, depth=10,
                                ode_rtol=tol, ode_atol=tol).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # "functional iteration did not converge"
            outs.append(model(x))
    assert not torch.equal(outs[0], outs[1])



def test_ode_core_takes_an_empty_batch():
    model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5")
    assert model(torch.randn(0, 1, 5, 7)).shape == (0, 10)
