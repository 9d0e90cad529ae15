"""The training command's precision / layout / compile options on every core.

Each option must change something measurable (the dtype the cell convolutions compute in, the
memory format of weights and activations, the call to ``torch.compile``), the solver statistics
of a DEQ must obey its budgets, and two runs with one seed on one thread must be bit-identical.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from torch import nn

import wtmodels.train as train_mod
from wtmodels.train import run

TINY = dict(dataset="digits", train_size=32, test_size=16, batch_size=16, epochs=1, threads=1,
            progress="none", seed=0, device="cpu")

# one per core type, masked where the core takes masks (test_* variants: depth 2, 1 stage)
CORES = {
    "unrolled": {"model": "test_wt", "mask_k": 2},
    "untied": {"model": "test_untied", "mask_k": 2},
    "deq": {"model": "test_deq", "mask_k": 2},
    "ode_fixed": {"model": "test_ode"},                         # rk4
    "ode_adaptive": {"model": "test_ode", "ode_method": "dopri5"},
}


def _conv_outputs(settings: dict) -> collections.Counter:
    """(dtype, channels-last?) of every conv output of a training run (train and test pass)."""
    seen: collections.Counter = collections.Counter()

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d) and out.shape[1] > 1:  # 1 channel: both formats
            cl = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            seen[(out.dtype, cl)] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        run({**TINY, **settings})
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("core", sorted(CORES))
def test_amp_runs_every_convolution_in_bf16(core):
    # --amp is bf16 autocast on the CPU: every convolution, in every core, in training and in
    # evaluation, computes in bfloat16; without it every one computes in float32
    amp = _conv_outputs({**CORES[core], "amp": True})
    plain = _conv_outputs(CORES[core])
    assert set(amp) == {(torch.bfloat16, False)} and sum(amp.values()) > 0, amp
    assert set(plain) == {(torch.float32, False)}, plain


@pytest.mark.parametrize("core", sorted(CORES))
def test_channels_last_reaches_the_weights_and_every_convolution(core, tmp_path):
    # --channels-last: the saved conv kernels are channels-last and every convolution's output
    # is channels-last (also inside the DEQ's solve and the ODE's integration)
    out = tmp_path / "run"
    seen = _conv_outputs({**CORES[core], "channels_last": True, "out": str(out)})
    assert set(seen) == {(torch.float32, True)}, seen
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    kernels = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() == 4
               and v.shape[1] > 1}
    assert kernels and all(v.is_contiguous(memory_format=torch.channels_last)
                           and not v.is_contiguous() for v in kernels.values()), list(kernels)


def test_amp_and_channels_last_together_on_a_masked_deq():
    seen = _conv_outputs({**CORES["deq"], "amp": True, "channels_last": True})
    assert set(seen) == {(torch.bfloat16, True)}, seen


@pytest.mark.parametrize("grad,per_solve", [("ift", 1), ("phantom", 4), ("unroll", 0)])
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_deq_solver_statistics_obey_the_budgets(grad, per_solve, solver):
    # f_tol 1e-12 is never met, so every sample runs its whole budget: nstep is exactly the
    # training budget (3) and the evaluation budget (2); each solver step applies the K = 2
    # masked cells, plus per solve 1 application at the fixed point (ift), the phantom steps
    # (4), or none (unroll: the returned iterate is one of the iterations)
    settings = {"model": "test_deq", "mask_k": 2, "f_max_iter": 3, "eval_f_max_iter": 2,
                "f_tol": 1e-12, "grad": grad}
    if grad == "phantom":
        settings["phantom_steps"] = 4
    if grad != "unroll":
        settings["f_solver"] = solver
    elif solver != "anderson":
        pytest.skip("unroll iterates plainly: no solver")
    m = run({**TINY, **settings})
    for prefix, budget in (("train_", 3), ("", 2)):
        for key in ("nstep", "rel_residual", "rel_residual_max", "converged", "diverged"):
            assert m[prefix + key] is not None, prefix + key
        assert m[prefix + "nstep"] == budget
        assert m[prefix + "cell_evals"] == 2 * (budget + per_solve)
        assert m[prefix + "converged"] == 0.0
        assert 0.0 <= m[prefix + "rel_residual"] <= m[prefix + "rel_residual_max"]
    assert 0.0 <= m["train_acc"] <= 1.0 and 0.0 <= m["test_acc"] <= 1.0


@pytest.mark.parametrize("method,evals", [("rk4", 4), ("euler", 1), ("midpoint", 2)])
def test_fixed_grid_ode_counts_stages_times_depth_under_amp(method, evals):
    m = run({**TINY, "model": "test_ode", "ode_method": method, "depth": 3, "amp": True})
    assert m["cell_evals"] == m["nfe"] == m["train_cell_evals"] == evals * 3


def _weights(out) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize("core", ["deq", "ode_adaptive", "untied"])
def test_one_thread_same_seed_is_bit_identical_with_amp_and_channels_last(core, tmp_path):
    settings = {**TINY, **CORES[core], "amp": True, "channels_last": True, "dropout": 0.2}
    if core == "deq":
        settings.update(jac_reg_weight=0.5, jac_reg_freq=0.5)
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        m = run({**settings, "seed": seed, "out": str(tmp_path / name)})
        runs.append((m, _weights(tmp_path / name)))
    (ma, wa), (mb, wb), (_, wc) = runs
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed does reach the weights
    timing = ("epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb")
    assert {k: v for k, v in ma.items() if k not in timing} == \
        {k: v for k, v in mb.items() if k not in timing}


def test_compile_wraps_the_trained_model_without_donated_buffers(monkeypatch, tmp_path):
    # --compile hands the model to torch.compile (stubbed here: a real compile takes a minute
    # on this CPU) with torch._functorch.config.donated_buffer off, restored afterwards
    import torch._functorch.config as fconfig

    calls = []

    def fake_compile(model, *args, **kwargs):
        calls.append((type(model).__name__, getattr(fconfig, "donated_buffer", None), args,
                      kwargs))
        return model

    before = getattr(fconfig, "donated_buffer", None)  # (torch 2.4 has no such flag)
    monkeypatch.setattr(torch, "compile", fake_compile)
    run({**TINY, "model": "test_deq", "compile": True, "out": str(tmp_path / "c")})
    assert calls == [("ImplicitClassifier", None if before is None else False, (), {})]
    assert getattr(fconfig, "donated_buffer", None) == before
    calls.clear()
    run({**TINY, "model": "test_deq", "out": str(tmp_path / "n")})
    assert calls == []


def test_threads_option_sets_and_records_one_thread(tmp_path, monkeypatch):
    seen = []
    real = train_mod._Trainer._train_epoch

    def spy(self, epoch):
        seen.append(torch.get_num_threads())
        return real(self, epoch)

    monkeypatch.setattr(train_mod._Trainer, "_train_epoch", spy)
    torch.set_num_threads(2)
    try:
        run({**TINY, "model": "test_wt", "threads": 1, "out": str(tmp_path / "r")})
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
    assert seen == [1]
    env = json.loads((tmp_path / "r" / "config.json").read_text())["env"]
    assert env["threads"] == 1


@pytest.mark.parametrize("core,extra", [
    ("deq", {}),                                  # the solver hands the cell NCHW iterates
    ("ode_fixed", {"mask_k": 2, "amp": True}),    # the second segment starts from a stack slice
])
def test_channels_last_survives_weight_norm(core, extra):
    # weight norm forms its kernel g v / ||v|| in the default layout, so a convolution whose
    # input is NCHW too ran NCHW: with --channels-last --weight-norm the DEQ's convolutions
    # inside the solve (54 of 57) and the ODE's second masked segment ran in NCHW
    settings = {**CORES[core], **extra, "channels_last": True, "weight_norm": True}
    seen = _conv_outputs(settings)
    dtype = torch.bfloat16 if extra.get("amp") else torch.float32
    assert set(seen) == {(dtype, True)}, seen
