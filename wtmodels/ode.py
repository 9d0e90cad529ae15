"""Continuous-depth core: ``dz/dt = f(z, x) - z`` over ``[0, T]`` with torchdiffeq.

The interval is cut into ``depth`` segments of length ``T / depth``; segment t uses mask
``mask_index(t, depth, K, schedule)`` when the cell is masked (consecutive segments with the same
mask are integrated in one call). Fixed-grid methods (euler, rk4, ...) take steps of
``T / depth``, so with ``method="euler"`` and ``T = depth`` the core computes exactly the
unrolled weight-tied network. Adaptive methods (dopri5, ...) use ``rtol`` / ``atol`` per
sample: a step is accepted when every sample's RMS error ratio is at most 1 (torchdiffeq's
default RMS over the whole batch let an easy batch dilute a hard sample's error, up to
``sqrt(B)``-fold). The step sizes are still shared by the batch, so a sample's output depends
on its batch within the tolerance. With normalisation in the cell (GroupNorm, the default) the
problem itself is ill-conditioned from ``z0 = 0``: the norms see a near-zero input for small t
(a 1e-12 change of ``z0`` moved ``z(T)`` by ~1e-3 at random init), so the tolerance does not
bound the error of ``z(T)`` (``ode_s`` with dopri5: features 8-10% apart at rtol = atol 1e-6
and 1e-9); the network is still a fixed function of the method, steps and tolerance. With
``norm="none"`` the error shrinks with the tolerance.
``set_depth(D')`` integrates over ``[0, T * D' / D]`` with the same segment length.

Example:
    >>> import torch
    >>> from wtmodels.cells import ConvCell
    >>> core = ODECore(ConvCell(8), depth=4, T=1.0, method="rk4")
    >>> z = core(torch.randn(2, 8, 4, 4))
    >>> core.last_stats["nfe"]  # 4 rk4 steps x 4 evaluations
    16.0
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.fixed_adams import AdamsBashforth, AdamsBashforthMoulton
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from wtmodels.cores import (
    Core,
    _check_depth,
    check_cell_output,
    eager_under_compile,
    forward_pass,
    match_layout,
)
from wtmodels.masks import mask_count, mask_index, mask_schedule, set_mask_index

# Under torch.compile the adaptive methods integrate eagerly (a graph break around the whole
# integration): torchdiffeq's Runge-Kutta step slices its stage buffer and then writes into it
# in place, and with the slice the output of a compiled graph the backward pass raised "Output 0
# of Slice is a view and its base ... has been modified inplace" (dopri5, ode_m's method). The
# fixed-grid methods compile.
_odeint_eager = eager_under_compile(odeint)
_odeint_adjoint_eager = eager_under_compile(odeint_adjoint)

# "scipy_solver" needs a backend option of its own; every other torchdiffeq method is offered.
ODE_METHODS = tuple(name for name in SOLVERS if name != "scipy_solver")


def is_fixed_grid(method: str) -> bool:
    """True for torchdiffeq's fixed-step methods (euler, midpoint, rk4, ...).

    Example:
        >>> is_fixed_grid("rk4"), is_fixed_grid("dopri5")
        (True, False)
    """
    check_method(method)
    return issubclass(SOLVERS[method], FixedGridODESolver)


def reads_tolerances(method: str) -> bool:
    """True when ``rtol`` / ``atol`` change what ``method`` computes: every adaptive method,
    and the fixed-grid ``implicit_adams`` / ``fixed_adams``, whose Adams-Moulton corrector
    iterates until the tolerances are met.

    Example:
        >>> reads_tolerances("dopri5"), reads_tolerances("rk4"), reads_tolerances("implicit_adams")
        (True, False, True)
    """
    if not is_fixed_grid(method):
        return True
    solver = SOLVERS[method]
    return issubclass(solver, AdamsBashforthMoulton) and not issubclass(solver, AdamsBashforth)


def _grid(steps: int):
    """A torchdiffeq ``grid_constructor``: ``steps`` equal steps from ``t[0]`` to ``t[-1]``."""
    def construct(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype,
                              device=t.device)
    return construct


def per_sample_rms_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Largest per-sample RMS of a ``(B, ...)`` tensor: the error norm of adaptive steps, so
    that ``rtol`` / ``atol`` bound every sample's error, not the batch's average.

    Example:
        >>> per_sample_rms_norm(torch.tensor([[1.0, -1.0], [3.0, 3.0]]))  # RMS 1 and 3
        tensor(3.)
    """
    if tensor.numel() == 0:  # an empty batch: nothing to be wrong about
        return tensor.new_zeros(())
    if tensor.dtype in (torch.float16, torch.bfloat16):
        # in float32: an error ratio of 256 squared overflows float16, the norm was inf, every
        # step was rejected and dopri5 stopped with "underflow in dt" (fp16 autocast, ode_m)
        tensor = tensor.float()
    if tensor.dim() < 2:  # no batch dimension: plain RMS
        return tensor.abs().pow(2).mean().sqrt()
    return tensor.abs().pow(2).flatten(1).mean(1).sqrt().max()


def check_method(method: str) -> str:
    """Return ``method`` or raise ``ValueError`` listing the valid ODE methods.

    Example:
        >>> check_method("rk4")
        'rk4'
        >>> check_method("rk45")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown ode_method 'rk45'; valid methods: ...dopri5, ...rk4...
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ode_method {method!r}; valid methods: {', '.join(ODE_METHODS)}")
    return method


def _check_settings(depth: int, T, rtol, atol, adjoint) -> None:
    """Raise ``ValueError`` for an end time, tolerance or adjoint flag out of range."""
    for name, value in (("ode_T", T), ("ode_rtol", rtol), ("ode_atol", atol)):
        # a string or inf was taken (rtol=inf accepts every adaptive step) or failed with
        # a TypeError; the messages are ModelConfig's
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not 0 < value < math.inf):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if T / depth < 1e-30:
        raise ValueError(f"ode_T must be a finite number > 0 (and T / depth > 1e-30), "
                         f"got {T}")
    if not isinstance(adjoint, bool):  # bool("no") is True
        raise ValueError(f"ode_adjoint must be true or false, got {adjoint!r}")


#: torchdiffeq's max_order for explicit_adams: Adams-Bashforth of order at most 4
_EXPLICIT_ADAMS_MAX_ORDER = 5


def _solver_options(method: str, steps: int) -> dict:
    """torchdiffeq ``options`` for one segment of ``steps`` fixed-grid steps."""
    if not is_fixed_grid(method):
        return {"norm": per_sample_rms_norm}
    # fixed grid: exactly `steps` steps (a step_size grid can gain a tiny extra step when
    # (t1 - t0) / step rounds up)
    options = {"grid_constructor": _grid(steps)}
    if method == "explicit_adams":
        # Adams-Bashforth of order at most 4 (torchdiffeq's stated order; max_order=5). Its
        # default max_order 12 climbs to 11th order, whose stability interval on the
        # negative real axis is ~1e-3 wide: with dz/dt = f - z (eigenvalues <= -1 for a
        # contracting f) the output grew with the depth (T = 2, tanh cell, D = 8, 16, 32:
        # errors 0.03, 2.1, 1.1e3 against scipy; dz/dt = -z, 32 steps: 97 instead of 0.14)
        options["max_order"] = _EXPLICIT_ADAMS_MAX_ORDER
    return options



class _Dynamics(nn.Module):
    """``dz/dt = f_i(z, x) - z`` for one segment (mask ``i``), counting evaluations."""

    def __init__(self, cell: nn.Module, x: torch.Tensor, index: int | None, counter: list):
        super().__init__()
        self.cell = cell
        self.x = x
        self.index = index
        self.counter = counter

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.index is not None:  # set on every call: the adjoint pass revisits segments
            set_mask_index(self.cell, self.index)
        self.counter[0] += 1
        z = match_layout(z, self.x)  # a segment after the first starts from a stack slice
        return check_cell_output(self.cell(z, self.x), z) - z  # (B, C, H, W)


class ODECore(Core):
    """Neural-ODE core: ``z(T)`` of ``dz/dt = f(z, x) - z``, ``z(0) = 0``.

    Args:
        cell: the cell ``f(z, x)``.
        depth: number of segments (and of fixed-grid steps), >= 1.
        T: end time, > 0.
        method: a torchdiffeq method (see ``ODE_METHODS``).
        rtol: relative tolerance of adaptive methods (per sample).
        atol: absolute tolerance of adaptive methods (per sample).
        adjoint: backpropagate with the adjoint ODE (memory independent of the steps).

    ``last_stats`` holds ``nfe`` and ``cell_evals`` (both the number of evaluations of the
    dynamics in the last forward pass; the adjoint backward pass is not counted).

    Example:
        >>> import torch
        >>> from wtmodels.cells import ConvCell
        >>> core = ODECore(ConvCell(8), depth=2, method="dopri5", rtol=1e-3, atol=1e-3)
        >>> core(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(
        self,
        cell: nn.Module,
        depth: int,
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = False,
    ):
        super().__init__()
        depth = _check_depth(depth)
        _check_settings(depth, T, rtol, atol, adjoint)
        self.cell = cell
        self.depth = depth
        self.train_depth = self.depth
        self.T = float(T)
        self.method = check_method(method)
        self.rtol, self.atol = float(rtol), float(atol)
        self.adjoint = bool(adjoint)

    @property
    def end_time(self) -> float:
        """Current end time: ``T * depth / train_depth`` (``set_depth`` scales it)."""
        return self.T * self.depth / self.train_depth

    def set_depth(self, depth: int) -> None:
        """Integrate ``depth`` segments of length ``T / train_depth`` (end time scales)."""
        self.depth = _check_depth(depth)

    def _segments(self) -> list[tuple[int, int, int | None]]:
        """``(first, end, mask)`` runs of segments sharing a mask (one run without masks)."""
        k = mask_count(self.cell)
        if not k:
            return [(0, self.depth, None)]
        schedule = mask_schedule(self.cell)
        runs: list[tuple[int, int, int | None]] = []
        for t in range(self.depth):
            i = mask_index(t, self.depth, k, schedule)
            if runs and runs[-1][2] == i:
                runs[-1] = (runs[-1][0], t + 1, i)
            else:
                runs.append((t, t + 1, i))
        return runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the settings are attributes a user may change between calls (as set_depth does
        # for the depth): a T of -1 integrated backwards in time without a word
        check_method(self.method)
        _check_settings(self.train_depth, self.T, self.rtol, self.atol, self.adjoint)
        step = self.T / self.train_depth
        counter = [0]
        z = torch.zeros_like(x)  # (B, C, H, W)
        # an empty batch: torchdiffeq's adjoint backward failed ("setStorage: sizes [] ...");
        # direct backprop through nothing gives the same (zero) gradients
        adjoint = self.adjoint and x.numel() > 0
        with forward_pass(self.cell, x):
            for first, end, index in self._segments():
                func = _Dynamics(self.cell, x, index, counter)
                times = torch.tensor([first * step, end * step], dtype=x.dtype, device=x.device)
                fixed = is_fixed_grid(self.method)
                options = _solver_options(self.method, end - first)
                kwargs = dict(method=self.method, rtol=self.rtol, atol=self.atol, options=options)
                if adjoint:
                    # find_parameters, not cell.parameters(): a DataParallel replica holds
                    # its parameters as plain attributes, and its cell would get no gradient
                    params = (*find_parameters(self.cell), x)
                    solve = odeint_adjoint if fixed else _odeint_adjoint_eager
                    z = solve(func, z, times, adjoint_params=params, **kwargs)[-1]
                else:
                    z = (odeint if fixed else _odeint_eager)(func, z, times, **kwargs)[-1]
        self.last_stats = {"nfe": float(counter[0]), "cell_evals": float(counter[0])}
        return z
