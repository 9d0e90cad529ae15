"""``ModelConfig``: every field a model variant or an override can set, and its validation.

Field types stay simple (int, float, str, bool, optional int) so that the training command line
can build one flag per field from ``dataclasses.fields(ModelConfig)``.

Example:
    >>> cfg = ModelConfig(core="unrolled", depth=4, width=16).validate()
    >>> cfg.depth, cfg.stage_widths()
    (4, [16])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from wtmodels.cells import NORMS
from wtmodels.masks import MASK_KINDS, MASK_SCHEDULES, check_masks

CORES = ("unrolled", "deq", "ode", "untied")
GRADS = ("ift", "phantom", "unroll")
STOP_MODES = ("rel", "abs")


@dataclass
class ModelConfig:
    """Architecture, core, mask, solver and ODE settings of an ``ImplicitClassifier``.

    Attributes:
        num_classes: output classes.
        in_chans: input image channels.
        core: ``"unrolled"`` | ``"deq"`` | ``"ode"`` | ``"untied"``.
        depth: cell applications (unrolled), cells (untied), pretrain unroll depth (deq),
            segments / fixed-grid steps (ode).
        width: channels of the first stage; stage i has ``width * 2**i``.
        stages: number of stages (each a core; a stride-2 transition between stages).
        norm: ``"group"`` | ``"layer"`` | ``"none"`` normalisation in cell, stem and transitions.
        norm_groups: GroupNorm groups (must divide every stage width).
        dropout: variational dropout rate inside the cell (one mask per sample per forward).
        weight_norm: weight-normalise the cell convolutions.
        spectral_norm: spectrally normalise the cell convolutions.
        mask_k: masks per cell convolution, 0 = no masks.
        mask_density: share of kept weights per mask, in (0, 1].
        mask_kind: ``"random"`` | ``"bernoulli"`` | ``"nm"``.
        mask_seed: base seed of the masks (same seed, same masks).
        mask_schedule: ``"cyclic"`` (iteration t uses mask t mod K) | ``"block"``.
        f_solver: DEQ forward solver (``wt.list_solvers()``).
        f_max_iter: DEQ forward iteration budget in training.
        f_tol: DEQ forward tolerance.
        b_solver: DEQ backward solver (IFT).
        b_max_iter: DEQ backward iteration budget.
        b_tol: DEQ backward tolerance.
        grad: DEQ gradient, ``"ift"`` | ``"phantom"`` | ``"unroll"``.
        phantom_steps: plain steps ``z <- f(z)`` of the phantom gradient (tau 1).
        stop_mode: solver stopping criterion, ``"rel"`` | ``"abs"``.
        eval_f_max_iter: DEQ forward budget in eval mode (None = ``f_max_iter``).
        ode_method: torchdiffeq method.
        ode_rtol: relative tolerance (adaptive methods).
        ode_atol: absolute tolerance (adaptive methods).
        ode_adjoint: backpropagate through the adjoint ODE (memory independent of the steps;
            the backward pass integrates ``z`` back in time, which is ill-conditioned where the
            cell's norms see a near-zero input: with GroupNorm from ``z0 = 0`` its gradients
            were measured 30-190% off direct backprop; within ~1e-3 with ``norm="none"``).
        ode_T: integration end time.

    Example:
        >>> ModelConfig(core="deq", depth=4, width=16, stages=2).validate().stage_widths()
        [16, 32]
        >>> ModelConfig(core="deep").validate()
        Traceback (most recent call last):
        ...
        ValueError: unknown core 'deep'; valid choices: unrolled, deq, ode, untied
    """

    num_classes: int = 10
    in_chans: int = 3
    core: str = "unrolled"
    depth: int = 6
    width: int = 32
    stages: int = 1
    norm: str = "group"
    norm_groups: int = 8
    dropout: float = 0.0
    weight_norm: bool = False
    spectral_norm: bool = False
    mask_k: int = 0
    mask_density: float = 0.5
    mask_kind: str = "random"
    mask_seed: int = 0
    mask_schedule: str = "cyclic"
    f_solver: str = "anderson"
    f_max_iter: int = 30
    f_tol: float = 1e-4
    b_solver: str = "anderson"
    b_max_iter: int = 30
    b_tol: float = 1e-6
    grad: str = "ift"
    phantom_steps: int = 5
    stop_mode: str = "rel"
    eval_f_max_iter: int | None = None
    ode_method: str = "dopri5"
    ode_rtol: float = 1e-3
    ode_atol: float = 1e-3
    ode_adjoint: bool = False
    ode_T: float = 3.0

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build and validate from a dict; unknown keys raise ``ValueError`` listing the fields.

        Example:
            >>> ModelConfig.from_dict({"depth": 3}).depth
            3
        """
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown model field(s) {', '.join(unknown)}; valid fields: "
                f"{', '.join(cls.field_names())}"
            )
        return cls(**values).validate()

    def stage_widths(self) -> list[int]:
        """Channels of each stage: ``width * 2**i``."""
        return [self.width * 2**i for i in range(self.stages)]

    def validate(self) -> ModelConfig:
        """Check every field; raise ``ValueError`` naming the field and what is allowed.

        Numpy scalars (a sweep over ``np.arange`` / ``np.linspace``) become the Python
        numbers they hold, so the config stays JSON-serialisable.

        Returns:
            ``self``.
        """
        for name in self.field_names():
            value = getattr(self, name)
            if isinstance(value, np.generic) and value.ndim == 0:
                setattr(self, name, value.item())
        for name in ("num_classes", "in_chans", "depth", "width", "stages", "norm_groups",
                     "f_max_iter", "b_max_iter", "phantom_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("mask_k", self.mask_k, minimum=0)
        _check_int("mask_seed", self.mask_seed, minimum=0)
        if self.eval_f_max_iter is not None:
            _check_int("eval_f_max_iter", self.eval_f_max_iter, minimum=1)
        for name in ("weight_norm", "spectral_norm", "ode_adjoint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_choice("core", self.core, CORES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mask_kind", self.mask_kind, MASK_KINDS)
        _check_choice("mask_schedule", self.mask_schedule, MASK_SCHEDULES)
        _check_choice("grad", self.grad, GRADS)
        _check_choice("stop_mode", self.stop_mode, STOP_MODES)
        _check_float("mask_density", self.mask_density)
        if not 0.0 < self.mask_density <= 1.0:
            raise ValueError(f"mask_density must be in (0, 1], got {self.mask_density}")
        _check_float("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("f_tol", "b_tol", "ode_rtol", "ode_atol", "ode_T"):
            _check_float(name, getattr(self, name))
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got "
                                 f"{getattr(self, name)}")
        if self.ode_adjoint and self.dropout > 0:
            raise ValueError("ode_adjoint with dropout > 0 is not supported: the adjoint "
                             "backward re-evaluates the cell, with the dropout masks of the "
                             "latest forward pass rather than of the one being differentiated")
        if self.ode_adjoint and self.spectral_norm:
            raise ValueError("ode_adjoint with spectral_norm is not supported: the adjoint "
                             "backward re-evaluates the cell, and each evaluation advances "
                             "spectral norm's power iteration (a different weight than the one "
                             "being differentiated; use weight_norm or ode_adjoint=False)")
        if self.norm == "group":
            for w in self.stage_widths():
                if w % self.norm_groups:
                    raise ValueError(
                        f"norm_groups={self.norm_groups} must divide every stage width "
                        f"{self.stage_widths()} (width * 2**stage)"
                    )
        if self.mask_k:  # what drawing the masks would refuse, refused before any build
            for w in self.stage_widths():
                try:
                    check_masks((w, w, 3, 3), self.mask_k, self.mask_density, self.mask_kind)
                except ValueError as err:
                    raise ValueError(
                        f"mask_k={self.mask_k}, mask_density={self.mask_density}, mask_kind="
                        f"{self.mask_kind!r} cannot mask the cell convolutions of width {w} "
                        f"(weight {w}x{w}x3x3): {err}"
                    ) from None
        # Names are checked whatever the core: a misspelt solver or method is an error even
        # where the field is unused, never silently ignored.
        from wtmodels.solvers import list_solvers

        _check_choice("f_solver", self.f_solver, tuple(list_solvers()))
        _check_choice("b_solver", self.b_solver, tuple(list_solvers()))
        if self.core == "ode" or self.ode_method != ModelConfig.ode_method:
            # the default is one of torchdiffeq's methods (tests/data/test_digits_split.py):
            # importing torchdiffeq, with scipy half a second, for a model that solves no ODE
            # only to check the default would lengthen every such process's start
            from wtmodels.ode import check_method

            check_method(self.ode_method)
        return self


#: fields read only by one core: on a model of another core they have no effect
CORE_ONLY_FIELDS = {
    "deq": ("f_solver", "f_max_iter", "f_tol", "b_solver", "b_max_iter", "b_tol", "grad",
            "phantom_steps", "stop_mode", "eval_f_max_iter"),
    "ode": ("ode_method", "ode_rtol", "ode_atol", "ode_adjoint", "ode_T"),
}
#: fields read only when the cell convolutions are masked (``mask_k > 0``)
MASK_FIELDS = ("mask_density", "mask_kind", "mask_seed", "mask_schedule")


def fields_without_effect(config: ModelConfig) -> dict[str, str]:
    """The fields a model built from ``config`` never reads, each with the reason.

    Solver fields on a non-DEQ core, ODE fields on a non-ODE core, mask fields without masks,
    ``norm_groups`` without GroupNorm, ``ode_rtol`` / ``ode_atol`` with a fixed-grid
    ``ode_method`` (rk4, euler, ...; not ``implicit_adams`` / ``fixed_adams``, whose corrector
    iterates to the tolerances), ``phantom_steps`` with a DEQ ``grad`` other than ``phantom``,
    ``f_solver`` with ``grad="unroll"``.
    (Within a DEQ the backward-solver fields stay in the config whatever ``grad`` is.)

    Example:
        >>> sorted(fields_without_effect(ModelConfig(core="unrolled")))[:2]
        ['b_max_iter', 'b_solver']
        >>> fields_without_effect(ModelConfig(core="unrolled"))["mask_density"]
        'read only with mask_k > 0'
        >>> fields_without_effect(ModelConfig(core="ode", ode_method="rk4"))["ode_rtol"][-16:]
        "fixed-grid 'rk4'"
        >>> fields_without_effect(ModelConfig(core="deq", grad="ift"))["phantom_steps"]
        "read only with grad 'phantom'"
        >>> adams = ModelConfig(core="ode", ode_method="implicit_adams")
        >>> "ode_rtol" in fields_without_effect(adams)  # its corrector iterates to the tolerances
        False
    """
    unused = {}
    for core, names in CORE_ONLY_FIELDS.items():
        if config.core != core:
            unused.update((n, f"read by core {core!r} only") for n in names)
    if config.mask_k == 0:
        unused.update((n, "read only with mask_k > 0") for n in MASK_FIELDS)
    if config.norm != "group":
        unused["norm_groups"] = "read only with norm 'group'"
    if config.core == "deq" and config.grad != "phantom":
        unused["phantom_steps"] = "read only with grad 'phantom'"
    if config.core == "deq" and config.grad == "unroll":  # plain iteration, no solver call
        unused["f_solver"] = "read only with grad 'ift' or 'phantom'; unroll iterates plainly"
    if config.core == "ode":
        from wtmodels.ode import reads_tolerances

        # fixed steps of T / depth: no error control (but the implicit Adams corrector
        # iterates to the tolerances)
        if not reads_tolerances(config.ode_method):
            unused.update((n, f"read only by an adaptive ode_method or implicit_adams / "
                              f"fixed_adams, not the fixed-grid {config.ode_method!r}")
                          for n in ("ode_rtol", "ode_atol"))
    return unused


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
