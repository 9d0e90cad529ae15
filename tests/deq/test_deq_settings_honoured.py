"""Every DEQ setting is honoured (observably) or refused, never silently ignored.

wt.DEQ, DEQ models from wt.create_model and the training run: the solver actually called (a
recording solver in the registry), iteration counts against hand-computed closed forms, cell
evaluations per gradient mode, the Jacobian regulariser's weight / frequency / warm-up in the
optimiser step, and the trainer's logged solver statistics against the model's own solve.
"""

from __future__ import annotations

import json

import pytest
import torch

import wtmodels as wt
from wtmodels import data as datasets
from wtmodels.model_config import ModelConfig
from wtmodels.models import ImplicitClassifier
from wtmodels.solvers import _SOLVERS, anderson
from wtmodels.train import jac_reg_step, run

CALLS: list[dict] = []


def _recording(f, z0, *, max_iter, tol, stop_mode, m=5, lam=1e-4, beta=1.0, div_factor=10.0,
               patience=5):
    """Anderson, recording what it was asked for."""
    CALLS.append(dict(max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, beta=beta,
                      div_factor=div_factor, patience=patience))
    return anderson(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam,
                    beta=beta, div_factor=div_factor, patience=patience)


@pytest.fixture
def rec():
    wt.register_solver("rec_review17", _recording, overwrite=True)
    CALLS.clear()
    yield "rec_review17"
    _SOLVERS.pop("rec_review17", None)
    CALLS.clear()


def _call(max_iter, tol, stop_mode, **opts):
    base = dict(m=5, lam=1e-4, beta=1.0, div_factor=10.0, patience=5)
    return dict(max_iter=max_iter, tol=tol, stop_mode=stop_mode, **{**base, **opts})


def test_deq_passes_every_setting_to_the_solvers_it_names(rec):
    W = torch.nn.Parameter(0.3 * torch.eye(4))
    x = torch.randn(3, 4)
    deq = wt.DEQ(f_solver=rec, f_max_iter=7, f_tol=1e-3, b_solver=rec, b_max_iter=9,
                 b_tol=1e-5, stop_mode="abs", eval_f_max_iter=4,
                 f_opts={"m": 2, "lam": 0.1, "beta": 0.5}, b_opts={"m": 3, "patience": 2})
    z, _ = deq(lambda z: torch.tanh(z @ W.T) + x, torch.zeros(3, 4))
    z.sum().backward()
    assert CALLS == [_call(7, 1e-3, "abs", m=2, lam=0.1, beta=0.5),  # forward, then adjoint
                     _call(9, 1e-5, "abs", m=3, patience=2)]
    CALLS.clear()
    deq.eval()  # the eval budget
    deq(lambda z: torch.tanh(z @ W.T) + x, torch.zeros(3, 4))
    assert CALLS == [_call(4, 1e-3, "abs", m=2, lam=0.1, beta=0.5)]
    # phantom: the forward solver only; unroll: no solver at all (both documented)
    CALLS.clear()
    deq.train()
    deq.grad = "phantom"
    deq(lambda z: torch.tanh(z @ W.T) + x, torch.zeros(3, 4))[0].sum().backward()
    assert CALLS == [_call(7, 1e-3, "abs", m=2, lam=0.1, beta=0.5)]
    CALLS.clear()
    deq.grad = "unroll"
    deq(lambda z: torch.tanh(z @ W.T) + x, torch.zeros(3, 4))[0].sum().backward()
    assert CALLS == []


def test_model_settings_reach_its_deq_solves(rec):
    model = wt.create_model("test_deq", in_chans=1, stages=2, f_solver=rec, b_solver=rec,
                            f_max_iter=6, f_tol=1e-3, b_max_iter=5, b_tol=1e-4,
                            stop_mode="abs", eval_f_max_iter=3)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    # two stages: two forward solves, then the two adjoint solves (in reverse)
    assert CALLS == [_call(6, 1e-3, "abs")] * 2 + [_call(5, 1e-4, "abs")] * 2
    CALLS.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert CALLS == [_call(3, 1e-3, "abs")] * 2


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_f_tol_and_stop_mode_give_the_closed_form_step_counts(grad):
    # z <- z / 2 + 1000 from 0: residual 1000 / 2^k at iterate k, |f| ~ 2000:
    # rel: 2^-(k+1) / (1 - 2^-(k+1)) < 1e-3 first at k = 9; abs: 1000 / 2^k < 1e-3 at k = 20;
    # nstep counts evaluations (k + 1)
    c = torch.nn.Parameter(torch.tensor([[1000.0]]))
    for stop_mode, expected in (("rel", 10), ("abs", 21)):
        deq = wt.DEQ(f_solver="fixed_point", grad=grad, f_max_iter=100, f_tol=1e-3,
                     stop_mode=stop_mode)
        _, stats = deq(lambda z: 0.5 * z + c, torch.zeros(1, 1))
        assert stats.nstep.tolist() == [expected], stop_mode


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_divergence_options_in_f_opts_are_read_in_every_mode(grad):
    # z <- 1.5 z + 1 from 0: residual 1.5^k, lowest 1; diverged once it stays above
    # div_factor x lowest for patience evaluations: above 10 from k = 6 (1.5^6 = 11.4), so
    # patience 5 stops at k = 10 (nstep 11), patience 1 at k = 6 (7); div_factor 1e6 is
    # passed at k = 35, too late for patience 8 within 40 evaluations
    a = torch.nn.Parameter(torch.tensor(1.5))
    for opts, nstep, diverged in (({}, 11, True), ({"patience": 1}, 7, True),
                                  ({"patience": 8, "div_factor": 1e6}, 40, False)):
        deq = wt.DEQ(f_solver="fixed_point", grad=grad, f_max_iter=40, f_opts=opts)
        _, stats = deq(lambda z: a * z + 1, torch.zeros(1, 1))
        assert (stats.nstep.tolist(), stats.diverged.tolist()) == ([nstep], [diverged]), opts


@pytest.mark.parametrize("grad,train_evals,eval_evals", [
    ("ift", 2 * (4 + 1), 2 * (6 + 1)),   # K x (steps + 1): f at the fixed point
    ("phantom", 2 * (4 + 3), 2 * (6 + 3)),  # K x (steps + phantom_steps)
    ("unroll", 2 * 4, 2 * 6),            # K x steps
])
def test_budgets_and_phantom_steps_in_cell_evaluations(grad, train_evals, eval_evals):
    extra = {"phantom_steps": 3} if grad == "phantom" else {}
    model = wt.create_model("test_deq", in_chans=1, mask_k=2, grad=grad, f_tol=1e-12,
                            f_max_iter=4, eval_f_max_iter=6, **extra)
    x = torch.randn(2, 1, 8, 8)
    model(x)
    assert (model.core_stats()["nstep"], model.core_stats()["cell_evals"]) == (4, train_evals)
    model.eval()
    with torch.no_grad():
        model(x)
    assert (model.core_stats()["nstep"], model.core_stats()["cell_evals"]) == (6, eval_evals)


def test_jac_reg_in_pretrain_mode_is_refused_not_silently_zero():
    # the unrolled warm-up computes no Jacobian term: jac_loss() was 0.0 without a word, so a
    # loop adding 0.1 * model.jac_loss() during set_pretrain(True) trained unregularised
    model = wt.create_model("test_deq", in_chans=1, depth=3)
    x = torch.randn(2, 1, 8, 8)
    model.set_pretrain(True)
    model.set_jac_reg(True)
    with pytest.raises(ValueError, match="set_jac_reg.*pretrain"):
        model(x)
    model.set_jac_reg(False)  # the warm-up alone: 3 unrolled applications
    model(x)
    assert model.core_stats() == {"cell_evals": 3.0}
    model.set_pretrain(False)
    model.set_jac_reg(True)
    model(x)
    assert model.jac_loss().item() > 0


BASE = dict(model="test_deq", dataset="digits", batch_size=32, train_size=32, test_size=32,
            epochs=1, threads=1, progress="none", device="cpu", augment=False)
SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0, schedule="constant",
           warmup_epochs=0.0, lr=0.1)


def _final(out):
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    row = json.loads((out / "metrics.jsonl").read_text())
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()]), row


def test_jac_reg_weight_frequency_and_pretrain_act_on_the_optimiser_step(tmp_path):
    # one SGD step (no momentum, decay or clipping): the change from the plain step is
    # -lr * w * grad(jac_loss), so it doubles with w (same seed: same probes)
    theta = {}
    rows = {}
    for name, extra in (("plain", {}), ("w1", {"jac_reg_weight": 1.0}),
                        ("w2", {"jac_reg_weight": 2.0})):
        run({**BASE, **SGD, **extra, "out": str(tmp_path / name)})
        theta[name], rows[name] = _final(tmp_path / name)
    d1, d2 = theta["w1"] - theta["plain"], theta["w2"] - theta["plain"]
    assert d1.abs().max() > 1e-4
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-3, atol=1e-6)
    assert rows["plain"].get("jac_loss") is None and rows["w1"]["jac_loss"] > 0
    # a frequency whose draw skips step 0, or a warm-up over it: the plain step exactly
    p = next(p for p in (0.1, 0.2, 0.3, 0.4, 0.5) if not jac_reg_step(0, 0, p))
    run({**BASE, **SGD, "jac_reg_weight": 1.0, "jac_reg_freq": p, "out": str(tmp_path / "skip")})
    got, row = _final(tmp_path / "skip")
    assert row["jac_loss"] is None and torch.equal(got, theta["plain"])
    # a warm-up over every step would never read the weight: refused before anything is written
    with pytest.raises(ValueError, match=r"pretrain_steps=1 covers all 1 training steps"):
        run({**BASE, **SGD, "jac_reg_weight": 1.0, "pretrain_steps": 1,
             "out": str(tmp_path / "warmup")})
    assert not (tmp_path / "warmup").exists()
    # over the first of two steps: step 1 unrolls (no term), step 2 solves and adds it
    run({**BASE, **SGD, "train_size": 64, "jac_reg_weight": 1.0, "pretrain_steps": 1,
         "out": str(tmp_path / "warmup2")})
    _, row = _final(tmp_path / "warmup2")
    assert row["jac_loss"] > 0 and row["train_nstep"] is not None


def test_logged_train_and_test_solver_statistics_equal_the_models_own_solves(tmp_path):
    # lr 1e-30: the step leaves the float32 weights as they were, so the checkpoint is the
    # model the training pass ran; its budget (5) and the eval budget (12) differ
    out = tmp_path / "run"
    run({**BASE, **SGD, "lr": 1e-30, "f_max_iter": 5, "eval_f_max_iter": 12, "f_tol": 1e-3,
         "stop_mode": "abs", "out": str(out)})
    row = json.loads((out / "metrics.jsonl").read_text())
    saved = json.loads((out / "config.json").read_text())
    model = ImplicitClassifier(ModelConfig(**saved["model_config"]))
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    train_ds, test_ds, _ = datasets.get_datasets("digits", train_size=32, test_size=32, seed=0,
                                                 augment=False)
    core = model.cores[0]
    for prefix, ds, budget in (("train_", train_ds, 5), ("", test_ds, 12)):
        x = torch.stack([ds[i][0] for i in range(32)])
        with torch.no_grad():
            h = model.stem(x)
            _, st = wt.solve(lambda z, h=h: core.cell(z, h), torch.zeros_like(h),
                             method="anderson", max_iter=budget, tol=1e-3, stop_mode="abs")
        assert row[prefix + "nstep"] == pytest.approx(float(st.nstep.double().mean()), rel=1e-9)
        assert row[prefix + "converged"] == pytest.approx(
            float(st.converged.double().mean()), rel=1e-9)
        rel = st.rel_lowest.double()
        assert row[prefix + "rel_residual"] == pytest.approx(float(rel.mean()), rel=1e-5)
        assert row[prefix + "rel_residual_max"] == pytest.approx(float(rel.max()), rel=1e-5)
    assert int(row["train_nstep"]) <= 5 < row["nstep"]  # the two budgets were used
