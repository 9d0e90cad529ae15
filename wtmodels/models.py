"""Image classifiers built around a weight-tied cell, and the model registry.

``ImplicitClassifier``: stem -> stages (one core each, a stride-2 transition between stages) ->
head (adaptive average pool + linear), so any input size works. The core of every stage runs the
same kind of cell unrolled, as a DEQ, as an ODE or untied (:mod:`wtmodels.cores`); masks are
attached to the cells after the model is built (:func:`wtmodels.masks.apply_masks`).

Named variants are three-line factories filling a dict of :class:`ModelConfig` fields:

=========  =====================================================================
family     variants
=========  =====================================================================
unrolled   ``wt_s``, ``wt_m``, ``test_wt``
deq        ``deq_s``, ``deq_m``, ``test_deq``
ode        ``ode_s``, ``ode_m``, ``test_ode``
untied     ``untied_s``, ``untied_m``, ``test_untied``
=========  =====================================================================

Example:
    >>> import torch, wtmodels as wt
    >>> model = wt.create_model("test_wt", num_classes=10, in_chans=1, mask_k=2)
    >>> model(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    >>> model.core_stats()
    {'cell_evals': 2.0}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wtmodels.accounting import model_summary
from wtmodels.cells import ConvCell, make_norm
from wtmodels.cores import Core, DEQCore, UnrolledCore, UntiedCore, eager_under_compile
from wtmodels.masks import apply_masks, derive_seed
from wtmodels.model_config import CORES, ModelConfig

__all__ = [
    "CORES",
    "ImplicitClassifier",
    "ModelConfig",
    "build_core",
    "create_model",
    "get_config",
    "list_models",
    "model_summary",
    "register_model",
]

# --------------------------------------------------------------------------------------------
# Model


def _conv_norm_relu(cin: int, cout: int, stride: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        make_norm(cfg.norm, cout, cfg.norm_groups),
        nn.ReLU(inplace=True),
    )


def _make_cell(width: int, cfg: ModelConfig) -> ConvCell:
    return ConvCell(
        width,
        norm=cfg.norm,
        norm_groups=cfg.norm_groups,
        dropout=cfg.dropout,
        weight_norm=cfg.weight_norm,
        spectral_norm=cfg.spectral_norm,
    )


def _mask(cell: nn.Module, cfg: ModelConfig, seed: int) -> None:
    if cfg.mask_k:
        apply_masks(
            cell, cfg.mask_k, cfg.mask_density, cfg.mask_kind, seed, cfg.mask_schedule
        )


def build_core(width: int, cfg: ModelConfig, stage: int = 0) -> Core:
    """Build the core of one stage (cell(s) + masks) from a config.

    Masks are drawn with seed ``derive_seed(mask_seed, "stage", stage)``; the cells of an untied
    core all get the same masks (cell t uses mask ``mask_index(t)``), so it differs from the
    tied core only by untying the weights.

    Args:
        width: channels of the stage.
        cfg: a validated :class:`ModelConfig`.
        stage: stage index (seeds the masks).

    Returns:
        The core module.

    Example:
        >>> core = build_core(16, ModelConfig(core="unrolled", depth=3))
        >>> type(core).__name__
        'UnrolledCore'
    """
    seed = derive_seed(cfg.mask_seed, "stage", stage)
    if cfg.core == "untied":
        cells = [_make_cell(width, cfg) for _ in range(cfg.depth)]
        for cell in cells:
            _mask(cell, cfg, seed)
        return UntiedCore(cells)
    cell = _make_cell(width, cfg)
    _mask(cell, cfg, seed)
    if cfg.core == "unrolled":
        return UnrolledCore(cell, cfg.depth)
    if cfg.core == "deq":
        from wtmodels.implicit import DEQ

        deq = DEQ(
            f_solver=cfg.f_solver,
            f_max_iter=cfg.f_max_iter,
            f_tol=cfg.f_tol,
            b_solver=cfg.b_solver,
            b_max_iter=cfg.b_max_iter,
            b_tol=cfg.b_tol,
            grad=cfg.grad,
            stop_mode=cfg.stop_mode,
            phantom_steps=cfg.phantom_steps,
            eval_f_max_iter=cfg.eval_f_max_iter,
        )
        return DEQCore(cell, deq, cfg.depth)
    if cfg.core == "ode":
        from wtmodels.ode import ODECore

        if cfg.ode_adjoint and cfg.norm != "none" and stage == 0:  # once per model
            warnings.warn(
                f"ode_adjoint with norm={cfg.norm!r}: the adjoint re-integrates z backward, "
                "which is ill-conditioned where the norms see a near-zero input (from z0 = 0 "
                "gradients were measured 30-190% off direct backprop); prefer direct backprop "
                "or norm='none'", UserWarning, stacklevel=3)
        return ODECore(
            cell,
            cfg.depth,
            T=cfg.ode_T,
            method=cfg.ode_method,
            rtol=cfg.ode_rtol,
            atol=cfg.ode_atol,
            adjoint=cfg.ode_adjoint,
        )
    raise ValueError(f"unknown core {cfg.core!r}; valid cores: {', '.join(CORES)}")


@eager_under_compile
def _run_eager(core: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``core(x)``, outside any graph torch.compile captures (eager, a graph break)."""
    return core(x)


#: torch 2.4's dynamo fails inside the solvers ("'NoneType' object has no attribute
#: 'as_proxy'"; 2.5 and later trace them, with graph breaks): there a DEQ core runs eagerly
DEQ_EAGER_UNDER_COMPILE = torch.torch_version.TorchVersion(torch.__version__) < (2, 5)


def _runs_eagerly(core: nn.Module) -> bool:
    """Whether ``core`` runs outside torch.compile's graphs: a DEQ core computing its Jacobian
    regulariser (a double backward, which compiled graphs refuse), and any DEQ core on torch 2.4.
    """
    return getattr(core, "jac_reg", False) or (DEQ_EAGER_UNDER_COMPILE
                                               and isinstance(core, DEQCore))


class ImplicitClassifier(nn.Module):
    """stem -> stages of cores (stride-2 transitions between) -> adaptive pool -> linear.

    Args:
        config: a :class:`ModelConfig` (validated here).

    Example:
        >>> import torch
        >>> model = ImplicitClassifier(ModelConfig(in_chans=1, depth=2, width=8, stages=2))
        >>> model(torch.randn(2, 1, 12, 12)).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        widths = config.stage_widths()
        self.stem = _conv_norm_relu(config.in_chans, widths[0], 1, config)
        self.cores = nn.ModuleList(build_core(w, config, i) for i, w in enumerate(widths))
        self.transitions = nn.ModuleList(
            _conv_norm_relu(a, b, 2, config) for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, C_last)`` of images ``(B, in_chans, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            # an unbatched (C, H, W) image otherwise failed deep inside (GroupNorm or the head)
            raise ValueError(
                f"expected images of shape (B, {self.config.in_chans}, H, W) (in_chans="
                f"{self.config.in_chans}); got a tensor of shape {tuple(x.shape)}"
                + (" (add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else "")
            )
        x = self.stem(x)  # (B, C0, H, W)
        for i, core in enumerate(self.cores):
            if i:
                x = self.transitions[i - 1](x)  # (B, Ci, H/2^i, W/2^i)
            x = _run_eager(core, x) if _runs_eagerly(core) else core(x)  # (see _runs_eagerly)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.features(x))

    def core_stats(self) -> dict[str, float]:
        """Statistics of the last forward pass, summed (counts) or averaged over the stages.

        Keys: ``cell_evals`` (cell applications, summed over stages), for DEQ cores ``nstep``,
        ``rel_residual``, ``rel_residual_max``, ``converged``, ``diverged``
        (``SolverStats.summary()``: ``rel_residual_max`` the max, the others
        averaged over stages), for ODE cores ``nfe`` (summed).
        """
        per_stage = [core.last_stats for core in self.cores]
        if not all(per_stage):
            return {}
        out: dict[str, float] = {}
        for key in per_stage[0]:
            values = [float(s[key]) for s in per_stage if key in s]
            if key in ("cell_evals", "nfe"):
                out[key] = sum(values)
            elif key.endswith("_max"):
                out[key] = max(values)
            else:
                out[key] = sum(values) / len(values)
        return out

    def set_jac_reg(self, enabled: bool) -> None:
        """Ask DEQ cores for a Jacobian regulariser on the next forward passes."""
        for core in self.cores:
            core.set_jac_reg(enabled)

    def jac_loss(self) -> torch.Tensor:
        """Sum over DEQ stages of the Jacobian regulariser of the last forward (0-dim tensor).

        ``0.0`` when disabled or when no core is a DEQ.
        """
        losses = [core.jac_loss() for core in self.cores]
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            return torch.zeros((), device=self.head.weight.device)
        return torch.stack([loss.reshape(()) for loss in losses]).sum()

    def set_pretrain(self, enabled: bool) -> None:
        """DEQ cores unroll the cell ``depth`` times (warm-up) instead of solving; others no-op."""
        for core in self.cores:
            core.set_pretrain(enabled)

    def set_depth(self, depth: int) -> None:
        """Test-time depth: unrolled applies the cell ``depth`` times, deq gets a solver budget
        of ``depth`` iterations, ode integrates to ``ode_T * depth / config.depth``; untied raises
        ``ValueError``.
        """
        for core in self.cores:
            core.set_depth(depth)


# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[[], dict]] = {}


def register_model(factory: Callable[[], dict]) -> Callable[[], dict]:
    """Register a variant: a function (named after it) returning a dict of ModelConfig fields.

    Example:
        >>> @register_model
        ... def doc_tiny():
        ...     "A doc-test variant."
        ...     return dict(core="unrolled", depth=2, width=8)
        >>> "doc_tiny" in list_models()
        True
        >>> _ = _REGISTRY.pop("doc_tiny")
    """
    name = getattr(factory, "__name__", None)
    if not callable(factory) or not isinstance(name, str) or not name.isidentifier():
        # @register_model("my_variant") failed with an AttributeError, and a lambda was
        # registered under the name "<lambda>" without a word
        what = repr(factory) if isinstance(factory, str) else type(factory).__name__
        raise ValueError(
            "register_model takes the variant's factory itself, a function named after the "
            "variant that returns a dict of ModelConfig fields (@wt.register_model over "
            f"def my_variant(): return dict(core='unrolled', depth=4)), got {what}"
            + (f" named {name!r}" if isinstance(name, str) else ""))
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    factory.__test__ = False  # the test_* variants are factories, not pytest tests
    return factory


def list_models() -> list[str]:
    """Names of the registered variants, sorted.

    Example:
        >>> import wtmodels as wt
        >>> {"wt_s", "deq_s", "ode_s", "untied_s", "test_wt"} <= set(wt.list_models())
        True
    """
    return sorted(_REGISTRY)


def get_config(name: str, **overrides) -> ModelConfig:
    """The validated config of variant ``name`` with ``overrides`` applied.

    Raises:
        ValueError: unknown name (lists the registered ones), unknown override field (lists the
            fields), or a bad value (names the field and what is allowed).

    Example:
        >>> get_config("wt_s", depth=4).depth
        4
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    fields = _REGISTRY[name]()
    if not isinstance(fields, dict):  # else a TypeError "... is not a mapping"
        raise ValueError(f"model {name!r}: its factory must return a dict of ModelConfig "
                         f"fields, got {type(fields).__name__}")
    return ModelConfig.from_dict({**fields, **overrides})


def create_model(name: str, **overrides) -> ImplicitClassifier:
    """Build variant ``name`` with ``overrides`` (any :class:`ModelConfig` field).

    Example:
        >>> import torch, wtmodels as wt
        >>> model = wt.create_model("test_untied", in_chans=1, num_classes=3)
        >>> model(torch.randn(2, 1, 9, 7)).shape
        torch.Size([2, 3])
    """
    return ImplicitClassifier(get_config(name, **overrides))


# Small: CIFAR-size defaults, cheap enough to train on scikit-learn digits on a laptop CPU.
# All families share one cell. No weight norm by default (on digits, seeds 0-2, deq_s reaches
# 97.8-98.9% without it and 95.8-99.2% with it, the latter with fewer solves converged);
# pass weight_norm=True for MDEQ's choice.
_SMALL = dict(depth=6, width=32, stages=2)
# Medium: wider and deeper.
_MEDIUM = dict(depth=8, width=64, stages=3)
# Tiny: trains in seconds in the tests.
_TINY = dict(depth=2, width=8, stages=1, norm_groups=4)


@register_model
def wt_s():
    """Weight-tied cell unrolled, small.

    Example:
        >>> cfg = get_config("wt_s")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('unrolled', 6, [32, 64])
    """
    return dict(core="unrolled", **_SMALL)


@register_model
def wt_m():
    """Weight-tied cell unrolled, medium.

    Example:
        >>> cfg = get_config("wt_m")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('unrolled', 8, [64, 128, 256])
    """
    return dict(core="unrolled", **_MEDIUM)


@register_model
def test_wt():
    """Weight-tied cell unrolled, tiny (tests).

    Example:
        >>> cfg = get_config("test_wt")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('unrolled', 2, [8])
    """
    return dict(core="unrolled", **_TINY)


@register_model
def deq_s():
    """DEQ (Anderson, implicit gradient), small.

    Example:
        >>> cfg = get_config("deq_s")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.f_max_iter
        ('deq', 6, [32, 64], 20)
    """
    return dict(core="deq", f_max_iter=20, b_max_iter=20, **_SMALL)


@register_model
def deq_m():
    """DEQ (Anderson, implicit gradient), medium.

    Example:
        >>> cfg = get_config("deq_m")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.f_max_iter
        ('deq', 8, [64, 128, 256], 30)
    """
    return dict(core="deq", f_max_iter=30, b_max_iter=30, **_MEDIUM)


@register_model
def test_deq():
    """DEQ, tiny (tests).

    Example:
        >>> cfg = get_config("test_deq")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.f_max_iter
        ('deq', 2, [8], 8)
    """
    return dict(core="deq", f_max_iter=8, b_max_iter=8, **_TINY)


@register_model
def ode_s():
    """Neural ODE (rk4, ``depth`` fixed steps: 4 x depth evaluations), small.

    Example:
        >>> cfg = get_config("ode_s")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.ode_method
        ('ode', 6, [32, 64], 'rk4')
    """
    return dict(core="ode", ode_method="rk4", **_SMALL)


@register_model
def ode_m():
    """Neural ODE (dopri5, adaptive steps), medium.

    Example:
        >>> cfg = get_config("ode_m")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.ode_method
        ('ode', 8, [64, 128, 256], 'dopri5')
    """
    return dict(core="ode", ode_method="dopri5", **_MEDIUM)


@register_model
def test_ode():
    """Neural ODE (rk4, fixed steps), tiny (tests).

    Example:
        >>> cfg = get_config("test_ode")
        >>> cfg.core, cfg.depth, cfg.stage_widths(), cfg.ode_method
        ('ode', 2, [8], 'rk4')
    """
    return dict(core="ode", ode_method="rk4", **_TINY)


@register_model
def untied_s():
    """Untied cells (explicit baseline), small.

    Example:
        >>> cfg = get_config("untied_s")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('untied', 6, [32, 64])
    """
    return dict(core="untied", **_SMALL)


@register_model
def untied_m():
    """Untied cells (explicit baseline), medium.

    Example:
        >>> cfg = get_config("untied_m")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('untied', 8, [64, 128, 256])
    """
    return dict(core="untied", **_MEDIUM)


@register_model
def test_untied():
    """Untied cells, tiny (tests).

    Example:
        >>> cfg = get_config("test_untied")
        >>> cfg.core, cfg.depth, cfg.stage_widths()
        ('untied', 2, [8])
    """
    return dict(core="untied", **_TINY)
