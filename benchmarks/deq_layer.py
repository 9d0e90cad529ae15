"""DEQ layer benchmark: one training step (forward solve + implicit backward), ours vs torchdeq.

Where ``benchmarks/solvers.py`` times forward solves only, this times what a DEQ training step
costs, checks how accurate its gradient is, and whether its memory stays flat as the solver's
budget grows. On the same conv DEQ cells (``relu(GroupNorm(conv3x3(z) + x))``, conv weights
``N(0, gain^2 / (9 C))``: :class:`benchmarks.solvers.ConvCell`), for each implementation

- ours: ``wt.DEQ(f_solver=s, b_solver=s, f_max_iter, f_tol, b_max_iter, b_tol, grad="ift",
  stop_mode="rel")``;
- torchdeq: ``get_deq(core="sliced", ift=True, f_solver=s, b_solver=s, f_max_iter, f_tol,
  b_max_iter, b_tol, f_stop_mode="rel", b_stop_mode="rel")`` (every setting is read back from
  the built module and its backward closure, see :func:`torchdeq_layer`: torchdeq ignores
  unknown keywords without a word, ``stop_mode="rel"`` among them),

with ``s`` in ``anderson``, ``broyden`` and the same settings for both libraries, it measures:

- ``step_ms`` (``fwd_ms`` + ``bwd_ms``): wall time of ``z* = deq(f, z0)`` and of
  ``sum(z* * w).backward()`` (fixed random ``w``), medians over interleaved repeats;
- ``f_evals`` / ``bwd_f_evals``: calls of ``f`` in the forward (the solve and the output
  ``f(z*)``) and in the backward (torchdeq evaluates ``f`` again there); ``vjps``: backward
  passes through an output of ``f`` (the adjoint solver's vector-Jacobian products plus the
  one that carries the gradient to the parameters), counted by a hook on every output of ``f``;
- ``fwd_res``: the largest per-sample relative residual ``||f(z*) - z*|| / ||f(z*)||`` of the
  returned ``z*``, measured here the same way for both; ``z_err``: ``||z* - z*_ref|| /
  ||z*_ref||``; ``relu_flips``: ReLU units on at the returned ``z*`` and off at the
  reference's, or the reverse (the gradient jumps there: the main source of gradient error at
  ``f_tol`` 1e-4);
- ``dW_err`` / ``dW_cos`` and ``dx_err`` / ``dx_cos``: relative error ``||g - g_ref|| /
  ||g_ref||`` and cosine similarity of the conv weight's gradient and of ``dL/dx`` against the
  reference;
- memory: peak allocated memory of one forward + backward (``peak_memory_bytes`` of
  solvers.py) at ``f_max_iter`` 10, 20, 40 with tolerances no solve reaches (``1e-30``: the
  whole budget is used, as in solvers.py's IFT memory check), on the B32 C32 H16 cell. Our
  solvers keep their CPU history buffers between solves (``clear_workspace``); they are
  released before each measured step, so both libraries' solver histories are in the peak.

The reference (:func:`reference_gradients`) is computed independently of both libraries, in
float64 on a float64 copy of the cell: ``z*`` by plain fixed-point iteration ``z <- f(z)`` until
every sample's relative step is ``<= 1e-12``, then the adjoint ``u = J^T u + w`` (``J = df/dz``
at ``z*``) by plain iteration with ``torch.autograd`` vector-Jacobian products to the same
tolerance, and the gradients as ``(df/dtheta)^T u``. Plain iteration converges where ``f`` is
contractive at ``z*`` (the default cells' Jacobians have spectral radius ~0.7-0.85); where it
does not the accuracy columns read NaN.

Run: ``python -m benchmarks.deq_layer [--quick] [--threads 2] [--repeats 5] [--device cpu|cuda]
[--f-max-iter 30] [--f-tol 1e-4] [--b-max-iter 30] [--b-tol 1e-6] [--solvers anderson,broyden]
[--out DIR]``. ``--quick`` runs one tiny cell with two repeats (seconds).
Writes ``DIR/deq_layer.csv``, ``DIR/deq_layer_memory.csv`` and ``DIR/deq_layer.md``
(``--quick``: ``deq_layer_quick*``; ``--tag T``: ``deq_layer_T*``), each with provenance as in
solvers.py. Without torchdeq installed it runs ours alone and says so.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import wtmodels as wt
from benchmarks.provenance import (
    describe_machine,
    git_sha,
    make_out_dir,
    package_version,
    threads_error,
)
from benchmarks.solvers import (
    ConvCell,
    Counted,
    _Parser,
    peak_memory_bytes,
    say,
    to_csv,
    torchdeq_missing,
    tune_malloc,
)
from wtmodels.atomic import atomic_write_text
from wtmodels.cli import exit_with
from wtmodels.solvers import clear_workspace

SOLVERS = ("anderson", "broyden")
FULL_CELLS = [(32, 16, 8), (32, 32, 16), (64, 64, 16)]
QUICK_CELLS = [(4, 8, 8)]
MEMORY_CELL, QUICK_MEMORY_CELL = (32, 32, 16), (4, 8, 8)
MEMORY_BUDGETS, QUICK_MEMORY_BUDGETS = (10, 20, 40), (10, 40)
MAX_ITER = 1000  # --f-max-iter / --b-max-iter bound (torchdeq's Broyden: max_iter secant pairs)
REF_TOL = 1e-12


@dataclass(frozen=True)
class Settings:
    """The DEQ settings both libraries get (stop mode relative, for both solves).

    Example:
        >>> Settings(f_max_iter=10)
        Settings(f_max_iter=10, f_tol=0.0001, b_max_iter=30, b_tol=1e-06)
    """

    f_max_iter: int = 30
    f_tol: float = 1e-4
    b_max_iter: int = 30
    b_tol: float = 1e-6


class CountedVJP(Counted):
    """``f`` with counters: ``calls`` (as :class:`benchmarks.solvers.Counted`) and ``vjps``,
    the backward passes through any output of ``f`` (a hook on each output that requires
    grad: it fires in ``autograd.grad`` calls and in ``.backward()`` alike).

    Example:
        >>> f = CountedVJP(lambda z: 2 * z)
        >>> z = torch.ones(3, requires_grad=True)
        >>> out = f(z)
        >>> _ = torch.autograd.grad(out, z, torch.ones(3), retain_graph=True)
        >>> out.sum().backward()
        >>> f.calls, f.vjps
        (1, 2)
    """

    def __init__(self, f):
        super().__init__(f)
        self.vjps = 0

    def __call__(self, z):
        out = super().__call__(z)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.vjps += 1

    def reset(self) -> None:
        self.calls = self.vjps = 0


@dataclass
class Reference:
    """The float64 reference: fixed point ``z`` ``(B, ...)``, ``grads`` of ``sum(z * w)`` (one
    per input, ``None`` where it does not reach one), plain-iteration counts of each solve.

    Example (:func:`reference_gradients` of ``z = z / 2 + b``: ``z* = 2 b``, ``dL/db = 2 w``):
        >>> b = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
        >>> ref = reference_gradients(lambda z: z / 2 + b, torch.zeros(1, 1, dtype=torch.float64),
        ...                           [b], torch.full((1, 1), 3.0, dtype=torch.float64))
        >>> round(ref.z.item(), 9), round(ref.grads[0].item(), 9), ref.active
        (2.0, 6.0, None)
    """

    z: torch.Tensor
    grads: tuple
    fwd_iters: int
    bwd_iters: int
    active: torch.Tensor | None = None  # set by cell_reference: the ReLU units on at z*


def _worst_rel_step(new: torch.Tensor, old: torch.Tensor) -> float:
    """The largest per-sample ``||new - old|| / ||new||`` (0/0 reads 0)."""
    B = new.shape[0]
    diff = (new - old).reshape(B, -1).norm(dim=1)
    norm = new.reshape(B, -1).norm(dim=1)
    return float(torch.where(diff == 0, 0.0, diff / norm).max())


def _plain_iteration(g, start: torch.Tensor, tol: float, max_iter: int, what: str,
                     hint: str = "") -> tuple[torch.Tensor, int]:
    """``x <- g(x)`` from ``start`` until every sample's relative step is ``<= tol``; returns
    ``(x, iterations)``, ``RuntimeError`` (naming ``what``) after ``max_iter``."""
    x, iters, step = start, 0, math.inf
    while not step <= tol:  # (a NaN step is no convergence)
        if iters == max_iter:
            raise RuntimeError(f"reference: plain iteration of {what} reached a relative step "
                               f"of {step:.3g}, not {tol:g}, in {max_iter} steps{hint}")
        x_new = g(x)
        step, x, iters = _worst_rel_step(x_new, x), x_new, iters + 1
    return x, iters


def reference_gradients(f, z0: torch.Tensor, inputs, w: torch.Tensor, tol: float = REF_TOL,
                        max_iter: int = 20_000) -> Reference:
    """Fixed point and gradients of ``L = sum(z* * w)`` by plain iteration, independent of any
    DEQ library.

    ``z* = f(z*)`` by ``z <- f(z)`` from ``z0`` until every sample's relative step
    ``||f(z) - z|| / ||f(z)||`` is ``<= tol``; then the adjoint ``u = J^T u + w`` (``J = df/dz``
    at ``z*``) by ``u <- vjp(u) + w`` from ``u = w`` to the same tolerance, and
    ``dL/dinput = (df/dinput)^T u`` for each of ``inputs`` (tensors ``f`` closes over, requiring
    grad). Run it in float64 (``f``, ``z0`` and ``w`` of that dtype) for a reference. Raises
    ``RuntimeError`` where either iteration does not reach ``tol`` within ``max_iter`` (``f``
    not contractive at ``z*``).

    Args:
        f: ``(B, ...) -> (B, ...)``, samples independent.
        z0: ``(B, ...)`` start.
        inputs: tensors to differentiate with respect to.
        w: ``(B, ...)`` weights of the loss.

    Example (``z = A z + b``: ``dL/db = (I - A)^-T w``):
        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
        >>> w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
        >>> ref = reference_gradients(lambda z: z @ A.T + b, torch.zeros(1, 2, dtype=torch.float64),
        ...                           [b], w)
        >>> exact = torch.linalg.solve((torch.eye(2, dtype=torch.float64) - A).T, w[0])
        >>> bool(torch.allclose(ref.grads[0][0], exact, rtol=1e-10, atol=0))
        True
    """
    with torch.no_grad():
        z, fwd_iters = _plain_iteration(f, z0, tol, max_iter, "z = f(z)",
                                        " (f not contractive at z*?)")
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        out = f(z_in)
        u, bwd_iters = _plain_iteration(
            lambda u: torch.autograd.grad(out, z_in, u, retain_graph=True)[0] + w, w, tol,
            max_iter, "u = J^T u + w")
        grads = torch.autograd.grad(out, list(inputs), u, allow_unused=True)
    return Reference(z.detach(), tuple(None if g is None else g.detach() for g in grads),
                     fwd_iters, bwd_iters)


def grad_error(g: torch.Tensor | None, ref: torch.Tensor | None) -> tuple[float, float]:
    """``(||g - ref|| / ||ref||, cos(g, ref))`` over the whole tensors, in float64; NaN where
    either is missing.

    Example:
        >>> grad_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))  # doctest: +ELLIPSIS
        (0.7071..., 0.7071...)
    """
    if g is None or ref is None:
        return math.nan, math.nan
    g, ref = g.detach().double().flatten(), ref.detach().double().flatten().to(g.device)
    err = float((g - ref).norm() / ref.norm())
    cos = float(g @ ref / (g.norm() * ref.norm()))
    return err, cos


def torchdeq_layer(solver: str, s: Settings):
    """torchdeq's DEQ layer with ``s`` and IFT, every setting checked where torchdeq uses it.

    ``get_deq`` takes any keyword and ignores the ones it does not know (``stop_mode="rel"``
    leaves both stop modes at ``"abs"``; without ``ift=True`` the "gradient" is one unrolled
    step and ``b_*`` go unused): the forward settings are read back from the module and the
    backward solver's keywords from the IFT function's closure; ``RuntimeError`` if any differs.
    Returns ``layer(f, z0) -> z*``.

    Example:
        >>> if torchdeq_missing() is None:  # (torchdeq installed)
        ...     layer = torchdeq_layer("anderson", Settings(f_max_iter=5))
    """
    import inspect

    from torchdeq import get_deq
    from torchdeq.solver import get_solver as torchdeq_solver

    deq = get_deq(core="sliced", ift=True, f_solver=solver, b_solver=solver,
                  f_max_iter=s.f_max_iter, f_tol=s.f_tol, b_max_iter=s.b_max_iter,
                  b_tol=s.b_tol, f_stop_mode="rel", b_stop_mode="rel")
    got = {"f_solver": deq.f_solver, "b_solver": deq.b_solver, "f_max_iter": deq.f_max_iter,
           "f_tol": deq.f_tol, "f_stop_mode": deq.f_stop_mode, "indexing": deq.indexing,
           "n_grad_fns": len(deq.produce_grad), "grad_fn": deq.produce_grad[-1].__name__}
    want = {"f_solver": torchdeq_solver(solver), "b_solver": torchdeq_solver(solver),
            "f_max_iter": s.f_max_iter, "f_tol": s.f_tol, "f_stop_mode": "rel",
            "indexing": [s.f_max_iter], "n_grad_fns": 1, "grad_fn": "func_ift"}
    try:  # the backward solver's own call: IFTGrad.backward's closure
        ift_grad = inspect.getclosurevars(deq.produce_grad[-1]).nonlocals["IFTGrad"]
        backward = inspect.getclosurevars(ift_grad.backward).nonlocals
        got["b_solver_fn"], got["b_kwargs"] = backward["b_solver"], backward["b_solver_kwargs"]
    except (KeyError, TypeError) as err:
        raise RuntimeError(f"torchdeq {package_version('torchdeq')}: cannot read its IFT "
                           f"backward's settings ({err!r}); the benchmark knows 0.1.0") from err
    want["b_solver_fn"] = torchdeq_solver(solver)
    want["b_kwargs"] = {"max_iter": s.b_max_iter, "tol": s.b_tol, "stop_mode": "rel"}
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if wrong:
        raise RuntimeError(f"torchdeq did not take these settings (got, wanted): {wrong}")
    deq.train()  # torchdeq differentiates in training mode only (eval: no gradient function)

    def layer(f, z0):
        z_out, _ = deq(f, z0)
        return z_out[-1]
    return layer


def ours_layer(solver: str, s: Settings):
    """Our ``wt.DEQ`` with ``s``, IFT and relative stop mode; returns ``layer(f, z0) -> z*``.

    Example:
        >>> layer = ours_layer("anderson", Settings(f_max_iter=20, f_tol=1e-6))
        >>> A = torch.full((2, 2), 0.25, requires_grad=True)
        >>> z = layer(lambda z: z @ A.T + 1.0, torch.zeros(1, 2))  # z* = 2: (I - A) z = 1
        >>> bool(torch.allclose(z, torch.full((1, 2), 2.0), atol=1e-4))
        True
    """
    deq = wt.DEQ(f_solver=solver, b_solver=solver, f_max_iter=s.f_max_iter, f_tol=s.f_tol,
                 b_max_iter=s.b_max_iter, b_tol=s.b_tol, grad="ift", stop_mode="rel")

    def layer(f, z0):
        return deq(f, z0)[0]
    return layer


def layer_table(solvers, s: Settings) -> dict:
    """``(impl, solver) -> layer(f, z0)``: ours for each solver, torchdeq's where it is installed
    (see :func:`benchmarks.solvers.torchdeq_missing`).

    Example:
        >>> sorted(layer_table(["anderson"], Settings()))[-1]
        ('wtmodels', 'anderson')
    """
    table = {("wtmodels", name): ours_layer(name, s) for name in solvers}
    if torchdeq_missing() is None:
        table.update({("torchdeq", name): torchdeq_layer(name, s) for name in solvers})
    return table


def _cell_problem(B: int, C: int, H: int, gain: float, device: str):
    """The cell, its input ``x`` (requiring grad), the loss weights ``w`` and ``z0``."""
    torch.manual_seed(0)
    cell = ConvCell(C, gain).to(device)
    x = torch.randn(B, C, H, H, device=device).requires_grad_()  # (B, C, H, H)
    w = torch.randn(B, C, H, H, device=device)  # the loss sum(z* * w)
    z0 = torch.zeros(B, C, H, H, device=device)
    return cell, x, w, z0


def cell_reference(cell, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> Reference | None:
    """:func:`reference_gradients` of the cell in float64 for ``(conv weight, x)``, with
    ``active``: the ReLU units on at ``z*`` (bool, ``(B, C, H, W)``); None where plain iteration
    does not converge.

    Example (``z*`` is a fixed point of the cell to float64 precision):
        >>> cell, x, w, z0 = _cell_problem(1, 4, 4, 0.5, "cpu")
        >>> ref = cell_reference(cell, x, w, z0)
        >>> tuple(ref.active.shape), ref.active.dtype, [tuple(g.shape) for g in ref.grads]
        ((1, 4, 4, 4), torch.bool, [(4, 4, 3, 3), (1, 4, 4, 4)])
        >>> cell64 = copy.deepcopy(cell).double()
        >>> float((cell64(ref.z, x.detach().double()) - ref.z).abs().max().detach()) < 1e-10
        True
    """
    cell64 = copy.deepcopy(cell).double()
    x64 = x.detach().double().requires_grad_()
    try:
        ref = reference_gradients(lambda z: cell64(z, x64), z0.double(),
                                  [cell64.conv.weight, x64], w.double())
    except RuntimeError as err:
        print(f"note: {err}; this cell's accuracy columns read NaN", file=sys.stderr)
        return None
    with torch.no_grad():
        ref.active = cell64.norm(cell64.conv(ref.z) + x64) > 0
    return ref


def bench_cell(B: int, C: int, H: int, solvers, repeats: int, s: Settings, gain: float = 1.25,
               device: str = "cpu") -> list[dict]:
    """One row per implementation and solver on one cell: counts and accuracy from one step
    (after a warm-up step), times as medians over ``repeats`` interleaved steps.

    Example:
        >>> rows = bench_cell(2, 4, 4, ["anderson"], 1, Settings(f_max_iter=10))
        >>> row = next(r for r in rows if r["impl"] == "wtmodels")
        >>> row["f_evals"] <= 11 and row["dx_cos"] > 0.99
        True
    """
    cell, x, w, z0 = _cell_problem(B, C, H, gain, device)
    ref = cell_reference(cell, x, w, z0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    f = CountedVJP(lambda z: cell(z, x))
    layers = layer_table(solvers, s)

    def step(layer):
        cell.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        t0 = time.perf_counter()
        z = layer(f, z0)
        sync()
        t1 = time.perf_counter()
        calls = f.calls
        (z * w).sum().backward()
        sync()
        return z, t1 - t0, time.perf_counter() - t1, calls

    rows = {}
    for key, layer in layers.items():
        step(layer)  # warm-up: allocator, kernels, buffers
        f.reset()
        z, _, _, fwd_calls = step(layer)
        with torch.no_grad():
            fz = cell(z, x)
            B_ = z.shape[0]
            res = ((fz - z).reshape(B_, -1).norm(dim=1) / (fz.reshape(B_, -1).norm(dim=1) + 1e-30))
        dW = grad_error(cell.conv.weight.grad, ref.grads[0] if ref else None)
        dx = grad_error(x.grad, ref.grads[1] if ref else None)
        z_err = (float((z.detach().double() - ref.z).norm() / ref.z.norm()) if ref
                 else math.nan)
        # z* = relu(pre(z_sol)): a unit on at the solver's iterate where it is off at the exact
        # z* (or the reverse) puts a piece of another Jacobian into the gradient
        flips = (int(((z.detach() > 0) != ref.active.to(z.device)).sum()) if ref
                 else math.nan)  # no reference: unknown, like the accuracy columns
        rows[key] = {"B": B, "C": C, "H": H, "impl": key[0], "solver": key[1],
                     "f_evals": fwd_calls, "bwd_f_evals": f.calls - fwd_calls, "vjps": f.vjps,
                     "fwd_res": float(res.max()), "z_err": z_err, "relu_flips": flips,
                     "dW_err": dW[0], "dW_cos": dW[1], "dx_err": dx[0], "dx_cos": dx[1]}
    times = {key: [] for key in layers}
    for rep in range(repeats):
        order = list(layers.items())
        if rep % 2:
            order.reverse()  # interleave: no implementation always runs first
        for key, layer in order:
            _, t_fwd, t_bwd, _ = step(layer)
            times[key].append((t_fwd, t_bwd))
    for key, t in times.items():
        rows[key].update({
            "step_ms": round(1e3 * statistics.median(a + b for a, b in t), 2),
            "fwd_ms": round(1e3 * statistics.median(a for a, _ in t), 2),
            "bwd_ms": round(1e3 * statistics.median(b for _, b in t), 2)})
    order = ["B", "C", "H", "impl", "solver", "step_ms", "fwd_ms", "bwd_ms", "f_evals",
             "bwd_f_evals", "vjps", "fwd_res", "z_err", "relu_flips", "dW_err", "dW_cos", "dx_err",
             "dx_cos"]
    extra = {"ref_fwd_iters": ref.fwd_iters if ref else -1,
             "ref_bwd_iters": ref.bwd_iters if ref else -1}
    return [{**{k: r[k] for k in order}, **extra} for r in rows.values()]


def memory_check(solvers, budgets, b_max_iter: int, cell_shape=MEMORY_CELL, gain: float = 1.25,
                 device: str = "cpu") -> list[dict]:
    """Peak memory of one forward + backward per implementation, solver and ``f_max_iter`` in
    ``budgets``, with tolerances no solve reaches (the whole budget is used; ``f_calls``, the
    calls of ``f`` in forward and backward, shows it). Our solvers' kept CPU history buffers
    are released before each measured step.

    Example:
        >>> rows = memory_check(["anderson"], [5], 5, (2, 4, 4))
        >>> [(r["f_max_iter"], r["f_calls"] >= 5, r["peak_mb"] > 0) for r in rows][-1]
        (5, True, True)
    """
    B, C, H = cell_shape
    cell, x, w, z0 = _cell_problem(B, C, H, gain, device)
    f = CountedVJP(lambda z: cell(z, x))
    rows = []
    for budget in budgets:
        s = Settings(f_max_iter=budget, f_tol=1e-30, b_max_iter=b_max_iter, b_tol=1e-30)
        for (impl, solver), layer in layer_table(solvers, s).items():
            def step(layer=layer):
                cell.zero_grad(set_to_none=True)
                x.grad = None
                z = layer(f, z0)
                (z * w).sum().backward()

            step()  # warm-up
            clear_workspace()
            cell.zero_grad(set_to_none=True)
            x.grad = None
            f.reset()
            peak = peak_memory_bytes(step, device)
            rows.append({"impl": impl, "solver": solver, "f_max_iter": budget,
                         "b_max_iter": b_max_iter, "B": B, "C": C, "H": H,
                         "f_calls": f.calls, "vjps": f.vjps, "peak_mb": round(peak / 2**20, 2)})
    clear_workspace()
    return rows


def _fmt(key: str, v) -> str:
    """One table cell: times to 0.01 ms, residuals and errors to 3 digits, cosines to 1e-8."""
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "nan"
    if key.endswith("_ms"):
        return f"{v:.2f}"
    if key.endswith("_cos"):
        return f"{v:.8f}"
    return f"{v:.2e}"


def markdown(rows: list[dict], mem: list[dict], prov: dict, args) -> str:
    """The results as Markdown tables, with provenance, settings and memory growth.

    Example (one hand-made row, no memory rows):
        >>> prov = {"git_sha": "abc1234", "torch_version": "2.4", "torchdeq_version": "0.1",
        ...         "device": "cpu", "threads": 2, "date": "2024-01-01",
        ...         "load_average_1min": 0.5, "cpu_count": 4, "cpu_model": "x86", "malloc": "tuned"}
        >>> row = {"B": 4, "C": 8, "H": 8, "impl": "wtmodels", "solver": "anderson",
        ...        "step_ms": 12.5, "fwd_ms": 8.25, "bwd_ms": 4.25, "f_evals": 11,
        ...        "bwd_f_evals": 0, "vjps": 9, "fwd_res": 5e-5, "z_err": 1e-4, "relu_flips": 0,
        ...        "dW_err": 2e-4, "dW_cos": 0.99999999, "dx_err": float("nan"), "dx_cos": 1.0}
        >>> md = markdown([row], [], prov, parse_args(["--quick"]))
        >>> print(md.splitlines()[-1])  # doctest: +NORMALIZE_WHITESPACE
        | 4 | 8 | 8 | wtmodels | anderson | 12.50 | 8.25 | 4.25 | 11 | 0 | 9 | 5.00e-05 |
        1.00e-04 | 0 | 2.00e-04 | 0.99999999 | nan | 1.00000000 |
    """
    missing = torchdeq_missing()
    lines = [
        "# DEQ layer benchmark (benchmarks/deq_layer.py)", "",
        f"Provenance: git `{prov['git_sha']}`, torch {prov['torch_version']}, torchdeq "
        f"{prov['torchdeq_version']}, device {prov['device']}, threads {prov['threads']}, "
        f"{prov['date']}, load average {prov['load_average_1min']} on {prov['cpu_count']} CPUs "
        f"({prov['cpu_model']}), glibc malloc {prov['malloc']}.", "",
        *([f"**Warning**: the load average ({prov['load_average_1min']}) exceeds the CPU count: "
           "other processes dominate these timings; compare ratios within this run only.", ""]
          if (prov["load_average_1min"] or 0) > prov["cpu_count"] else []),
        *([f"**No torchdeq comparison**: {missing}.", ""] if missing else []),
        f"One training step `z* = deq(f, z0)`, `sum(z* * w).backward()` on cells "
        f"`relu(GroupNorm(conv3x3(z) + x))`, gain {args.gain}; both libraries with f_max_iter "
        f"{args.f_max_iter}, f_tol {args.f_tol}, b_max_iter {args.b_max_iter}, b_tol "
        f"{args.b_tol}, relative stop mode for both solves, implicit (IFT) backward, each "
        "solver's other options at its library's defaults; torchdeq as `get_deq(core='sliced', "
        "ift=True, f_stop_mode='rel', b_stop_mode='rel', ...)`, every setting read back from the "
        f"built module. {args.repeats} interleaved repeats, medians.", "",
        "f-evals: calls of f in the forward (solve + the output f(z*)); bwd f: calls of f in "
        "the backward; VJPs: backward passes through an output of f (the adjoint solve's plus "
        "the one to the parameters). fwd res: largest per-sample ||f(z*) - z*|| / ||f(z*)|| of "
        "the returned z*. Errors against a float64 reference (plain fixed-point iteration to a "
        f"relative step of {REF_TOL:g} for z*, then the adjoint u = J^T u + w by plain iteration "
        "with autograd VJPs to the same tolerance): relative error ||g - g_ref|| / ||g_ref|| "
        "and cosine of the conv weight's gradient (dW) and of dL/dx. ReLU flips: units on at the "
        "returned z* and off at the reference's (or the reverse), over the batch: the gradient "
        "is discontinuous there, so a flip (a pre-activation within the forward error of 0) "
        "puts a piece of another Jacobian into its sample's gradient, whatever the solver.", "",
        "| B | C | H | impl | solver | step ms | fwd ms | bwd ms | f-evals | bwd f | VJPs | "
        "fwd res | z* err | ReLU flips | dW err | dW cos | dx err | dx cos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r[k]) for k in (
            "B", "C", "H", "impl", "solver", "step_ms", "fwd_ms", "bwd_ms", "f_evals",
            "bwd_f_evals", "vjps", "fwd_res", "z_err", "relu_flips", "dW_err", "dW_cos", "dx_err",
            "dx_cos")) + " |")
    if mem:
        B, C, H = mem[0]["B"], mem[0]["C"], mem[0]["H"]
        lines += ["", "## Memory (forward + backward peak)", "",
                  f"Cell B{B} C{C} H{H}; f_tol = b_tol = 1e-30 (never reached: each solve uses "
                  f"its whole budget), b_max_iter {mem[0]['b_max_iter']}. Peak allocated above "
                  "what was allocated before the step (after a warm-up step; our solvers' kept "
                  "history buffers released first, so both libraries' histories count).", "",
                  "| impl | solver | f_max_iter | f calls (fwd + bwd) | VJPs | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            lines.append(f"| {r['impl']} | {r['solver']} | {r['f_max_iter']} | {r['f_calls']} | "
                         f"{r['vjps']} | {r['peak_mb']} |")
        lines += [""]
        for impl, solver in dict.fromkeys((r["impl"], r["solver"]) for r in mem):
            peaks = [r for r in mem if (r["impl"], r["solver"]) == (impl, solver)]
            lo, hi = peaks[0], peaks[-1]
            growth = hi["peak_mb"] / lo["peak_mb"] - 1 if lo["peak_mb"] > 0 else math.inf
            lines.append(f"- {impl} {solver}: peak {lo['peak_mb']} MiB at f_max_iter "
                         f"{lo['f_max_iter']}, {hi['peak_mb']} MiB at {hi['f_max_iter']} "
                         f"({100 * growth:+.1f}%).")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    """The command-line arguments of ``python -m benchmarks.deq_layer``, checked.

    Example (a bad value: one line on stderr, exit status 2):
        >>> args = parse_args(["--quick", "--solvers", "broyden,broyden"])
        >>> args.repeats, args.solvers, args.f_max_iter
        (2, ['broyden'], 30)
        >>> parse_args(["--f-max-iter", "1"])
        Traceback (most recent call last):
            ...
        SystemExit: 2
    """
    p = _Parser(prog="python -m benchmarks.deq_layer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one tiny cell, 2 repeats, memory at f_max_iter 10 and 40 on it "
                        "(full: 3 cells, 5 repeats, memory at 10 / 20 / 40 on B32 C32 H16)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timed steps per implementation (default 5; 2 with --quick)")
    p.add_argument("--solvers", default=",".join(SOLVERS),
                   help=f"comma-separated, forward and backward alike (default "
                        f"{','.join(SOLVERS)})")
    p.add_argument("--f-max-iter", type=int, default=30,
                   help=f"forward iteration budget (default 30; 2 to {MAX_ITER})")
    p.add_argument("--f-tol", type=float, default=1e-4,
                   help="forward relative tolerance (default 1e-4)")
    p.add_argument("--b-max-iter", type=int, default=30,
                   help=f"backward (adjoint) iteration budget (default 30; 2 to {MAX_ITER})")
    p.add_argument("--b-tol", type=float, default=1e-6,
                   help="backward relative tolerance (default 1e-6)")
    p.add_argument("--gain", type=float, default=1.25,
                   help="conv weight scale of the cells (default 1.25)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the csv/md files, created if missing (default "
                        "benchmarks/results)")
    p.add_argument("--tag", default=None,
                   help="output files DIR/deq_layer_TAG*.{csv,md} (default: none; 'quick' "
                        "with --quick)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="tuned: glibc keeps freed memory (benchmarks.solvers.tune_malloc)")
    args = p.parse_args(argv)
    if message := threads_error(args.threads):
        p.error(message)
    names = [n.strip() for n in args.solvers.split(",")]
    bad = [n for n in names if n not in SOLVERS]
    if bad or not names:
        p.error(f"--solvers: unknown solver(s) {bad}; valid: {', '.join(SOLVERS)}")
    args.solvers = list(dict.fromkeys(names))
    for flag in ("f_max_iter", "b_max_iter"):
        if not 2 <= getattr(args, flag) <= MAX_ITER:
            p.error(f"--{flag.replace('_', '-')} must be >= 2 and <= {MAX_ITER}, got "
                    f"{getattr(args, flag)}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    for flag in ("f_tol", "b_tol", "gain"):
        if not 0 < getattr(args, flag) < math.inf:
            p.error(f"--{flag.replace('_', '-')} must be finite and > 0, got "
                    f"{getattr(args, flag)}")
    if not args.out.strip():
        p.error("--out must name a directory (an empty one would write into the current one)")
    if args.tag is not None and not args.tag.replace("_", "").replace("-", "").isalnum():
        p.error(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    return args


def main(argv=None) -> int:
    """``python -m benchmarks.deq_layer``: benchmark, then write the csv / md files; exit status.

    Example (a run takes minutes; bad arguments stop it before any work, with exit status 2):
        >>> try:
        ...     main(["--solvers", "newton"])
        ... except SystemExit as stop:
        ...     print("exit status", stop.code)
        exit status 2
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # before --out is created
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        out = make_out_dir(args.out)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sha = git_sha()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":  # TF32's ~1e-3 precision would swamp the gradient errors
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    missing = torchdeq_missing()
    if missing is not None:
        print(f"note: {missing}", file=sys.stderr, flush=True)
    s = Settings(args.f_max_iter, args.f_tol, args.b_max_iter, args.b_tol)
    rows = []
    for B, C, H in QUICK_CELLS if args.quick else FULL_CELLS:
        cell_rows = bench_cell(B, C, H, args.solvers, args.repeats, s, args.gain, args.device)
        rows += cell_rows
        for r in cell_rows:
            say(f"B={B:3d} C={C:3d} H={H:3d} {r['impl']:8s} {r['solver']:8s} step "
                f"{r['step_ms']:9.2f} ms (fwd {r['fwd_ms']:8.2f} bwd {r['bwd_ms']:8.2f})  "
                f"f {r['f_evals']:3d}+{r['bwd_f_evals']} vjp {r['vjps']:3d}  fwd res "
                f"{r['fwd_res']:.1e}  dW err {r['dW_err']:.1e} cos {r['dW_cos']:.6f}  "
                f"dx err {r['dx_err']:.1e} cos {r['dx_cos']:.6f}")
    mem = memory_check(args.solvers, QUICK_MEMORY_BUDGETS if args.quick else MEMORY_BUDGETS,
                       args.b_max_iter, QUICK_MEMORY_CELL if args.quick else MEMORY_CELL,
                       args.gain, args.device)
    for r in mem:
        say(f"memory {r['impl']:8s} {r['solver']:8s} f_max_iter={r['f_max_iter']:3d} "
            f"f calls {r['f_calls']:3d}  peak {r['peak_mb']:8.2f} MiB")
    machine = describe_machine(sha)
    prov = {"git_sha": machine["git_sha"], "torch_version": torch.__version__,
            "torchdeq_version": package_version("torchdeq") if missing is None else "absent",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "date": machine["date"],
            "load_average_1min": machine["load_average_1min"],
            "cpu_count": machine["cpu_count"], "cpu_model": machine["cpu_model"],
            "malloc": malloc}
    extra = {k: prov[k] for k in ("git_sha", "torch_version", "torchdeq_version", "device",
                                  "threads", "date", "load_average_1min", "cpu_count",
                                  "malloc")}
    settings = {"f_max_iter": args.f_max_iter, "f_tol": args.f_tol,
                "b_max_iter": args.b_max_iter, "b_tol": args.b_tol, "stop_mode": "rel",
                "gain": args.gain, "repeats": args.repeats, "ref_tol": REF_TOL}
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    stem = f"deq_layer_{tag}" if tag else "deq_layer"
    md = markdown(rows, mem, prov, args)
    atomic_write_text(out / f"{stem}.csv", to_csv(rows, {**settings, **extra}))
    atomic_write_text(out / f"{stem}_memory.csv", to_csv(mem, {"gain": args.gain, **extra}))
    atomic_write_text(out / f"{stem}.md", md)
    say(md)
    return 0


if __name__ == "__main__":
    exit_with(main)
