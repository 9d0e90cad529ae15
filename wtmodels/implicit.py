"""Deep equilibrium layer: solve ``z* = f(z*)`` forward, differentiate implicitly backward.

``z_star, stats = DEQ(...)(f, z0)`` where ``f`` closes over its parameters and inputs. Three
ways to get gradients:

- ``"ift"``: the forward solve runs without an autograd graph; one call ``f(z*)`` with autograd
  is the output, and its backward solves the adjoint fixed point ``u = J^T u + grad``
  (``J = df/dz`` at ``z*``) with the backward solver, by vector-Jacobian products. Memory does
  not depend on the number of forward iterations.
- ``"phantom"``: ``phantom_steps`` damped steps ``z <- (1 - tau) z + tau f(z)`` from ``z*``
  with autograd (an inexact, cheap gradient).
- ``"unroll"``: plain iteration ``z <- f(z)`` with autograd for up to the iteration budget
  (samples that reach the tolerance or diverge stop; each sample's lowest-residual iterate is
  the output); memory grows with the iterations. A reference, and the one mode whose
  higher-order derivatives are exact.

``"ift"`` gives first-order gradients only: its backward solve builds no graph, so a
``create_graph=True`` backward through it raises instead of returning a wrong second derivative.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import warnings

import numpy as np
import torch
from torch import nn

from .solvers import (
    check_options,
    check_result,
    get_solver,
    list_solvers,
    solver_options,
    torchdeq_hint,
)
from .solvers.common import (
    DIVERGENCE_DEFAULTS,
    STOP_MODES,
    Problem,
    Tracker,
    check_float,
    check_positive_int,
    coarse_precision,
)
from .solvers.stats import SolverStats

GRAD_MODES = ("ift", "phantom", "unroll")


class DEQ(nn.Module):
    """A parameter-free module that finds and differentiates the fixed point of ``f``.

    Args:
        f_solver: forward solver name (:func:`wtmodels.list_solvers`).
        f_max_iter: forward iteration budget in training mode.
        f_tol: forward tolerance (``stop_mode`` residual).
        b_solver: solver for the adjoint fixed point of ``grad="ift"``.
        b_max_iter: backward iteration budget.
        b_tol: backward tolerance (``stop_mode`` residual).
        grad: ``"ift"``, ``"phantom"`` or ``"unroll"``.
        stop_mode: ``"rel"`` or ``"abs"``, for both solves.
        phantom_steps: damped steps with autograd for ``grad="phantom"``.
        tau: damping of the phantom steps, in ``(0, 1]``.
        eval_f_max_iter: forward budget when ``not self.training`` (default ``f_max_iter``).
        f_opts: extra options of the forward solver (e.g. ``{"m": 5}``), validated now.
        b_opts: extra options of the backward solver.
        jac_reg: compute ``stats.jac_loss`` on every call (or ask per call).
        jac_reg_samples: Hutchinson probe vectors per call.

    The attributes of the same names may be changed after construction (e.g. a model's
    ``set_depth`` sets ``f_max_iter``/``eval_f_max_iter``); every call checks them again.
    ``f_solver``/``f_opts`` serve ``"ift"`` and ``"phantom"`` (``"unroll"`` iterates plainly);
    ``b_*`` serve ``"ift"`` only. ``last_backward_stats`` holds the :class:`SolverStats` of the
    latest adjoint solve (``"ift"``); a forward call in another mode sets it to ``None``.

    Example:
        >>> import torch, wtmodels as wt
        >>> lin = torch.nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(0.3)
        >>> x = torch.randn(8, 4)
        >>> deq = wt.DEQ(f_tol=1e-5)
        >>> z, stats = deq(lambda z: torch.tanh(lin(z)) + x, torch.zeros(8, 4))
        >>> z.sum().backward()
        >>> lin.weight.grad.shape, bool(stats.converged.all())
        (torch.Size([4, 4]), True)
    """

    def __init__(self, f_solver: str = "anderson", f_max_iter: int = 30, f_tol: float = 1e-4,
                 b_solver: str = "anderson", b_max_iter: int = 30, b_tol: float = 1e-6,
                 grad: str = "ift", stop_mode: str = "rel", phantom_steps: int = 5,
                 tau: float = 1.0, eval_f_max_iter: int | None = None,
                 f_opts: dict | None = None, b_opts: dict | None = None,
                 jac_reg: bool = False, jac_reg_samples: int = 1, **unknown):
        super().__init__()
        if unknown:  # a ValueError naming the valid options, as for every other bad setting
            raise ValueError(_unknown_keywords("DEQ", unknown, list(_DEFAULTS)))
        self.f_solver, self.b_solver = f_solver, b_solver
        self.f_max_iter, self.b_max_iter = f_max_iter, b_max_iter
        self.f_tol, self.b_tol = f_tol, b_tol
        self.grad, self.stop_mode = grad, stop_mode
        self.phantom_steps, self.tau = phantom_steps, tau
        self.eval_f_max_iter = eval_f_max_iter
        self.f_opts = dict(f_opts or {}) if isinstance(f_opts, dict | None) else f_opts
        self.b_opts = dict(b_opts or {}) if isinstance(b_opts, dict | None) else b_opts
        self.jac_reg, self.jac_reg_samples = jac_reg, jac_reg_samples
        self.last_backward_stats: SolverStats | None = None
        self._warned_backward = False
        self._copy_z = False  # f writes its argument in place: differentiate through a copy
        self.check_settings()

    def check_settings(self) -> None:
        """``ValueError`` naming the field and its valid choices for any bad setting, solver
        option values included (run at construction and on every call).

        Example:
            >>> import wtmodels as wt
            >>> deq = wt.DEQ()
            >>> deq.f_opts = {"m": 0}
            >>> deq.check_settings()
            Traceback (most recent call last):
                ...
            ValueError: m must be an integer >= 1, got 0
        """
        for field in ("f_solver", "b_solver"):
            if getattr(self, field) not in list_solvers():
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; valid solvers: "
                                 f"{list_solvers()}{torchdeq_hint(getattr(self, field))}")
        if self.grad not in GRAD_MODES:
            hint = ""
            if isinstance(self.grad, numbers.Integral) and not isinstance(self.grad, bool):
                hint = (f" (torchdeq's grad={self.grad} is grad='phantom', "
                        f"phantom_steps={self.grad} here)")
            raise ValueError(f"grad must be one of {list(GRAD_MODES)}, got {self.grad!r}{hint}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, "
                             f"got {self.stop_mode!r}")
        for field in ("f_max_iter", "b_max_iter", "phantom_steps", "jac_reg_samples"):
            check_positive_int(field, getattr(self, field))
        if self.eval_f_max_iter is not None:
            check_positive_int("eval_f_max_iter", self.eval_f_max_iter)
        check_float("f_tol", self.f_tol, 0.0, high_open=True)
        check_float("b_tol", self.b_tol, 0.0, high_open=True)
        check_float("tau", self.tau, 0.0, 1.0)
        for field in ("f_opts", "b_opts"):  # None means no options, here as in __init__
            if getattr(self, field) is None:
                setattr(self, field, {})
        check_options(self.f_solver, self.f_opts)
        check_options(self.b_solver, self.b_opts)
        if not isinstance(self.jac_reg, bool):
            raise ValueError(f"jac_reg must be a bool, got {self.jac_reg!r}")

    def extra_repr(self) -> str:
        # the main settings always, the others where they differ from their defaults: a
        # printed model shows every setting its DEQ's results depend on
        always = ("f_solver", "f_max_iter", "f_tol", "b_solver", "b_max_iter", "b_tol", "grad")
        keys = list(always) + [k for k, v in _DEFAULTS.items() if k not in always
                               and getattr(self, k, v) not in (v, {} if v is None else v)]
        # a number as itself (a numpy integer's repr is np.int64(30)), anything else by repr
        return ", ".join(f"{k}={_plain(getattr(self, k))}" for k in keys)

    @property
    def budget(self) -> int:
        """Forward iteration budget of the current mode (train or eval)."""
        if not self.training and self.eval_f_max_iter is not None:
            return self.eval_f_max_iter
        return self.f_max_iter

    def forward(self, f, z0: torch.Tensor, *, jac_reg: bool | None = None, **unknown
                ) -> tuple[torch.Tensor, SolverStats]:
        """Fixed point of ``f`` from ``z0``, differentiable w.r.t. what ``f`` closes over.

        Args:
            f: maps ``(B, ...)`` to the same shape; samples independent.
            z0: ``(B, ...)`` initial guess (no gradient flows to it).
            jac_reg: overrides the module's ``jac_reg`` for this call.

        Returns:
            ``(z_star, stats)``; ``stats.jac_loss`` set when Jacobian regularisation is on.
            ``z_star`` is ``f`` applied once at the solver's iterate (``"ift"``), the phantom
            steps' result from it (``"phantom"``), or ``f`` at each sample's lowest-residual
            unrolled iterate (``"unroll"``), with autograd on or off alike: evaluation under
            ``torch.no_grad()`` computes the function that training differentiates. It has
            ``z0``'s dtype in every mode (under autocast ``f`` may return another). A sample
            whose ``z0`` is non-finite comes back as it came (flagged diverged), outside the
            graph: a loss that leaves it out keeps finite gradients.
        """
        if unknown:
            raise ValueError(_unknown_keywords("DEQ.forward", unknown, ["jac_reg"]))
        self.check_settings()
        if not isinstance(z0, torch.Tensor):
            raise ValueError(f"z0 must be a tensor of shape (B, ...), got {type(z0).__name__}")
        if jac_reg is not None and not isinstance(jac_reg, bool):
            raise ValueError(f"jac_reg must be a bool or None, got {jac_reg!r}")
        jac = self.jac_reg if jac_reg is None else jac_reg
        if self.grad != "ift":  # no adjoint solve will follow: not the stats of an older one
            self.last_backward_stats = None
        start_bad = _nonfinite_rows(z0)
        if start_bad is not None:
            # a sample with a non-finite start (e.g. a warm start cached from a step that
            # blew up) comes back as it came (the solvers flag it diverged); f never sees it
            # with autograd: f(NaN) in the graph would make every shared parameter's gradient
            # NaN (0 x NaN), also when the loss leaves that sample out
            f_user, zero = f, torch.zeros((), dtype=z0.dtype, device=z0.device)
            f = lambda z: f_user(torch.where(start_bad, zero, z))  # noqa: E731
        if self.grad == "unroll":
            z_star, stats, z_in, z_out = self._unroll(f, z0, jac)
        else:
            solver = get_solver(self.f_solver)
            z_sol, stats = check_result(self.f_solver, solver(
                f, z0.detach(), max_iter=self.budget, tol=self.f_tol, stop_mode=self.stop_mode,
                **self.f_opts), z0, tol=self.f_tol, stop_mode=self.stop_mode)
            z_in = z_out = None
            if torch.is_grad_enabled():
                _drop_casts_without_history(z0.device.type)
            # the output is the same function of the inputs with autograd on or off (eval
            # metrics must come from the model that was trained): f at the solver's iterate
            # ("ift"), or the phantom steps from it
            if self.grad == "phantom":
                z_star = self._phantom(f, z_sol.detach(), stats)
            elif torch.is_grad_enabled():
                z_star, z_in, z_out = self._ift(f, z_sol)
                z_star = z_star.to(z0.dtype)  # f's output dtype may differ (autocast)
            else:  # a copy: f may return one buffer on every call (the next call's output)
                # (on a copy when jac_reg reads z_sol again: f may write its argument)
                z_star = f(z_sol.clone() if jac else z_sol).to(z0.dtype, copy=True)
        if jac:
            if z_in is not None and z_out is None and z_in.requires_grad:  # (see _unroll)
                z_out = self._f_of(f, z_in)
            stats.jac_loss = self.jacobian_loss(f, z_sol if z_in is None else z_in, z_out)
        if start_bad is not None:
            z_star = torch.where(start_bad, z0.detach().to(z_star.dtype), z_star)
        return z_star, stats

    def _phantom(self, f, z_sol: torch.Tensor, stats: SolverStats) -> torch.Tensor:
        """``phantom_steps`` damped steps from ``z_sol`` with autograd.

        A diverged sample, or one whose steps overflow (the steps are then taken again),
        restarts each step from its (finite) solver iterate, so it takes one step in effect: a
        non-finite value in the graph would turn every shared parameter's gradient into NaN
        (0 x inf), not only its own. One finiteness check per call, none per step.
        """
        frozen = stats.diverged.to(z_sol.device)  # (B,)
        z = self._phantom_steps(f, z_sol, frozen)
        bad = ~torch.isfinite(z.detach()).reshape(z.shape[0], -1).all(1) & ~frozen
        if bool(bad.any()):
            z = self._phantom_steps(f, z_sol, frozen | bad)
        return z

    def _phantom_steps(self, f, z_sol: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        keep_at_start = frozen.view(-1, *([1] * (z_sol.dim() - 1))) if bool(frozen.any()) else None
        z = z_sol
        for step in range(self.phantom_steps):
            z_in = z if keep_at_start is None else torch.where(keep_at_start, z_sol, z)
            if step == 0 and not getattr(self, "_copy_z", False):
                # z_sol is read again (the damping, frozen samples, the retry): f gets a copy,
                # and if f writes it, every later call gets one too (see _f_of)
                arg = z_in.clone()
                version = None if arg.is_inference() else arg._version  # (no counter)
                fz = f(arg)
                self._copy_z = version is not None and arg._version != version
            else:
                fz = self._f_of(f, z_in)
            z = torch.lerp(z_in, fz.to(z_in.dtype), self.tau)
        return z

    def _ift(self, f, z_sol: torch.Tensor):
        """``f(z_sol)`` whose backward solves the adjoint fixed point."""
        z_in = z_sol.detach().requires_grad_()
        z_out = self._f_at(f, z_in)
        if not _reaches_beyond(z_out, z_in):
            # nothing f closes over requires grad (a frozen f, or one of constants): z_star
            # carries no graph, as in the other modes, and a backward runs no adjoint solve;
            # a copy, not f's own output (f may return a tensor it closes over); no adjoint
            # solve will follow, so not the stats of an older one either
            self.last_backward_stats = None
            return z_out.detach().clone(), z_in, z_out
        return _AdjointSolve.apply(z_out, z_in, self, _coarsest_dtype(z_in, z_out)), z_in, z_out

    def _f_of(self, f, z: torch.Tensor) -> torch.Tensor:
        """``f(z)``, for an ``f`` that writes its argument in place (see
        :class:`~wtmodels.solvers.common.Problem`) ``f`` at the written ``z``, on a copy.

        The first such call is seen by ``z``'s version counter (no tensor operation); ``f`` is
        then evaluated again on a copy, and this module hands ``f`` copies from then on. One
        that returns its argument written in place raises ``ValueError``, as in the solvers.
        An inference tensor has no version counter: ``f`` always gets a copy of it, as from
        the solvers under ``torch.inference_mode``.
        """
        if getattr(self, "_copy_z", False):
            return f(z.clone())
        if z.is_inference():  # no version counter: a write would go unseen (and the unrolled
            return f(z.clone())  # residuals, the damped phantom steps read z again): a copy
        version = z._version
        out = f(z)
        if z._version != version:
            Problem.check_unmodified(z, out)
            self._copy_z = True
            out = f(z.clone())
        return out

    def _f_at(self, f, z_in: torch.Tensor) -> torch.Tensor:
        """``f(z_in)`` for a leaf ``z_in`` that requires grad, differentiable w.r.t. it.

        An ``f`` that writes its argument in place (a pre-activation cell starting with
        ``nn.ReLU(inplace=True)``, which the solvers and the other modes accept) would fail
        on the leaf with autograd's "a leaf Variable that requires grad is being used in an
        in-place operation": it gets a copy instead (from then on, for this module, without
        trying the leaf first), so the vector-Jacobian products still reach ``z_in``.
        """
        if not getattr(self, "_copy_z", False):  # (a DEQ pickled before it existed)
            try:
                return f(z_in)
            except RuntimeError as e:
                if "leaf Variable that requires grad" not in str(e):
                    raise
            self._copy_z = True
        return f(z_in.clone())

    def _backward_solve(self, z_out: torch.Tensor, z_in: torch.Tensor,
                        grad: torch.Tensor, coarse: torch.dtype | None = None
                        ) -> torch.Tensor:
        """Solve ``u = J^T u + grad`` (``J = dz_out/dz_in``) with the backward solver.

        ``coarse``: the bf16/fp16 dtype the forward ran in (autocast, a low-precision ``z0``),
        whose rounding the vector-Jacobian products carry: residual bumps at its floor are
        then not read as divergence (see :func:`~wtmodels.solvers.common.coarse_precision`).
        """
        # solved in float32 at least: a bf16 gradient (autocast) would round every iterate
        g = _at_least_float32(grad)
        scale = None
        if self.stop_mode == "rel" and g.dim() >= 1 and g.numel():
            # the problem is linear in g: solved for g / 2^e per sample (2^e <= max|g_b| <
            # 2^(e+1): exact, the scaling itself rounds nothing), then scaled back. The
            # solvers' rel residual abs / (||f|| + 1e-8) would otherwise read a per-sample
            # gradient near or below 1e-8 (a small or down-scaled loss) as converged early:
            # "rel" must not depend on the loss's scale
            B = g.shape[0]
            peak = g.detach().abs().reshape(B, -1).amax(1)  # max|.|: no over/underflow
            peak = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1.0)
            peak = torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent - 1)
            scale = peak.view(B, *([1] * (g.dim() - 1)))
            g = g / scale

        def adjoint(u):
            vjp = torch.autograd.grad(z_out, z_in, u.to(z_out.dtype), retain_graph=True,
                                      allow_unused=True)[0]
            return g if vjp is None else vjp.to(g.dtype) + g  # None: f ignores z, J = 0

        solver = get_solver(self.b_solver)
        with coarse_precision(coarse):
            u, stats = check_result(self.b_solver, solver(
                adjoint, g, max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.stop_mode,
                **self.b_opts), g, tol=self.b_tol, stop_mode=self.stop_mode)
        if scale is not None:  # the adjoint of the loss as it came, and its residuals
            u = u * scale
            peak = peak.to(stats.abs_lowest.device, stats.abs_lowest.dtype)
            stats = dataclasses.replace(stats, abs_lowest=stats.abs_lowest * peak,
                                        abs_trace=stats.abs_trace * peak[:, None])
        self.last_backward_stats = stats
        if not self._warned_backward and bool(stats.diverged.any()):
            # once per module: a training loop would repeat it every step (and code that
            # enters warnings.catch_warnings resets Python's own once-per-place registry)
            self._warned_backward = True
            other = [s for s in ("anderson", "broyden") if s != self.b_solver]
            warnings.warn(
                f"DEQ: the backward (adjoint) solve diverged for some samples (b_solver="
                f"{self.b_solver!r}): their gradients are unreliable. Where f's Jacobian at z* "
                "has spectral radius >= 1 plain iteration of the adjoint always diverges: try "
                f"b_solver={other[0]!r}, or jac_reg to keep f contractive. Shown once per DEQ; "
                "each backward's stats: deq.last_backward_stats", RuntimeWarning, stacklevel=2)
        return u.to(grad.dtype)

    def _unroll(self, f, z0: torch.Tensor, jac: bool = False):
        """Plain iteration ``z <- f(z)`` with autograd from ``z0`` (detached).

        Samples stop once at the tolerance or diverged (the solvers' rule; ``div_factor`` and
        ``patience`` from ``f_opts`` when given) and then sit at their best iterate, which
        keeps its graph. With ``jac`` the returned ``z_in`` (with ``z_out = f(z_in)``, or
        ``None`` when ``f`` is still to be evaluated there) is where each sample's output
        comes from (without, the last iterate: unused): the
        Jacobian term taken there differentiates through the iterations for every sample,
        whenever the others stop, and never at an iterate that ran away.
        The output of a sample is ``f`` at its lowest-residual iterate (as ``"ift"`` returns
        ``f(z*)``), so it always carries a graph, also when ``z0`` itself is best (a warm
        start). A step whose output is non-finite for some samples is evaluated again with
        those samples at their best iterate: a non-finite value left in the graph would make
        every shared parameter's gradient NaN (0 x inf), not only theirs.
        """
        prob = Problem(f, z0)
        tracker = Tracker(prob.x0, self.budget, self.f_tol, self.stop_mode,
                          noise_eps=prob.noise_eps,
                          **{k: self.f_opts.get(k, v) for k, v in DIVERGENCE_DEFAULTS.items()})
        prob.on_coarse_output = tracker.note_noise  # f returning float16: its rounding floor
        B, rel = z0.shape[0], self.stop_mode == "rel"
        per_sample = (B,) + (1,) * (z0.dim() - 1)
        # iterates; best_at is each sample's best iterate, with its graph (where a stopped
        # sample sits); f gets a copy of z0, as from the solvers
        z = best_at = start = z0.detach().clone()
        best_out = first_out = z_in = z_out = None
        for _ in range(self.budget):
            z_in, z_out = z, self._f_of(f, z)
            with torch.no_grad():
                x = z.detach().reshape(B, -1).to(prob.compute_dtype)
                fx = prob.to_compute(prob.check_output(z_out).detach().reshape(B, -1))
                before = tracker.best_rel if rel else tracker.best_abs
                done = tracker.update(x, fx, fx - x)
                improved = (tracker.best_rel if rel else tracker.best_abs) < before  # (B,)
                # the tracker records a non-finite output (or overflowing norm) as inf
                finite = np.isfinite(tracker.abs_trace[:, tracker.n_iter - 1])  # (B,)
            if not finite.all():  # redo the step with those samples at their best
                z_in = torch.where(tracker.small.torch(finite).view(per_sample), z, best_at)
                z_out = self._f_of(f, z_in)
            if best_out is None:  # the first step (best_at is z0): f(z0), kept for prefer_start
                # a copy unless autograd made it: f may return one buffer on every call
                first_out = best_out = z_out if z_out.requires_grad else z_out.clone()
            else:
                sel = tracker.small.torch(improved).view(per_sample)
                best_out = torch.where(sel, z_out, best_out)
                best_at = torch.where(sel, z, best_at)
            if done:
                break
            keep = tracker.active_mask.view(per_sample)
            z = torch.where(keep, z_out.to(z.dtype), best_at)
        back = tracker.prefer_start()  # diverged samples whose start was better: f(z0)
        if back is not None:
            best_out = torch.where(tracker.small.torch(back).view(per_sample), first_out,
                                   best_out)
        if jac:
            # the Jacobian term is taken where each sample's output comes from (its best
            # iterate, or its start), not at a last iterate that ran away (an inf jac_loss,
            # every gradient NaN): the last iterate itself for a sample that converges or
            # keeps improving
            at = best_at if back is None else torch.where(
                tracker.small.torch(back).view(per_sample), start, best_at)
            moved = (at != z_in).reshape(B, -1).any(1) | tracker.small.torch(tracker.diverged)
            if bool(moved.any()):
                z_in = torch.where(moved.view(per_sample), at, z_in)
                z_out = None  # f there: evaluated by forward for the Jacobian term
        out = best_out.to(z0.dtype)
        if out is first_out and out.requires_grad:  # f's own output (f(z0) is the best): a
            out = out.clone()  # tensor of its own, which the caller may modify in place
        return out, tracker.stats(), z_in, z_out

    def jacobian_loss(self, f, z_star: torch.Tensor, z_out: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Hutchinson estimate of ``||df/dz||_F^2 / numel`` at ``z_star``, batch mean, 0-dim.

        Uses Rademacher probes ``v``: ``E ||v^T J||^2 = ||J||_F^2``.

        Differentiable w.r.t. the parameters of ``f`` when autograd is on.

        Args:
            f: the map.
            z_star: ``(B, ...)`` point; if ``z_out`` is given, ``z_out = f(z_star)`` with
                ``z_star`` requiring grad (reused instead of calling ``f`` again).
            z_out: optional precomputed ``f(z_star)``.

        Example:
            >>> import torch, wtmodels as wt
            >>> loss = wt.DEQ().jacobian_loss(lambda z: 0.5 * z, torch.ones(2, 100))
            >>> abs(float(loss) - 0.25) < 1e-6
            True
        """
        _needs_autograd("jacobian_loss")
        # checked here too: an attribute set to 0 after construction gave a NaN loss
        check_positive_int("jac_reg_samples", self.jac_reg_samples)
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            if z_out is None or not z_star.requires_grad:
                if create:  # (e.g. after a DEQ forward under no_grad in the same autocast)
                    _drop_casts_without_history(z_star.device.type)
                z_star = _leaf(z_star)
                z_out = self._f_at(f, z_star)
            if not z_out.requires_grad:
                return z_out.new_zeros(())
            total = z_out.new_zeros(())
            for _ in range(self.jac_reg_samples):
                v = torch.randint_like(z_out, 2) * 2 - 1  # Rademacher probe
                vjp = torch.autograd.grad(z_out, z_star, v, retain_graph=True,
                                          create_graph=create, allow_unused=True)[0]
                if vjp is not None and vjp.numel():  # None: f ignores z, J = 0; empty: 0
                    total = total + _at_least_float32(vjp).pow(2).sum() / vjp.numel()
        loss = total / self.jac_reg_samples
        return loss if create else loss.detach()

    def spectral_radius(self, f, z_star: torch.Tensor, n_iter: int = 20) -> torch.Tensor:
        """Power-iteration estimate of the spectral radius of ``df/dz`` at ``z_star``, per sample.

        The estimate is the geometric mean of the growth factors ``||J^T v_k|| / ||v_k||`` over
        the second half of the iterations, which also settles when the dominant eigenvalues
        are a complex pair (where single factors oscillate), but only at a rate ``1 / n_iter``
        where ``J`` is non-normal (15% off at ``n_iter=20`` for a pair of modulus 0.9 beside
        0.3). So where the last two iterates span a 2-D subspace that ``J^T`` maps into itself
        (to a relative residual of ``1e-4``: the dominant pair has taken over), the estimate is
        instead the larger modulus of the Ritz values of ``J^T`` on that subspace, exact for
        the pair; the two iterates count as spanning a plane while the sine of their angle is
        above the square root of the products' eps (1.5e-8 in float64, 3.5e-4 in float32, at
        most 1e-2), so in float64 two close real eigenvalues (0.9 beside 0.89) are resolved
        too. A real dominant eigenvalue, whose iterates align, keeps the mean. Either way it
        converges as fast as the dominant eigenvalue (or pair) separates from the next.

        Args:
            f: the map.
            z_star: ``(B, ...)`` point.
            n_iter: power iterations (vector-Jacobian products).

        Returns:
            ``(B,)`` estimates (no gradient).

        Example:
            >>> import torch, wtmodels as wt
            >>> r = wt.DEQ().spectral_radius(lambda z: 0.7 * z, torch.ones(3, 5))
            >>> torch.allclose(r, torch.full((3,), 0.7))
            True
        """
        check_positive_int("n_iter", n_iter)
        _needs_autograd("spectral_radius")
        if z_star.dim() == 0 or z_star.shape[0] == 0:  # (0, D) crashed in a reshape
            raise ValueError("z_star must be a tensor of shape (B, ...) with B >= 1, got "
                             f"shape {tuple(z_star.shape)}")
        B = z_star.shape[0]
        with torch.enable_grad():
            z_in = _leaf(z_star)
            z_out = self._f_at(f, z_in)
            if not z_out.requires_grad:  # f ignores z: J = 0
                return z_in.new_zeros(B)
            v = torch.randn_like(z_in)
            growth = []  # (B,) per iteration
            pairs = []  # the last two (v_k, J^T v_k), (B, D) float64
            for _ in range(n_iter):
                v = v / (v.reshape(B, -1).norm(dim=1).view(B, *([1] * (v.dim() - 1))) + 1e-30)
                w = torch.autograd.grad(z_out, z_in, v.to(z_out.dtype), retain_graph=True,
                                        allow_unused=True)[0]
                if w is None:
                    return z_in.new_zeros(B)
                growth.append(_at_least_float32(w).reshape(B, -1).norm(dim=1))
                pairs = [*pairs[-1:], (v.detach().reshape(B, -1).double(),
                                       w.detach().reshape(B, -1).double())]
                v = w.to(v.dtype)
        tail = torch.stack(growth[n_iter // 2:])  # (k, B)
        radius = tail.clamp_min(1e-30).log().mean(0).exp()
        if len(pairs) == 2 and pairs[0][0].shape[1] >= 2:
            # two nearly parallel iterates span the dominant pair only as far as the precision
            # of the products resolves their angle: float64 ones down to ~1e-8 (close
            # eigenvalues, 0.9 beside 0.89, stay far from parallel for hundreds of steps)
            eps = torch.finfo(_coarsest_dtype(z_in, z_out)).eps
            ritz = _ritz_radius(*pairs, sin_min=min(1e-2, eps ** 0.5))
            radius = torch.where(torch.isnan(ritz), radius.double(), ritz).to(radius.dtype)
        return torch.where((tail == 0).any(0), 0.0, radius).to(z_in.dtype).detach()


_DEFAULTS = {k: p.default for k, p in inspect.signature(DEQ.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}  # DEQ's settings and defaults


def _plain(value) -> str:
    return str(value) if isinstance(value, numbers.Number) else repr(value)


def _unknown_keywords(where: str, unknown: dict, valid: list[str]) -> str:
    """The message for keywords ``where`` does not take, naming the valid ones (and, for a
    solver option or a name of :func:`wtmodels.solve`, where it belongs)."""
    names = sorted(unknown)
    hint = ""
    solver_opts = sorted({o for s in list_solvers() for o in (solver_options(s) or [])})
    if where == "DEQ" and set(names) & {"max_iter", "tol", "solver", "method"}:
        hint = "; DEQ takes f_/b_-prefixed settings (f_max_iter, f_tol, f_solver, ...)"
    elif where == "DEQ" and set(names) & set(solver_opts):
        hint = f"; solver options ({solver_opts}) go in f_opts / b_opts"
    elif torchdeq := [n for n in names if n in TORCHDEQ_KEYWORDS.get(where, {})]:
        hint = "; torchdeq's " + "; ".join(f"{n}: {TORCHDEQ_KEYWORDS[where][n]}"
                                           for n in torchdeq)
    return f"{where} got unknown keyword(s) {names}; valid: {valid}{hint}"


_NO_STATES = "no equivalent (the DEQ returns z* alone; grad='unroll' backpropagates every step)"
#: torchdeq's keywords that ``DEQ(...)`` (its ``get_deq``'s) and a call (its DEQ's
#: ``forward``'s) do not take, and what to write instead (in the error a torchdeq user's
#: settings get, since torchdeq itself ignores unknown keywords)
TORCHDEQ_KEYWORDS: dict[str, dict[str, str]] = {"DEQ": {
    "f_stop_mode": "stop_mode (one mode for both solves)",
    "b_stop_mode": "stop_mode (one mode for both solves)",
    "ift": "grad='ift' (the default)",
    "hook_ift": "grad='ift' (the default)",
    "eval_factor": "eval_f_max_iter=<iterations> (a count, not a factor)",
    "args": "the settings as keywords (there is no config object)",
    "core": "no equivalent (one core)",
    "n_states": _NO_STATES,
    "indexing": _NO_STATES,
    "sup_gap": _NO_STATES,
    "sup_loc": _NO_STATES,
    "norm_type": "no equivalent (apply weight / spectral norm in the cell)",
    "no_stat": "no equivalent (the statistics are always returned: the per-sample stopping "
               "computes them anyway)",
}, "DEQ.forward": {
    "solver_kwargs": "DEQ(f_opts={...}, b_opts={...}) (solver options, validated when built)",
    "sradius_mode": "deq.spectral_radius(f, z_star) (a separate call)",
    "backward_writer": "deq.last_backward_stats (the latest adjoint solve's statistics)",
}}


def _nonfinite_rows(z0: torch.Tensor) -> torch.Tensor | None:
    """``(B, 1, ...)`` bool mask of the samples of ``z0`` with a non-finite entry, or ``None``
    when there are none (or ``z0`` is not a ``(B, ...)`` float tensor: the solver says why)."""
    if (z0.dim() < 1 or z0.shape[0] < 1 or not z0.is_floating_point() or z0.numel() == 0
            or z0.layout != torch.strided or z0.device.type == "meta"):  # no values to read
        return None
    bad = ~torch.isfinite(z0.detach()).reshape(z0.shape[0], -1).all(1)
    if not bool(bad.any()):
        return None
    return bad.view(-1, *([1] * (z0.dim() - 1)))


def _reaches_beyond(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s graph requires grad through anything other than ``leaf``.

    Walks ``out``'s autograd graph (stopping at the first other input found): a graph whose
    every path ends at ``leaf``'s gradient accumulator depends on nothing else that requires
    grad. An end of any other kind counts as something else, and so does a custom
    ``autograd.Function``: its backward may reach tensors that are not its inputs (a
    reentrant ``torch.utils.checkpoint`` runs the parameters' backward inside its own node),
    so an ``f`` built on one is never taken for a frozen one (at worst an adjoint solve runs
    for nothing).
    """
    if not out.requires_grad:
        return False
    if out.grad_fn is None:  # a leaf: leaf itself (f returned its argument) or another
        return out is not leaf
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        nxt = [n for n, _ in node.next_functions if n is not None]
        if not nxt and getattr(node, "variable", None) is not leaf:
            return True
        stack.extend(nxt)
    return False


def _ritz_radius(first: tuple[torch.Tensor, torch.Tensor], last: tuple[torch.Tensor, torch.Tensor],
                 sin_min: float = 1e-2, resid_max: float = 1e-4) -> torch.Tensor:
    """The larger Ritz value modulus of ``J^T`` on ``span(v1, v2)`` per sample, from two
    power-iteration steps ``(v1, J^T v1)``, ``(v2, J^T v2)`` (unit ``v``, ``(B, D)`` float64);
    NaN where that span is not (nearly) invariant or the sine of the angle between ``v1`` and
    ``v2`` is below ``sin_min`` (the span's second direction would be rounding noise).

    With ``Y = [v1 v2] = QR`` and ``W = J^T Y``: ``H = Q^T W R^-1`` is ``J^T`` on the span, and
    ``J^T Q = Q H + E`` with ``E = (W - Q Q^T W) R^-1``: the eigenvalues of ``H`` are those of
    ``J^T`` moved by at most ``||E||`` (times their condition number).
    """
    Y = torch.stack([first[0], last[0]], dim=2)  # (B, D, 2)
    W = torch.stack([first[1], last[1]], dim=2)
    Q, R = torch.linalg.qr(Y)
    M = Q.transpose(1, 2) @ W  # (B, 2, 2)
    diag = R.diagonal(dim1=1, dim2=2).abs()
    ok = diag[:, 1] > sin_min * diag[:, 0]  # the angle between v1 and v2 (unit vectors)
    eye = torch.eye(2, dtype=R.dtype, device=R.device)
    R = torch.where(ok[:, None, None], R, eye)  # the rows not ok are discarded below
    H = torch.linalg.solve_triangular(R, M, upper=True, left=False)
    E = torch.linalg.solve_triangular(R, W - Q @ M, upper=True, left=False)
    mu = torch.linalg.eigvals(H).abs().amax(1)
    scale = torch.maximum(mu, W.flatten(1).norm(dim=1) / 2**0.5)
    ok &= E.flatten(1).norm(dim=1) <= resid_max * scale
    ok &= torch.isfinite(mu) & (scale > 0)
    return torch.where(ok, mu, torch.nan)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as is when it is float64 (a bf16 gradient rounds every iterate)."""
    return t if t.dtype == torch.float64 else t.float()


def _needs_autograd(what: str) -> None:
    if torch.is_inference_mode_enabled():
        hint = (" (the jac_reg=True term: pass jac_reg=False to the call to skip it)"
                if what == "jacobian_loss" else "")
        raise RuntimeError(f"DEQ.{what}{hint} needs autograd (vector-Jacobian products); call "
                           "it outside torch.inference_mode() (torch.no_grad() is fine)")


def _coarsest_dtype(z_in: torch.Tensor, z_out: torch.Tensor) -> torch.dtype | None:
    """The coarsest of the autocast dtype in force (on ``z_in``'s device) and the dtypes of
    ``z_in`` and ``z_out``: the precision ``f``'s vector-Jacobian products carry."""
    device = z_in.device.type
    dtypes = [z_in.dtype, z_out.dtype]
    if torch.is_autocast_enabled(device):
        dtypes.append(torch.get_autocast_dtype(device))
    return max((t for t in dtypes if t.is_floating_point), key=lambda t: torch.finfo(t).eps)


def _drop_casts_without_history(device: str) -> None:
    """Empty autocast's cache of low-precision weight copies before calls with autograd.

    ``f`` evaluated under ``no_grad`` inside an autocast region (the solve) leaves copies of
    its weights without autograd history in that cache; torch before ~2.10 hands them to later
    calls with autograd too, silently cutting the weights out of the graph (their ``.grad``
    stayed ``None``). The cache refills, with history, at the next call.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     _drop_casts_without_history("cpu")
    """
    if torch.is_autocast_enabled(device):
        torch.clear_autocast_cache()


def _leaf(z: torch.Tensor) -> torch.Tensor:
    """``z`` as a fresh leaf requiring grad (an inference tensor is copied first)."""
    return (z.clone() if z.is_inference() else z).detach().requires_grad_()


class _AdjointSolve(torch.autograd.Function):
    """Identity forward; backward replaces ``grad`` by the adjoint fixed point solution."""

    @staticmethod
    def forward(ctx, z_out, z_in, deq, coarse):
        ctx.graph = (z_out, z_in, deq)  # kept as attributes: a graph, not saved tensors
        ctx.coarse = coarse
        return z_out.clone()  # a tensor of its own: the caller may modify it in place

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a higher-order derivative
            raise RuntimeError(
                "DEQ(grad='ift') gives first-order gradients only (its backward solve builds "
                "no graph); use grad='unroll' for higher-order derivatives (create_graph=True)")
        z_out, z_in, deq = ctx.graph
        try:
            u = deq._backward_solve(z_out, z_in, grad, ctx.coarse)
        except RuntimeError as e:  # is_grads_batched=True, jacobian(vectorize=True): vmap
            if "atching rule" not in str(e) and "vmap" not in str(e):
                raise
            raise RuntimeError(
                "DEQ(grad='ift') cannot differentiate batched gradients (autograd.grad with "
                "is_grads_batched=True, torch.autograd.functional.jacobian(vectorize=True)): "
                "its adjoint solve stops per sample on the values; use vectorize=False (one "
                "backward per row), or grad='unroll'") from e
        return u, None, None, None
