"""Thread, workspace and dtype robustness, against closed forms.

- ``wt.solve`` / ``wt.DEQ`` run concurrently in several Python threads (each keeps its own CPU
  history buffers) give, bit for bit, what the same solve gives alone, and that is the linear
  map's closed-form fixed point / implicit gradient;
- the kept buffers do not accumulate over many solves of varying shapes, die with their thread,
  ``clear_workspace`` frees them, and a result never aliases them;
- a tiny model in float64 agrees with float32 to float32 precision; bf16 / autocast outputs are
  finite and bf16; masks stay bool under ``.double()`` / ``.to(bf16)`` / ``.type()``;
  ``torch.inference_mode`` gives what ``torch.no_grad`` gives.
"""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch

import wtmodels as wt
from wtmodels.solvers import clear_workspace, common

F64 = torch.float64
SOLVERS = ("fixed_point", "anderson", "broyden")


def _linear(seed, b, d, dtype=torch.float32, rho=0.6):
    """``z = A z + c``, ``||A||_2 = rho``: fixed point ``(I - A)^-1 c`` (computed in float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    a *= rho / torch.linalg.matrix_norm(a, ord=2)
    c = torch.randn(b, d, generator=g, dtype=F64)
    exact = torch.linalg.solve(torch.eye(d, dtype=F64) - a, c.T).T
    a_, c_ = a.to(dtype), c.to(dtype)
    return (lambda z: z @ a_.T + c_), torch.zeros(b, d, dtype=dtype), exact


def _run_threads(target, n):
    out, errors = {}, []

    def wrap(i):
        try:
            out[i] = target(i)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


# (seed, batch, dim, method, dtype): different shapes, solvers and dtypes in each thread
JOBS = [(0, 4, 8, "anderson", torch.float32), (1, 4, 8, "anderson", torch.float32),
        (2, 7, 13, "broyden", F64), (3, 5, 8, "fixed_point", torch.float32)]


def _solve_job(i, repeats=6):
    seed, b, d, method, dtype = JOBS[i]
    f, z0, _ = _linear(seed, b, d, dtype)
    return [wt.solve(f, z0, method=method, tol=1e-10 if dtype == F64 else 1e-6, max_iter=80)[0]
            for _ in range(repeats)]


def test_concurrent_solves_equal_the_lone_solve_bit_for_bit_and_the_closed_form():
    alone = {i: _solve_job(i, repeats=1)[0] for i in range(len(JOBS))}
    for i, (seed, b, d, _, dtype) in enumerate(JOBS):
        exact = _linear(seed, b, d, dtype)[2]
        tol = 1e-8 if dtype == F64 else 1e-5
        assert (alone[i].double() - exact).abs().max() < tol * max(1.0, exact.abs().max())
    for _ in range(2):
        results = _run_threads(_solve_job, len(JOBS))
        for i, zs in results.items():
            for z in zs:
                assert torch.equal(z, alone[i]), JOBS[i]


def test_a_result_is_not_overwritten_by_the_next_solve_of_the_same_shape():
    for method in SOLVERS:
        f1, z0, exact1 = _linear(0, 4, 8)
        z1, s1 = wt.solve(f1, z0, method=method, tol=1e-6, max_iter=80)
        nstep, trace = s1.nstep.clone(), s1.rel_trace.clone()
        f2, z0, _ = _linear(1, 4, 8)
        wt.solve(f2, z0, method=method, tol=1e-6, max_iter=80)
        assert (z1.double() - exact1).abs().max() < 1e-5, method
        assert torch.equal(s1.nstep, nstep) and torch.equal(s1.rel_trace, trace), method


def _kept():
    return {k: (b.shape, b.dtype) for k, (b, _) in getattr(common._local, "buffers", {}).items()}


def test_workspace_holds_only_the_latest_shapes_and_clear_workspace_frees_them():
    clear_workspace()
    shapes = [(1, 5), (3, 30), (16, 12), (2, 64), (8, 5)]
    last = {}
    for k in range(60):  # varying batch sizes and sizes, every solver
        b, d = shapes[k % len(shapes)]
        method = SOLVERS[k % 3]
        f, z0, exact = _linear(k, b, d)
        z, _ = wt.solve(f, z0, method=method, tol=1e-6, max_iter=60)
        assert (z.double() - exact).abs().max() < 1e-4
        last[method] = (b, d)
    kept = _kept()
    # a lone solve per method of its last shape keeps exactly these buffers: nothing accumulates
    clear_workspace()
    for method, (b, d) in last.items():
        f, z0, _ = _linear(0, b, d)
        wt.solve(f, z0, method=method, tol=1e-6, max_iter=60)
    assert _kept() == kept and len(kept) > 0
    refs = [weakref.ref(buf) for buf, _ in common._local.buffers.values()]
    clear_workspace()
    gc.collect()
    assert _kept() == {} and all(r() is None for r in refs)


def test_a_finished_threads_buffers_are_freed_and_never_seen_by_another_thread():
    clear_workspace()
    refs = []

    def job(i):
        f, z0, _ = _linear(i, 4, 8)
        wt.solve(f, z0, method="anderson", tol=1e-6)
        refs.extend(weakref.ref(b) for b, _ in common._local.buffers.values())
        return True

    _run_threads(job, 3)
    gc.collect()
    assert len(refs) > 0 and all(r() is None for r in refs)
    assert _kept() == {}  # the main thread's workspace is its own


def _deq_job(i, repeats=3):
    """A linear DEQ ``z = z W^T + x``: ``dL/dW = u z*^T`` with ``u = (I - W)^-T c``."""
    grad = ("ift", "phantom", "unroll")[i % 3]
    g = torch.Generator().manual_seed(10 + i)
    w = torch.randn(6, 6, generator=g, dtype=F64)
    w = (w * 0.5 / torch.linalg.matrix_norm(w, ord=2)).requires_grad_(True)
    x = torch.randn(3 + i, 6, generator=g, dtype=F64)
    c = torch.randn(3 + i, 6, generator=g, dtype=F64)
    deq = wt.DEQ(f_solver="anderson", f_max_iter=100, f_tol=1e-12, b_solver="broyden",
                 b_max_iter=100, b_tol=1e-12, grad=grad, phantom_steps=60, stop_mode="abs")
    out = []
    for _ in range(repeats):
        w.grad = None
        z, _ = deq(lambda z: z @ w.T + x, torch.zeros_like(x))
        (z * c).sum().backward()
        out.append((z.detach(), w.grad.clone()))
    eye = torch.eye(6, dtype=F64)
    wd = w.detach()
    z_exact = torch.linalg.solve(eye - wd, x.T).T
    u = torch.linalg.solve((eye - wd).T, c.T).T
    return out, z_exact, u.T @ z_exact


def test_concurrent_deqs_equal_the_lone_deq_bit_for_bit_and_the_implicit_gradient():
    alone = {i: _deq_job(i, repeats=1)[0][0] for i in range(3)}
    results = _run_threads(_deq_job, 3)
    for i, (runs, z_exact, g_exact) in results.items():
        for z, g in runs:
            assert torch.equal(z, alone[i][0]) and torch.equal(g, alone[i][1]), i
        torch.testing.assert_close(alone[i][0], z_exact, rtol=0, atol=1e-9)
        torch.testing.assert_close(alone[i][1], g_exact, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["test_wt", "test_deq", "test_untied"])
def test_model_dtypes_masks_and_inference_modes(name):
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=3, num_classes=4, mask_k=2).eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        y32 = model(x)
    y64 = copy.deepcopy(model).double()(x.double()).detach()
    assert y64.dtype == F64
    # float64 is the oracle for float32: the same model, agreeing to float32 precision
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-5 * max(1.0, y64.abs().max()))
    with torch.inference_mode():
        assert torch.equal(model(x), y32)
    with torch.no_grad():
        ycl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(ycl.double(), y64, rtol=0, atol=1e-5 * max(1.0, y64.abs().max()))
    bf = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        yb = bf(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ya = model(x)
    for y in (yb, ya):
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert (y.double() - y64).abs().max() < 0.05 * max(1.0, y64.abs().max())
    for m in (model, copy.deepcopy(model).double(), bf, copy.deepcopy(model).type(F64)):
        masks = [b for n, b in m.named_buffers() if n.endswith("weight_masks")]
        assert masks and all(b.dtype == torch.bool for b in masks), name
