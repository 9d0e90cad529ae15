"""Shared internals of the fixed-point solvers: validation, precision, per-sample bookkeeping.

Every solver works on a flattened batch ``x`` of shape ``(B, D)`` in a compute dtype (float64
for float64 inputs, float32 otherwise) and leaves all per-sample decisions to :class:`Tracker`:

- residuals ``abs = ||f(x) - x||`` and ``rel = abs / (||f(x)|| + EPS)`` per sample (a norm
  whose squares over- or underflow the dtype, values beyond ~1e19 or below ~1e-19 in float32,
  is measured again scaled: such values are no divergence, and a residual is never read as 0);
- the lowest-residual iterate of each sample is kept and returned;
- a sample stops (its iterate is frozen) once its residual is ``<= tol`` (converged) or once it
  is flagged diverged: ``f`` returned a non-finite value (or ``f(x) - x`` overflowed), or its
  absolute residual stayed above ``div_factor`` times the lowest absolute residual it had
  for ``patience`` consecutive evaluations and ended that run no lower than it began
  (whatever the stop mode: a relative residual can stay bounded while the iterates run off to
  infinity; a transient bump that is already falling again is not divergence; nor is a bump
  while the relative residual is at rounding level, <= 64 x the compute dtype's eps, or
  4 x the eps of a bf16/fp16 ``z0``, of the dtype of an autocast region ``f`` runs in, or of
  :func:`coarse_precision`'s dtype).
  A diverged sample keeps its best finite iterate and is never reported converged; a sample
  whose ``z0`` is non-finite has no finite iterate and is returned as it came, flagged diverged.
- for a ``z0`` in a lower precision (bf16, fp16) the iterates are rounded to it before ``f``
  sees them, so the residuals describe the iterate returned (and a ``tol`` below that
  precision is not reached: pass a float32 ``z0`` to solve in float32).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .stats import SolverStats

EPS = 1e-8  # in the relative residual ||f(z) - z|| / (||f(z)|| + EPS)
STOP_MODES = ("abs", "rel")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``int(value)`` if it is an integer ``>= minimum`` (numpy integers too), else
    raise ``ValueError``.

    Example:
        >>> check_positive_int("max_iter", np.int64(30))
        30
        >>> check_positive_int("max_iter", True)
        Traceback (most recent call last):
        ...
        ValueError: max_iter must be an integer >= 1, got True
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float, high: float = math.inf, *,
                low_open: bool = True, high_open: bool = False) -> float:
    """Return ``float(value)`` if it lies in the interval, else raise ``ValueError``.

    Example:
        >>> check_float("tau", 1, 0.0, 1.0)  # (0, 1]
        1.0
        >>> check_float("tau", 1.5, 0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: tau must lie in (0.0, 1.0], got 1.5
        >>> check_float("tol", math.nan, 0.0)
        Traceback (most recent call last):
        ...
        ValueError: tol must be a number, got nan
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_common(max_iter, tol, stop_mode) -> tuple[int, float]:
    """Validate the arguments every solver shares (``ValueError`` naming the field); returns
    ``(int(max_iter), float(tol))`` (a ``Fraction`` tol passes the check but cannot be
    compared with a tensor).

    Example:
        >>> from fractions import Fraction
        >>> check_common(np.int64(20), Fraction(1, 4), "abs")
        (20, 0.25)
        >>> check_common(20, 1e-4, "max")
        Traceback (most recent call last):
        ...
        ValueError: stop_mode must be one of ['abs', 'rel'], got 'max'
    """
    max_iter = check_positive_int("max_iter", max_iter)
    tol = check_float("tol", tol, 0.0, high_open=True)  # finite: inf "converges" anything
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, got {stop_mode!r}")
    return max_iter, tol


DIVERGENCE_DEFAULTS = {"div_factor": 10.0, "patience": 5}  # the solvers' defaults

# option -> check(value) raising ValueError; a solver's ``option_checks`` attribute holds its
# own (see wtmodels.solvers.check_options), these two are shared by the built-in solvers
DIVERGENCE_CHECKS: dict[str, Callable] = {
    "div_factor": lambda v: check_float("div_factor", v, 1.0, low_open=False),
    "patience": lambda v: check_positive_int("patience", v),
}


def check_values(checks: dict[str, Callable], **opts) -> list:
    """Run ``checks[name](value)`` for every option given (``ValueError`` naming the field);
    returns the checked values, as ``int`` / ``float``, in the order given.

    Example:
        >>> check_values(DIVERGENCE_CHECKS, div_factor=2, patience=np.int64(3))
        [2.0, 3]
        >>> check_values(DIVERGENCE_CHECKS, div_factor=0.5)
        Traceback (most recent call last):
        ...
        ValueError: div_factor must lie in [1.0, inf], got 0.5
    """
    return [checks[name](value) for name, value in opts.items()]


_local = threading.local()


@contextlib.contextmanager
def coarse_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Solves started inside treat ``dtype``'s rounding as in play, as under autocast to it.

    For a map whose values carry a bf16/fp16 computation's error without running under
    autocast itself, such as the DEQ's adjoint ``u -> J^T u + g`` after a bf16 forward: its
    residuals bump at that precision's floor, which is then not read as divergence (see
    :class:`Tracker`). ``None`` or a dtype no coarser than the compute dtype changes nothing.

    Example:
        >>> import torch
        >>> with coarse_precision(torch.bfloat16):
        ...     Problem(lambda z: z, torch.zeros(2, 3)).noise_eps == torch.finfo(torch.bfloat16).eps
        True
    """
    previous = getattr(_local, "coarse_dtype", None)
    _local.coarse_dtype = dtype
    try:
        yield
    finally:
        _local.coarse_dtype = previous


@contextlib.contextmanager
def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> Iterator[torch.Tensor]:
    """An uninitialised ``shape`` buffer (dtype/device of ``like``) for a solver's history.

    On CPU the buffer is kept per thread and handed out again to the next solve asking for the
    same ``name`` and shape: first writes to freshly allocated memory page-fault, which on CPU
    costs more than a whole solve's arithmetic. A nested solve (the buffer is in use) gets a
    fresh one, and so does a solve outside ``torch.inference_mode`` after one inside it (its
    buffers are inference tensors). :func:`clear_workspace` releases the kept buffers. On GPUs
    the caching allocator already reuses memory, so a plain allocation is returned.

    Example:
        >>> like = torch.zeros(3)
        >>> with scratch("doc.buf", (2, 3), like) as buf:
        ...     first = buf.data_ptr()
        >>> with scratch("doc.buf", (2, 3), like) as buf:  # on CPU: the same memory again
        ...     buf.data_ptr() == first, buf.shape, buf.dtype
        (True, torch.Size([2, 3]), torch.float32)
        >>> with scratch("doc.buf", (2, 3), like) as a, scratch("doc.buf", (2, 3), like) as b:
        ...     a.data_ptr() != b.data_ptr()  # a nested solve gets a buffer of its own
        True
    """
    dtype, device = like.dtype, like.device
    if device.type != "cpu":
        yield torch.empty(shape, dtype=dtype, device=device)
        return
    cache = _local.__dict__.setdefault("buffers", {})
    buf, busy = cache.get(name, (None, False))
    if busy:
        yield torch.empty(shape, dtype=dtype, device=device)
        return
    if (buf is None or buf.shape != shape or buf.dtype != dtype
            # made under torch.inference_mode: read-only outside it
            or (buf.is_inference() and not torch.is_inference_mode_enabled())):
        cache.pop(name, None)
        buf = torch.empty(shape, dtype=dtype, device=device)
    cache[name] = (buf, True)
    try:
        yield buf
    finally:
        cache[name] = (buf, False)


def clear_workspace() -> None:
    """Release the history buffers kept between CPU solves (in this thread).

    Example:
        >>> from wtmodels.solvers import clear_workspace
        >>> clear_workspace()
    """
    _local.__dict__.pop("buffers", None)


class Problem:
    """A fixed-point problem ``z = f(z)`` seen by a solver as ``(B, D)`` in a compute dtype.

    The solver's own arithmetic runs with autocast disabled (inside :meth:`solver_mode`);
    ``f`` itself is called under the autocast state the caller had, on a tensor of the shape
    and dtype of ``z0``. Its output is cast to the compute dtype (bf16 outputs are fine).

    An ``f`` that writes its argument in place (a cell starting with ``nn.ReLU(inplace=True)``)
    would overwrite the solver's iterate, so the residual would describe another point and
    the iterates could never leave the values ``f`` writes (rectified ones never reach a
    fixed point with negative entries). The first such call is detected by the argument's
    version counter (free, no tensor operation): ``f`` is evaluated once more on a copy of
    the (written) iterate, and from then on gets a copy of every iterate. Under
    ``torch.inference_mode`` tensors have no version counter, so such a write cannot be seen:
    there ``f`` always gets a copy of the iterate (one ``(B, D)`` copy per evaluation, into a
    buffer kept for the solve).

    Example:
        >>> prob = Problem(lambda z: 0.5 * z + 1, torch.zeros(2, 1, 3))
        >>> prob.x0.shape, prob.compute_dtype  # (B, D) in the compute dtype
        (torch.Size([2, 3]), torch.float32)
        >>> prob(prob.x0).tolist(), prob.restore(prob.x0).shape
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], torch.Size([2, 1, 3]))
        >>> Problem(lambda z: z[:, :1], torch.zeros(2, 3))(torch.zeros(2, 3))
        Traceback (most recent call last):
        ...
        ValueError: f must return a tensor of shape (2, 3) (the shape of z0), got (2, 1)
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor):
        if not callable(f):
            raise ValueError(f"f must be callable, got {type(f).__name__}")
        if not isinstance(z0, torch.Tensor) or z0.dim() < 1 or z0.shape[0] < 1:
            got = (f"shape {tuple(z0.shape)}" if isinstance(z0, torch.Tensor)
                   else type(z0).__name__)
            raise ValueError(f"z0 must be a tensor of shape (B, ...) with B >= 1, "
                             f"got {got}")
        if not z0.is_floating_point():  # complex too: the residual norms and mixing are real
            raise ValueError("z0 must be a real floating-point tensor (float32, float64, "
                             f"bfloat16 or float16), got dtype {z0.dtype}")
        if z0.layout != torch.strided:  # else a bare "reshape is not implemented" error
            raise ValueError(f"z0 must be a dense (strided) tensor, got layout {z0.layout}")
        if z0.device.type == "meta":  # no values to decide on (else a bare autocast error)
            raise ValueError("z0 must hold values: a tensor on the 'meta' device cannot be "
                             "solved")
        self.f = f
        self.shape = z0.shape
        # plain int tuples for view / reshape: a torch.Size argument costs ~5 us more per call
        self.shape_ints = tuple(z0.shape)
        self.flat_ints = (z0.shape[0], z0[:1].numel())
        self.dtype = z0.dtype
        self.device = z0.device
        self.compute_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
        self.device_type = z0.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = (torch.get_autocast_dtype(self.device_type)
                               if self.autocast else None)
        # (B, D), memory of its own: f sees the iterates, and the caller's z0 stays untouched;
        # contiguous (a dense z0 with the batch innermost, z.t(), reshapes to a strided view
        # that a plain copy keeps: f saw it and a solve returning its start returned it)
        self.x0 = z0.detach().reshape(z0.shape[0], -1).to(
            self.compute_dtype, copy=True, memory_format=torch.contiguous_format)
        self.rounds = z0.dtype != self.compute_dtype
        # the coarsest precision in play: iterates rounded to a bf16/fp16 z0, f's values
        # under a bf16/fp16 autocast or inside coarse_precision (see Tracker's noise_eps);
        # None when none is coarser than the compute dtype
        low = [t for t in ((z0.dtype if self.rounds else None), self.autocast_dtype,
                           getattr(_local, "coarse_dtype", None))
               if t is not None and torch.finfo(t).eps > torch.finfo(self.compute_dtype).eps]
        self.noise_eps = max((torch.finfo(t).eps for t in low), default=None)
        # inference tensors have no version counter (see check_unmodified)
        self.versioned = not torch.is_inference_mode_enabled()
        self.copies = False  # f writes its argument in place: it gets copies of the iterates
        # called with the eps of an output dtype of f coarser than the compute dtype and than
        # noise_eps (f returning float16 for a float32 z0, or float32 for a float64 one): its
        # rounding floor is then in play, as under autocast (a solver sets Tracker.note_noise)
        self.on_coarse_output: Callable[[float], None] | None = None
        self.arg = None  # under inference mode: the copy of the iterate f gets

    def solver_mode(self) -> contextlib.ExitStack:
        """Context for the solver body: no autograd graph, autocast off; yields an ExitStack
        to enter :func:`scratch` buffers on."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.autocast:
            stack.enter_context(torch.autocast(self.device_type, enabled=False))
        return stack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``f`` on a flat ``(B, D)`` iterate, returning ``(B, D)`` in the compute dtype."""
        z = x.view(self.shape_ints)
        if self.rounds:  # f sees the iterate in z0's precision: so must the residual
            z = z.to(self.dtype)
            x.copy_(z.view(self.flat_ints))
        elif not self.versioned:  # no version counter: a write to z would go unseen
            if self.arg is None:
                self.arg = torch.empty_like(z)
            z = self.arg.copy_(z)  # f may write this copy, never the iterate x
        version = z._version if self.versioned else 0
        fz = self._call(z.clone() if self.copies else z)
        if self.versioned and z._version != version:
            self.check_unmodified(z, fz)
            if not self.rounds:  # (z is a copy then) f wrote the iterate x: f again at it
                self.copies = True
                fz = self._call(z.clone())
        return self.to_compute(self.check_output(fz).reshape(self.flat_ints))

    def to_compute(self, fx: torch.Tensor) -> torch.Tensor:
        """``f``'s output ``fx`` in the compute dtype. A dtype coarser than the compute dtype
        and than :attr:`noise_eps` makes its eps the rounding level in play (and
        :attr:`on_coarse_output` is told)."""
        if fx.dtype == self.compute_dtype:
            return fx
        eps = torch.finfo(fx.dtype).eps
        if eps > max(self.noise_eps or 0.0, torch.finfo(self.compute_dtype).eps):
            self.noise_eps = eps
            if self.on_coarse_output is not None:
                self.on_coarse_output(eps)
        return fx.to(self.compute_dtype)

    def _call(self, z: torch.Tensor):
        if self.autocast:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                return self.f(z)
        return self.f(z)

    @staticmethod
    def check_unmodified(z: torch.Tensor, fz) -> None:
        """``ValueError`` if ``f`` wrote its argument ``z`` in place and returned it (or a view
        of it): the residual ``f(z) - z`` would read 0 and report a convergence never reached.
        Called only when ``z``'s version counter moved."""
        if (isinstance(fz, torch.Tensor)
                and fz.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()):
            raise ValueError("f modified its argument in place and returned it: the residual "
                             "f(z) - z would read 0; return a new tensor (e.g. z * 0.5 + 1, "
                             "not z.mul_(0.5).add_(1))")

    def check_output(self, fz) -> torch.Tensor:
        """``fz`` if it is a real floating-point tensor of ``z0``'s shape, else ``ValueError``."""
        if not isinstance(fz, torch.Tensor) or fz.shape != self.shape:
            got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
            raise ValueError(f"f must return a tensor of shape {tuple(self.shape)} "
                             f"(the shape of z0), got {got}")
        if not fz.is_floating_point():
            raise ValueError(f"f must return a real floating-point tensor, got {fz.dtype}")
        if fz.layout != torch.strided:  # else a bare "reshape is not implemented" error
            raise ValueError(f"f must return a dense (strided) tensor, got layout {fz.layout} "
                             "(call .to_dense())")
        if fz.device != self.device:  # else a bare cross-device error deep in the solver
            raise ValueError(f"f must return a tensor on the device of z0 ({self.device}), "
                             f"got one on {fz.device}")
        return fz

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the shape and dtype of ``z0``."""
        return x.view(self.shape).to(self.dtype)


class Pool:
    """A few reusable ``(B, D)`` buffers for iterates, so a solve allocates no big tensors.

    Freeing and re-allocating megabyte tensors every step makes glibc return memory to the OS
    and page-fault it back, which slows ``f`` itself; iterates written into these (kept,
    :func:`scratch`) buffers avoid that. ``take(*live)`` returns a buffer that holds none of
    ``live``.

    Example:
        >>> with contextlib.ExitStack() as ctx:
        ...     pool = Pool(ctx, "doc.pool", torch.zeros(2, 3), size=2)
        ...     a = pool.take()
        ...     b = pool.take(a)  # a is still needed: another buffer
        ...     pool.take(a, b)
        Traceback (most recent call last):
        ...
        RuntimeError: iterate pool exhausted
        >>> a.shape, a.data_ptr() != b.data_ptr()
        (torch.Size([2, 3]), True)
    """

    def __init__(self, ctx: contextlib.ExitStack, name: str, like: torch.Tensor, size: int = 4):
        self.buffers = ctx.enter_context(scratch(name, (size, *like.shape), like)).unbind(0)

    def take(self, *live: torch.Tensor | None) -> torch.Tensor:
        used = {t.data_ptr() for t in live if t is not None}
        for buf in self.buffers:
            if buf.data_ptr() not in used:
                return buf
        raise RuntimeError("iterate pool exhausted")  # a solver bug: more live iterates


class Small:
    """The per-sample vectors and small systems of a solve, as numpy arrays on the host.

    An op on a ``(B,)`` vector costs well under a microsecond in numpy, several in torch, and
    on an accelerator each decision on device values would be a synchronisation anyway. On
    CPU the arrays share memory with torch tensors (``.numpy()``, ``torch.from_numpy``); on
    other devices :meth:`of` copies a small device tensor to the host (one synchronisation)
    and :meth:`torch` copies an array back to the device.

    Example:
        >>> small = Small(torch.zeros(1, dtype=torch.float64))
        >>> A = np.array([[[2.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])  # 2nd singular
        >>> x, ok = small.solve(A, np.array([[2.0, 2.0], [1.0, 2.0]]))
        >>> x[0].tolist(), ok.tolist()
        ([1.0, 0.5], [True, False])
    """

    xp = np

    def __init__(self, like: torch.Tensor):
        self.cpu = like.device.type == "cpu"
        self.device, self.dtype = like.device, like.dtype

    def of(self, t: torch.Tensor) -> np.ndarray:
        """A torch tensor as a numpy array (no copy on CPU)."""
        return t.numpy() if self.cpu else t.cpu().numpy()

    def torch(self, a: np.ndarray) -> torch.Tensor:
        """A numpy array as a torch tensor on the solve's device (no copy on CPU)."""
        t = torch.from_numpy(a)
        return t if self.cpu else t.to(self.device)

    def full(self, shape, value, dtype=None) -> np.ndarray:
        dtype = self.dtype if dtype is None else dtype
        return torch.full(shape, value, dtype=dtype).numpy()

    def all_finite(self, a, b) -> bool:
        """Whether every entry of the non-negative ``(B,)`` arrays ``a`` and ``b`` is finite
        (one reduction, summed in float64, which cannot overflow for float32 norms)."""
        return math.isfinite(a.sum(dtype=np.float64) + b.sum(dtype=np.float64))

    def solve(self, A, b):
        """Batched ``A x = b`` (``(B, n, n)``, ``(B, n)``) -> ``(x, ok)``, ``ok`` (B,) bool
        marking samples whose system was regular (finite solution). Silent: a near-singular
        system's solution may overflow the dtype (numpy would warn, and under
        ``warnings.simplefilter("error")`` raise); it is flagged here instead."""
        with np.errstate(all="ignore"):
            try:
                x = np.linalg.solve(A, b[..., None])[..., 0]
            except np.linalg.LinAlgError:  # some sample is singular
                x = self._solve_regular(A, b)
        return x, np.isfinite(x).all(-1)

    @staticmethod
    def _solve_regular(A, b):
        """:meth:`solve` when some systems are exactly singular: those (found by the same LU
        factorisation, ``slogdet`` sign 0) get NaN rows, the rest one batched solve."""
        singular = np.linalg.slogdet(A)[0] == 0  # (B,)
        eye = np.eye(A.shape[-1], dtype=A.dtype)
        try:
            x = np.linalg.solve(np.where(singular[:, None, None], eye, A), b[..., None])[..., 0]
        except np.linalg.LinAlgError:  # pivots differ after all: one by one
            x = np.full(b.shape, np.nan, dtype=b.dtype)
            for i in range(len(b)):
                with contextlib.suppress(np.linalg.LinAlgError):
                    x[i] = np.linalg.solve(A[i], b[i])
            return x
        x[singular] = np.nan
        return x


def _scaled_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-row 2-norm of ``t`` (k, D) in float64, free of over- and underflow: ``s * ||t / s||``
    with ``s = max |t|`` (0 for a zero row, non-finite for a non-finite one)."""
    t = t.to(torch.float64)
    s = t.abs().amax(1, keepdim=True) if t.shape[1] else t.new_zeros(t.shape[0], 1)
    return s[:, 0] * torch.linalg.vector_norm(t / torch.where(s > 0, s, 1.0), dim=1)


# rounding level of a bf16/fp16 computation, in its eps (bf16: 4 x 2^-7 = 0.031; fp16: 0.0039):
# under bf16 autocast relative residuals at their floor (~1e-3) bump to ~5e-3, rarely ~0.06 for
# one step; a runaway z <- rho z + b tends to (rho - 1) / rho, so rho > 1.03 is still caught
LOW_PRECISION_NOISE = 4

_TRACE_VALUES = 1 << 20  # entries of each trace's first allocation, for B above 16384


class Tracker:
    """Per-sample residuals, best iterates, stopping and divergence flags of one solve.

    Call :meth:`update` once per f-evaluation; it returns ``True`` when every sample has
    stopped. :meth:`freeze` keeps stopped samples at their best iterate.

    Example:
        >>> x = torch.tensor([[2.0], [0.0]], dtype=torch.float64)  # sample 0 starts at z* = 2
        >>> tr = Tracker(x, max_iter=50, tol=2**-10, stop_mode="abs", div_factor=10.0,
        ...              patience=5)
        >>> while True:  # z <- f(z) = 0.5 z + 1: the residual halves at every step
        ...     fx = 0.5 * x + 1
        ...     if tr.update(x, fx, fx - x):
        ...         break
        ...     x = tr.freeze(fx)
        >>> tr.nstep.tolist(), tr.converged.tolist(), tr.result().flatten().tolist()
        ([1, 11], [True, True], [2.0, 1.998046875])
    """

    def __init__(self, x0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 div_factor: float, patience: int, pool: Pool | None = None,
                 noise_eps: float | None = None):
        B = x0.shape[0]
        self.pool = pool
        self.small = sm = Small(x0)
        # a tol beyond the dtype (1e39 in float32) would round to inf in the comparisons, and
        # an infinite residual (f returning inf) would read as converged
        self.tol = min(tol, float(torch.finfo(x0.dtype).max))
        self.rel = stop_mode == "rel"
        self.div_factor, self.patience = div_factor, patience
        # traces grow on demand: the memory follows the evaluations made, not max_iter; the
        # first allocation holds 64 evaluations, fewer for a huge batch (a fixed 64 columns
        # cost 2 x 64 x B values up front: 512 MB at B = 1e6 for a solve of a few steps)
        width = min(max_iter, 64, max(8, _TRACE_VALUES // B))
        self.abs_trace = sm.full((B, width), math.nan)
        self.rel_trace = sm.full((B, width), math.nan)
        self.best_abs = sm.full((B,), math.inf)
        self.best_rel = sm.full((B,), math.inf)
        self.min_abs = sm.full((B,), math.inf)
        self.x0 = self.best_x = x0  # (B, D), never written in place
        self.active = sm.full((B,), True, torch.bool)
        self.converged = sm.full((B,), False, torch.bool)
        self.diverged = sm.full((B,), False, torch.bool)
        self.streak = sm.full((B,), 0, torch.int64)
        self.streak_start = sm.full((B,), 0.0)  # absolute residual where the streak began
        self.nstep = sm.full((B,), 0, torch.int64)
        self.n_iter = 0
        self.all_active = True
        self.check_growth = math.isfinite(div_factor)
        # a relative residual this small is rounding noise: its bumps above a lucky low (an
        # exact 0) are no divergence (a tol below the precision would flag samples at its floor).
        # noise_eps: the eps of a coarser precision in play (Problem.noise_eps: iterates
        # rounded to a bf16/fp16 z0, or f under bf16/fp16 autocast), whose floor is far higher
        # (64 x bf16's eps would be 0.5, above most runaways' relative residual)
        self.noise_rel = 64 * torch.finfo(x0.dtype).eps
        if noise_eps is not None:
            self.noise_rel = max(self.noise_rel, LOW_PRECISION_NOISE * noise_eps)
        self.streak_any = False  # some sample's streak is > 0
        # a norm below this may have lost its squares to underflow (see _rescaled_norms)
        finfo = torch.finfo(x0.dtype)
        self.norm_lo = math.sqrt(finfo.tiny) / finfo.eps

    def note_noise(self, noise_eps: float) -> None:
        """A coarser precision came into play during the solve (``f`` returned values of a
        dtype with eps ``noise_eps``): its rounding floor is no divergence either."""
        self.noise_rel = max(self.noise_rel, LOW_PRECISION_NOISE * noise_eps)

    @property
    def active_mask(self) -> torch.Tensor:
        """``(B,)`` bool torch tensor: samples still iterating."""
        return self.small.torch(self.active)

    def update(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, g_sq=None,
               live: tuple = ()) -> bool:
        """Record the evaluation ``fx = f(x)``, ``g = fx - x`` (all ``(B, D)``).

        The common case (every sample finite, none stopping, every sample improving) costs a
        norm of ``fx`` and a dozen operations on ``(B,)`` vectors; the best iterate is then
        ``x`` itself (a reference, no copy: the solver keeps ``x`` alive while it is best).

        Args:
            g_sq: ``||g||^2`` per sample (an array of :attr:`small`) if the solver already has
                it, saving a pass over ``g``.
            live: other pool iterates the solver still needs (not to be overwritten).

        Returns:
            ``True`` when every sample has stopped.
        """
        sm, xp = self.small, self.small.xp
        k = self.n_iter
        self.n_iter += 1
        f_norm = torch.linalg.vector_norm(fx, dim=1)  # (B,)
        if g_sq is not None:
            f_norm, abs_r = sm.of(f_norm), xp.sqrt(g_sq)
        elif sm.cpu:
            f_norm, abs_r = sm.of(f_norm), sm.of(torch.linalg.vector_norm(g, dim=1))
        else:  # one copy to the host
            f_norm, abs_r = sm.of(torch.stack([f_norm, torch.linalg.vector_norm(g, dim=1)]))
        bad = None
        # a plain norm squares the entries: beyond ~1e19 (float32) it overflows to inf, below
        # ~1e-19 the squares underflow (a residual read as 0 would report a convergence never
        # reached); those rows (rare: one check for the whole batch) are measured again scaled
        finite = sm.all_finite(abs_r, f_norm)  # one check for the whole batch
        if not finite or bool(abs_r.min() < self.norm_lo):
            abs_r, f_norm = self._rescaled_norms(fx, g, abs_r, f_norm)
            finite = sm.all_finite(abs_r, f_norm)
        # over="ignore": finite float32 norms near its largest value overflow in a quotient
        # (rel of f(x) ~ 0) or a sum; a quotient beyond the dtype is inf, no warning
        if finite:
            with np.errstate(over="ignore"):
                rel_r = abs_r / (f_norm + EPS)
        else:  # some f(x) or f(x) - x non-finite: that sample's residuals are inf
            with np.errstate(invalid="ignore", over="ignore"):
                # each finite on its own (their sum may overflow: 2e38 + 2e38 in float32)
                bad = ~(xp.isfinite(abs_r) & xp.isfinite(f_norm))
                abs_r = xp.where(bad, math.inf, abs_r)
                rel_r = xp.where(bad, math.inf, abs_r / (f_norm + EPS))
        if k == self.abs_trace.shape[1]:
            self._grow_traces()
        self.abs_trace[:, k] = abs_r
        self.rel_trace[:, k] = rel_r
        res = rel_r if self.rel else abs_r
        act = self.active
        improved = res < (self.best_rel if self.rel else self.best_abs)
        if self.all_active and bool(improved.all()):
            self.best_x, self.best_abs, self.best_rel = x, abs_r, rel_r
        else:
            if not self.all_active:
                improved &= act
            if bool(improved.any()):
                # a stopped sample's row of x is its best iterate (see freeze): when every
                # active sample improved, x is the new best without a copy
                if not self.all_active and bool((improved | ~act).all()):
                    self.best_x = x
                else:
                    self.best_x = self._blend(improved, x, self.best_x, live)
                self.best_abs = xp.where(improved, abs_r, self.best_abs)
                self.best_rel = xp.where(improved, rel_r, self.best_rel)
        # divergence: the absolute residual stays above div_factor x the lowest one seen
        # (and is no lower than where that streak began: a falling transient is not flagged)
        self.min_abs = xp.minimum(self.min_abs, abs_r)
        if self.check_growth:
            with np.errstate(over="ignore"):  # div_factor x 3e38 is inf in float32: no growth
                grow = (abs_r > self.div_factor * self.min_abs) & (rel_r > self.noise_rel)
            if self.streak_any or bool(grow.any()):
                self.streak_start = xp.where(grow & (self.streak == 0), abs_r,
                                             self.streak_start)
                self.streak = xp.where(grow, self.streak + 1, 0)
                self.streak_any = bool(self.streak.any())
        conv = res <= self.tol
        self.nstep += act
        if bad is None and not self.streak_any and self.all_active and not bool(conv.any()):
            return False  # nobody stops this step (with frozen samples: check every step)
        conv &= act
        div = act & ~conv & (self.streak >= self.patience) & (abs_r >= self.streak_start)
        if bad is not None:
            div |= act & ~conv & bad
        self.converged |= conv
        self.diverged |= div
        self.active = act & ~(conv | div)
        n_active = int(self.active.sum())
        self.all_active = n_active == len(self.active)
        return n_active == 0

    def _rescaled_norms(self, fx: torch.Tensor, g: torch.Tensor, abs_r, f_norm):
        """``(abs_r, f_norm)`` with the rows whose plain norm may have over- or underflowed
        (non-finite, or ``abs_r`` below :attr:`norm_lo`) measured as ``s * ||t / s||``,
        ``s = max |t|``, in float64."""
        sm, xp = self.small, self.small.xp
        redo = ~(xp.isfinite(abs_r) & xp.isfinite(f_norm)) | (abs_r < self.norm_lo)
        idx = sm.torch(np.flatnonzero(redo))
        abs_r, f_norm = abs_r.copy(), f_norm.copy()  # may be views of g_sq or of torch memory
        abs_r[redo] = sm.of(_scaled_norm(g.detach().index_select(0, idx)).to(sm.dtype))
        f_norm[redo] = sm.of(_scaled_norm(fx.detach().index_select(0, idx)).to(sm.dtype))
        return abs_r, f_norm

    def _grow_traces(self) -> None:
        B, n = self.abs_trace.shape
        for name in ("abs_trace", "rel_trace"):
            grown = self.small.full((B, 2 * n), math.nan)
            grown[:, :n] = getattr(self, name)
            setattr(self, name, grown)

    def freeze(self, x_new: torch.Tensor, live: tuple = (), owned: bool = False
               ) -> torch.Tensor:
        """Stopped samples stay at their best iterate; the others take ``x_new``.

        Args:
            owned: ``x_new`` is a solver buffer that may be written in place (only the rows
                of stopped samples are then copied); otherwise a pool buffer takes the result.
        """
        if self.all_active:
            return x_new
        if owned:
            idx = self.small.torch(np.flatnonzero(~self.active))  # stopped samples
            x_new.index_copy_(0, idx, self.best_x.index_select(0, idx))
            return x_new
        return self._blend(self.active, x_new, self.best_x, live)

    def _blend(self, mask, a: torch.Tensor, b: torch.Tensor, live: tuple) -> torch.Tensor:
        """Rows of ``a`` where ``mask`` (B,) holds, else of ``b``, in a pool buffer.

        A full copy of the larger part and a row copy of the rest: on CPU about twice as fast
        as ``torch.where`` (which reads both inputs and the broadcast mask).
        """
        if self.pool is None:
            return torch.where(self.small.torch(mask)[:, None], a, b)
        out = self.pool.take(a, b, *live)
        if 2 * int(mask.sum()) < len(mask):
            a, b, mask = b, a, ~mask
        out.copy_(a)
        idx = self.small.torch(np.flatnonzero(~mask))
        return out.index_copy_(0, idx, b.index_select(0, idx))

    def prefer_start(self) -> np.ndarray | None:
        """``(B,)`` mask of the samples that get back their start, or None if there are none.

        In ``stop_mode="rel"`` a sample flagged diverged gets back its start when that has the
        lower absolute residual: the relative residual of a runaway iterate falls as
        ``||f(z)||`` grows (towards ``(rho - 1) / rho`` for a linear blow-up), so its lowest-
        ``rel`` iterate can be the one that ran furthest away. Updates the best residuals
        (:meth:`result` also swaps the iterates; ``DEQ``'s unrolled mode swaps its outputs).
        """
        if not (self.rel and bool(self.diverged.any())):
            return None
        start_abs, start_rel = self.abs_trace[:, 0], self.rel_trace[:, 0]
        back = self.diverged & (start_abs < self.best_abs)
        if not bool(back.any()):
            return None
        self.best_abs = np.where(back, start_abs, self.best_abs)
        self.best_rel = np.where(back, start_rel, self.best_rel)
        return back

    def result(self) -> torch.Tensor:
        """The best iterates ``(B, D)`` in memory of their own (not a pool buffer, not ``z0``),
        with :meth:`prefer_start` applied. Call before :meth:`stats`."""
        best = self.best_x.clone()
        back = self.prefer_start()
        if back is not None:
            idx = self.small.torch(np.flatnonzero(back))
            best.index_copy_(0, idx, self.x0.index_select(0, idx))
            self.best_x = best
        return best

    def stats(self) -> SolverStats:
        """The :class:`SolverStats` of the solve so far."""
        sm = self.small
        n = self.n_iter
        nstep = sm.torch(self.nstep)
        best_abs, best_rel = sm.torch(self.best_abs), sm.torch(self.best_rel)
        after = torch.arange(n, device=nstep.device)[None, :] >= nstep[:, None]  # (B, n)
        abs_trace = torch.where(after, best_abs[:, None], sm.torch(self.abs_trace)[:, :n])
        rel_trace = torch.where(after, best_rel[:, None], sm.torch(self.rel_trace)[:, :n])
        best = best_rel if self.rel else best_abs
        return SolverStats(
            nstep=nstep.clone(),
            abs_lowest=best_abs.clone(),
            rel_lowest=best_rel.clone(),
            converged=sm.torch(self.converged) & (best <= self.tol),
            diverged=sm.torch(self.diverged).clone(),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
        )
