"""Batched fixed-point solvers with one signature, a string-keyed registry and ``SolverStats``.

Every solver is a function ``(f, z0, *, max_iter, tol, stop_mode, **opts) -> (z, SolverStats)``
working on ``(B, ...)`` tensors, stopping per sample (see :mod:`wtmodels.solvers.common`).

Example:
    >>> import torch, wtmodels as wt
    >>> wt.list_solvers()
    ['anderson', 'broyden', 'fixed_point']
    >>> z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), method="broyden")
    >>> torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-3)
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from .anderson import anderson
from .broyden import broyden
from .common import clear_workspace
from .fixed_point import fixed_point
from .stats import SolverStats

__all__ = ["SolverStats", "anderson", "broyden", "check_options", "check_result",
           "clear_workspace", "fixed_point", "get_solver", "list_solvers", "register_solver",
           "solve", "solver_options"]

_SOLVERS: dict[str, Callable] = {}
_COMMON = ("max_iter", "tol", "stop_mode")


def register_solver(name: str, solver: Callable, *, overwrite: bool = False) -> Callable:
    """Register ``solver`` under ``name`` for :func:`solve` and :class:`wtmodels.DEQ`.

    Args:
        name: registry key.
        solver: ``(f, z0, *, max_iter, tol, stop_mode, **opts) -> (z, SolverStats)``. If it
            has an ``option_checks`` attribute (or is a ``functools.partial`` of a solver that
            has one), a dict ``{option: check(value)}`` whose checks raise ``ValueError``,
            :func:`check_options` runs them (so a :class:`wtmodels.DEQ`
            rejects a bad value when it is built, not at its first backward pass).
        overwrite: allow replacing an existing entry.

    Returns:
        ``solver`` (so this also works as a decorator factory's target).

    Example:
        >>> import wtmodels as wt
        >>> from wtmodels.solvers import fixed_point
        >>> def damped(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
        ...     return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=0.5)
        >>> _ = wt.register_solver("damped_demo", damped)
        >>> "damped_demo" in wt.list_solvers()
        True
    """
    if not isinstance(name, str) or not name.strip():  # "  " could never be asked for
        raise ValueError(f"solver name must be a non-empty str, got {name!r}")
    if not callable(solver):
        raise ValueError(f"solver must be callable, got {type(solver).__name__}")
    if name in _SOLVERS and not overwrite:
        raise ValueError(f"solver {name!r} is already registered (pass overwrite=True)")
    try:  # a builtin (torch.add, max) has none: say what is expected, not only that
        params = inspect.signature(solver).parameters
    except (TypeError, ValueError) as e:
        raise ValueError(f"solver {name!r} must be callable as solver(f, z0, *, max_iter, tol, "
                         f"stop_mode) with a readable signature: {e}") from None
    missing = [p for p in _COMMON if p not in params
               and not any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())]
    if missing:
        raise ValueError(f"solver {name!r} must accept the keyword arguments {missing}")
    try:  # as solve and DEQ call it (else a TypeError at the first solve, or deep in training)
        inspect.signature(solver).bind(None, None, max_iter=1, tol=1.0, stop_mode="rel")
    except TypeError as e:
        raise ValueError(f"solver {name!r} must be callable as solver(f, z0, *, max_iter, "
                         f"tol, stop_mode) with its other options optional: {e}") from None
    _check_option_checks(name, solver)
    _SOLVERS[name] = solver
    return solver


def _option_checks(solver: Callable) -> dict | None:
    """``solver.option_checks``, or that of the solver a ``functools.partial`` wraps."""
    checks = getattr(solver, "option_checks", None)
    if checks is None and isinstance(solver, functools.partial):
        checks = getattr(solver.func, "option_checks", None)
    return checks


def _check_option_checks(name: str, solver: Callable) -> None:
    """``ValueError`` when ``solver``'s ``option_checks`` is not a dict of callables keyed by
    options it takes (else a ``TypeError`` at the first solve, or a check that never runs: a
    misspelt key would leave its option unchecked without a word)."""
    checks = _option_checks(solver)
    if checks is None:
        return
    if not isinstance(checks, dict):
        raise ValueError(f"solver {name!r}: option_checks must be a dict {{option: "
                         f"check(value)}}, got {type(checks).__name__}")
    bad = sorted(str(k) for k, v in checks.items() if not callable(v))
    if bad:
        raise ValueError(f"solver {name!r}: option_checks values must be callables "
                         f"check(value), not for {bad}")
    valid = _read_options(solver)
    unknown = [] if valid is None else sorted(str(k) for k in checks if k not in valid)
    if unknown:
        raise ValueError(f"solver {name!r}: option_checks name option(s) {unknown} it does "
                         f"not take; valid options: {list(valid)}")


def list_solvers() -> list[str]:
    """Sorted names of the registered solvers.

    Example:
        >>> "anderson" in list_solvers()
        True
    """
    return sorted(_SOLVERS)


def get_solver(name: str) -> Callable:
    """The solver registered under ``name``; ``ValueError`` listing the valid names otherwise.

    Example:
        >>> get_solver("anderson").__name__
        'anderson'
    """
    try:
        return _SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {list_solvers()}"
                         f"{torchdeq_hint(name)}") from None


def torchdeq_hint(name) -> str:
    """The note an unknown solver ``name`` gets when it is torchdeq's name of one of ours.

    Example:
        >>> torchdeq_hint("fixed_point_iter")
        " (torchdeq's fixed-point iterations are 'fixed_point' here)"
    """
    if isinstance(name, str) and name in ("fixed_point_iter", "simple_fixed_point_iter"):
        return " (torchdeq's fixed-point iterations are 'fixed_point' here)"
    return ""


def solver_options(name: str) -> list[str] | None:
    """Keyword options of solver ``name`` beyond ``max_iter, tol, stop_mode``.

    Returns ``None`` if the solver takes arbitrary keywords.

    Example:
        >>> solver_options("fixed_point")
        ['div_factor', 'patience', 'tau']
    """
    options = _options_of(get_solver(name))
    return None if options is None else list(options)


def _options_of(solver: Callable) -> tuple[str, ...] | None:
    try:
        return _OPTIONS_CACHE[solver]
    except KeyError:
        options = _OPTIONS_CACHE[solver] = _read_options(solver)
        if len(_OPTIONS_CACHE) > 64:  # bounded, like a small LRU cache
            _OPTIONS_CACHE.pop(next(iter(_OPTIONS_CACHE)))
        return options
    except TypeError:  # an unhashable callable object: read its signature each time
        return _read_options(solver)


def _read_options(solver: Callable) -> tuple[str, ...] | None:
    params = list(inspect.signature(solver).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    # every parameter solve can pass by keyword except f and z0 (the first two positional
    # ones): keyword-only options, and positional-or-keyword ones after z0
    # (solver(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", damping=0.5) takes damping)
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple(sorted(p.name for p in params
                        if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)
                        and p not in positional[:2] and p.name not in _COMMON))


# A plain dict, not functools.lru_cache: torch.compile warns when it traces through lru_cache.
_OPTIONS_CACHE: dict[Callable, tuple[str, ...] | None] = {}


def check_options(name: str, opts: dict) -> None:
    """``ValueError`` if ``opts`` holds a keyword solver ``name`` does not take, or a value
    its ``option_checks`` reject.

    Example:
        >>> check_options("anderson", {"m": 3})
        >>> check_options("anderson", {"beta": 2.0})
        Traceback (most recent call last):
            ...
        ValueError: beta must lie in (0.0, 1.0], got 2.0
    """
    solver = get_solver(name)
    if not isinstance(opts, dict):
        raise ValueError(f"options of solver {name!r} must be a dict, got {type(opts).__name__}")
    valid = _options_of(solver)
    unknown = [] if valid is None else sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {name!r}; "
                         f"valid options: {list(valid)}")
    checks = _option_checks(solver)
    for key, value in opts.items():
        if key in (checks or {}):
            checks[key](value)


def solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
          method: str = "anderson", max_iter: int = 50, tol: float = 1e-4,
          stop_mode: str = "rel", **opts) -> tuple[torch.Tensor, SolverStats]:
    """Find ``z = f(z)`` for a batch, per sample, with a registered solver.

    No autograd graph is built (use :class:`wtmodels.DEQ` for gradients). Inside a bf16
    autocast region ``f`` runs under autocast and the solver's own arithmetic in float32.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape; samples independent.
        z0: ``(B, ...)`` initial iterate (float32, float64, or bf16/fp16: solved in float32).
        method: a name from :func:`list_solvers`.
        max_iter: most f-evaluations.
        tol: per-sample tolerance on the residual chosen by ``stop_mode``.
        stop_mode: ``"rel"`` (``||f(z)-z|| / ||f(z)||``) or ``"abs"`` (``||f(z)-z||``).
        **opts: solver options, e.g. ``m``, ``lam``, ``beta`` for ``"anderson"``; unknown ones
            raise ``ValueError`` listing the valid ones.

    Returns:
        ``(z, stats)``: per sample the lowest-residual iterate, and its :class:`SolverStats`.

    Example:
        >>> import torch
        >>> z, stats = solve(lambda z: torch.cos(z), torch.zeros(3, 1), tol=1e-6)
        >>> round(float(z[0]), 4), stats.converged.tolist()
        (0.7391, [True, True, True])
    """
    solver = get_solver(method)
    check_options(method, opts)
    z, stats = check_result(method, solver(f, z0, max_iter=max_iter, tol=tol,
                                           stop_mode=stop_mode, **opts), z0,
                            tol=tol, stop_mode=stop_mode)
    # no graph, as documented, also from a registered solver that ran f with autograd on (a
    # backward through it would reach f's parameters through its last step only)
    # contiguous, as documented, also from a registered solver (a no-op for the built-in ones)
    return (z.detach() if z.requires_grad else z).contiguous(), stats


def check_result(name: str, result, z0: torch.Tensor, *, tol: float | None = None,
                 stop_mode: str | None = None) -> tuple[torch.Tensor, SolverStats]:
    """``result`` if it is ``(z, SolverStats)`` with ``z`` of ``z0``'s shape, device and
    dtype, else ``ValueError`` naming solver ``name`` (a registered solver returning something
    else would otherwise be unpacked into nonsense: a ``(2, D)`` tensor makes two rows; a ``z``
    moved to the CPU, or cast to float64, would make a GPU model's output a CPU tensor, or fail
    deep inside ``f``). Also a ``ValueError`` when a sample reported converged has a non-finite
    ``z`` (solvers other than the built-in ones) or, given the solve's ``tol`` and a
    ``stop_mode`` of ``"rel"`` / ``"abs"``, a lowest residual outside ``[0, tol]`` (or NaN): a
    solver never reports convergence it did not reach.

    Example:
        >>> import torch
        >>> check_result("mine", torch.zeros(2, 3), torch.zeros(2, 3))
        Traceback (most recent call last):
            ...
        ValueError: solver 'mine' must return (z, SolverStats) with z of z0's shape (2, 3), got...
    """
    ok = (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], SolverStats)
          and isinstance(result[0], torch.Tensor) and result[0].shape == z0.shape)
    if ok and result[0].device != z0.device:
        raise ValueError(f"solver {name!r} must return z on the device of z0 ({z0.device}), "
                         f"got {result[0].device}")
    if ok and result[0].dtype != z0.dtype:  # else f fails at the next call (DEQ: f(z*))
        raise ValueError(f"solver {name!r} must return z in the dtype of z0 ({z0.dtype}), "
                         f"got {result[0].dtype}")
    if not ok:
        got = (f"({', '.join(type(r).__name__ for r in result)})" if isinstance(result, tuple)
               else type(result).__name__)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor):
            got += f" with z of shape {tuple(result[0].shape)}"
        raise ValueError(f"solver {name!r} must return (z, SolverStats) with z of z0's shape "
                         f"{tuple(z0.shape)}, got {got}")
    _check_stats(name, result[1], z0.shape[0])
    _check_converged(name, *result, tol, stop_mode)
    return result


def _check_converged(name: str, z: torch.Tensor, stats: SolverStats, tol: float | None,
                     stop_mode: str | None) -> None:
    """``ValueError`` naming solver ``name`` and the first offending samples when a sample it
    reports converged has a non-finite ``z`` or (``tol`` given) a lowest residual of
    ``stop_mode`` that is not ``<= tol``."""
    converged = stats.converged
    # the built-in solvers never return a non-finite z (tested); scanning z costs ~0.6% of a
    # solve on the benchmark's cells, so only the solvers registered by users pay it
    # (by identity: a wrapper object comparing equal to the function it wraps is not it)
    solver = _SOLVERS.get(name)
    if not any(solver is s for s in (fixed_point, anderson, broyden)):
        finite = torch.isfinite(z.reshape(z.shape[0], -1)).all(1).to(converged.device)  # (B,)
        bad = converged & ~finite
        if bool(bad.any()):
            raise ValueError(f"solver {name!r} reported samples {_first(bad)} converged with a "
                             "non-finite z; a sample whose z is not finite has not converged")
    if tol is None or stop_mode not in ("rel", "abs"):  # a registered solver's own mode:
        return  # SolverStats holds no residual of it
    lowest = (stats.rel_lowest if stop_mode == "rel" else stats.abs_lowest).to(converged.device)
    # a checked Fraction or numpy number: what the solver compared with; compared in lowest's
    # dtype (as the solver did), so a tol beyond it (1e39 for float32, 7e4 for float16 stats)
    # is its largest value, not inf (an infinite residual is never within a finite tol)
    tol = min(float(tol), float(torch.finfo(lowest.dtype).max))
    # NaN: not <= tol; a residual is a norm, never negative
    bad = converged & ~((lowest >= 0) & (lowest <= tol))
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(f"solver {name!r} reported samples {_first(bad)} converged with a "
                         f"lowest {stop_mode} residual outside [0, tol={tol:g}] (sample {first}: "
                         f"{float(lowest[first]):.3g}); converged means within tol")


def _first(mask: torch.Tensor, most: int = 5) -> str:
    """The first ``most`` indices where ``mask`` is True, for a message."""
    indices = mask.nonzero().flatten().tolist()
    more = f" and {len(indices) - most} more" if len(indices) > most else ""
    return ", ".join(map(str, indices[:most])) + more


# SolverStats field -> (dimensions, dtype kind): "int" (not bool), "bool" or "float"
_STATS_FIELDS = {"nstep": (1, "int"), "abs_lowest": (1, "float"), "rel_lowest": (1, "float"),
                 "converged": (1, "bool"), "diverged": (1, "bool"), "abs_trace": (2, "float"),
                 "rel_trace": (2, "float")}


def _check_stats(name: str, stats: SolverStats, B: int) -> None:
    """``ValueError`` naming solver ``name`` and the field when ``stats`` is not what
    :class:`SolverStats` documents for a batch of ``B``: per-sample tensors ``(B,)``, traces
    ``(B, n_iter)``, ``nstep`` an integer tensor, ``converged`` / ``diverged`` bool and never
    both for one sample (a registered solver's malformed stats were passed on as they came,
    read later as another batch's, or as masks that are floats)."""
    for field, (dims, kind) in _STATS_FIELDS.items():
        value = getattr(stats, field)
        want = "(B,)" if dims == 1 else "(B, n_iter)"
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"solver {name!r} returned SolverStats.{field} of type "
                             f"{type(value).__name__}; it must be a tensor of shape {want}")
        if value.dim() != dims or value.shape[0] != B:
            raise ValueError(f"solver {name!r} returned SolverStats.{field} of shape "
                             f"{tuple(value.shape)}; it must have shape {want} with B = {B}")
        ok = {"bool": value.dtype == torch.bool, "float": value.is_floating_point(),
              "int": not value.is_floating_point() and not value.is_complex()
              and value.dtype != torch.bool}[kind]
        if not ok:
            raise ValueError(f"solver {name!r} returned SolverStats.{field} of dtype "
                             f"{value.dtype}; it must be a {kind} tensor")
    if bool((stats.converged & stats.diverged.to(stats.converged.device)).any()):
        raise ValueError(f"solver {name!r} returned SolverStats with samples both converged "
                         "and diverged (converged means the returned iterate is within tol; "
                         "a diverged sample never is)")


register_solver("fixed_point", fixed_point)
register_solver("anderson", anderson)
register_solver("broyden", broyden)
