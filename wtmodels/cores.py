"""Cores: the ways to run a weight-tied cell ``f(z, x)`` inside a model stage.

Every core maps the stage input ``x`` ``(B, C, H, W)`` to features ``z`` of the same shape,
starting from ``z0 = 0``, and keeps the statistics of its last forward pass in ``last_stats``
(read through ``ImplicitClassifier.core_stats()``):

- :class:`UnrolledCore`: the cell applied ``depth`` times (weight-tied network).
- :class:`DEQCore`: the fixed point ``z* = f(z*, x)`` found by :class:`wtmodels.DEQ`; with K
  masks, the fixed point of the K-periodic composite ``f_{K-1} o ... o f_0`` (one solver step =
  K masked cell applications).
- :class:`UntiedCore`: ``depth`` independent cells (the explicit baseline, D times the params).
- :class:`wtmodels.ode.ODECore`: ``dz/dt = f(z, x) - z`` integrated over ``[0, T]``.

Masks (:func:`wtmodels.masks.apply_masks`) are attached to the cell after the core is built;
the core only chooses the mask index of each iteration and forms the masked weights once per
forward pass (:func:`wtmodels.masks.formed_masks`).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from wtmodels.cells import VariationalDropout2d, reset_dropout
from wtmodels.masks import formed_masks, mask_count, mask_index, mask_schedule, set_mask_index


@contextlib.contextmanager
def forward_pass(cell: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Per-forward set-up of a cell: fresh dropout masks, weights and masked weights formed once.

    Inside the block weight norm / spectral norm parametrizations are evaluated once
    (``parametrize.cached``) and the K masked weights are formed once (``formed_masks``).

    Example:
        >>> import torch
        >>> from wtmodels.cells import ConvCell
        >>> cell, x = ConvCell(8), torch.randn(1, 8, 4, 4)
        >>> with forward_pass(cell, x):
        ...     z = cell(cell(torch.zeros_like(x), x), x)
    """
    reset_dropout(cell, x)
    with parametrize.cached(), formed_masks(cell):
        if torch.is_grad_enabled():
            # the cache keeps the first evaluation: make it one with a graph, not one made
            # inside a no-grad solve (a DEQ would then never train weight-normed convs)
            for module in cell.modules():
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
        yield


class Core(nn.Module):
    """Base of the cores: ``forward(x) -> z`` plus the per-forward statistics ``last_stats``.

    Example:
        >>> from wtmodels.cells import ConvCell
        >>> core = UnrolledCore(ConvCell(8), depth=3)
        >>> isinstance(core, Core), core(torch.randn(1, 8, 4, 4)).shape
        (True, torch.Size([1, 8, 4, 4]))
        >>> core.last_stats, core.jac_loss()  # 3 cell applications; no Jacobian regulariser
        ({'cell_evals': 3.0}, None)
    """

    def __init__(self):
        super().__init__()
        self.last_stats: dict[str, float] = {}

    def set_depth(self, depth: int) -> None:
        """Set the test-time depth (meaning depends on the core)."""
        raise NotImplementedError

    def set_pretrain(self, enabled: bool) -> None:
        """DEQ warm-up switch; a no-op for cores that are not implicit."""

    def set_jac_reg(self, enabled: bool) -> None:
        """Jacobian-regularisation switch; a no-op for cores that are not implicit."""

    def jac_loss(self) -> torch.Tensor | None:
        """Jacobian regulariser of the last forward pass (None when not computed)."""
        return None


def eager_under_compile(fn):
    """``fn`` run eagerly, a graph break, wherever ``torch.compile`` traces a caller: what
    ``torch.compiler.disable(fn)`` gives, except that ``torch._dynamo`` (whose import takes
    seconds of every process's start) is imported at the first call, not at import. Uses torch's
    own lazy form of it where torch has one.

    Example:
        >>> import torch
        >>> double = eager_under_compile(lambda t: 2 * t)
        >>> double(torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    lazy = getattr(torch, "_disable_dynamo", None)  # torch >= 2.1; private but torch-wide
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


def _check_depth(depth: int) -> int:
    # numbers.Integral: a depth from np.arange (a sweep) is an integer too, as in ModelConfig
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    return int(depth)


def match_layout(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``z`` in channels-last memory format when ``like`` (the stage input) is channels-last.

    A solver's iterate (reshaped from ``(B, n)``) or an ODE state taken from a stack is laid
    out NCHW; a convolution runs channels-last only when its input or kernel is, and a
    weight-normed kernel ``g v / ||v||`` is formed NCHW, so with ``--channels-last`` such a
    cell ran NCHW.

    Example:
        >>> x = torch.zeros(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
        >>> match_layout(torch.zeros(1, 4, 2, 2), x).is_contiguous()
        False
    """
    if (z.dim() == 4 and like.dim() == 4 and not like.is_contiguous()
            and like.is_contiguous(memory_format=torch.channels_last)):
        return z.contiguous(memory_format=torch.channels_last)
    return z


def check_cell_output(out, z: torch.Tensor) -> torch.Tensor:
    """``out`` (a cell's ``f(z, x)``) if it is a tensor of ``z``'s shape, else ``ValueError``.

    The cores iterate ``z <- f(z, x)`` from ``z0 = zeros_like(x)``, so a cell must return a
    tensor of the stage input's shape: one returning another shape failed deep inside the next
    application, or (a broadcasting cell, or depth 1) came back silently with the wrong shape.

    Example:
        >>> check_cell_output(torch.ones(2, 3), torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if not isinstance(out, torch.Tensor) or out.shape != z.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the cell f(z, x) must return a tensor of z's shape {tuple(z.shape)} (the stage "
            f"input x's: the cores start from z0 = zeros_like(x)), got {got}")
    return out


def unroll(cell: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Apply ``cell`` ``depth`` times from ``z0 = 0``, mask ``mask_index(t)`` at iteration t.

    Call inside :func:`forward_pass` so masked weights are formed once.

    Example:
        >>> import torch
        >>> from wtmodels.cells import ConvCell
        >>> unroll(ConvCell(8), torch.randn(2, 8, 4, 4), depth=3).shape
        torch.Size([2, 8, 4, 4])
    """
    k, schedule = mask_count(cell), mask_schedule(cell)
    z = torch.zeros_like(x)  # (B, C, H, W)
    for t in range(depth):
        if k:
            set_mask_index(cell, mask_index(t, depth, k, schedule))
        z = check_cell_output(cell(z, x), z)
    return z


class UnrolledCore(Core):
    """The weight-tied cell applied ``depth`` times: ``z_{t+1} = f_t(z_t, x)``, ``z_0 = 0``.

    ``f_t`` uses mask ``mask_index(t, depth, K, schedule)`` when the cell is masked.
    ``set_depth(D')`` evaluates at another depth (for the "block" schedule the blocks stretch to
    D').

    Example:
        >>> import torch
        >>> from wtmodels.cells import ConvCell
        >>> core = UnrolledCore(ConvCell(8), depth=4)
        >>> core(torch.randn(2, 8, 4, 4)).shape, core.last_stats
        (torch.Size([2, 8, 4, 4]), {'cell_evals': 4.0})
    """

    def __init__(self, cell: nn.Module, depth: int):
        super().__init__()
        self.cell = cell
        self.depth = _check_depth(depth)

    def set_depth(self, depth: int) -> None:
        self.depth = _check_depth(depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with forward_pass(self.cell, x):
            z = unroll(self.cell, x, self.depth)
        self.last_stats = {"cell_evals": float(self.depth)}
        return z


def _dropouts(cell: nn.Module) -> list[VariationalDropout2d]:
    return [sub for sub in cell.modules() if isinstance(sub, VariationalDropout2d)]


class UntiedCore(Core):
    """``depth`` independent cells applied in sequence: the explicit (untied) baseline.

    Cell t uses mask ``mask_index(t, depth, K, schedule)`` of its own mask buffer when masked,
    and every cell multiplies by the same variational-dropout mask (one per sample per forward
    pass, drawn by the first cell, as the tied cores' iterations share theirs), so an untied
    model whose cells hold copies of one weight computes exactly what the tied model computes.
    The depth is fixed by the parameters: ``set_depth`` raises ``ValueError``.

    Example:
        >>> import torch
        >>> from wtmodels.cells import ConvCell
        >>> core = UntiedCore([ConvCell(8) for _ in range(3)])
        >>> core(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, cells: list[nn.Module]):
        super().__init__()
        # one cell is no list of cells (a cell that holds a ModuleList iterates)
        if isinstance(cells, nn.ModuleList) or not isinstance(cells, nn.Module):
            try:
                cells = list(cells)
            except TypeError:
                pass
        if not isinstance(cells, list) or not all(isinstance(c, nn.Module) for c in cells):
            raise ValueError("an untied core takes a list of cells (nn.Module), one per "
                             f"iteration; got {type(cells).__name__}")
        if len(cells) < 1:
            raise ValueError("an untied core needs at least one cell (depth >= 1)")
        self.cells = nn.ModuleList(cells)

    @property
    def depth(self) -> int:
        """Number of cells."""
        return len(self.cells)

    def set_depth(self, depth: int) -> None:
        raise ValueError(
            f"the depth of an untied core is fixed by its {len(self.cells)} cells; "
            "test-time depth is available for the unrolled, deq and ode cores"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)  # (B, C, H, W)
        depth = len(self.cells)
        reset_dropout(self.cells[0], x)
        first = _dropouts(self.cells[0])
        for t, cell in enumerate(self.cells):
            k = mask_count(cell)
            if k:
                set_mask_index(cell, mask_index(t, depth, k, mask_schedule(cell)))
            drops = _dropouts(cell)
            if t and [d.p for d in drops] == [d.p for d in first]:
                for drop, shared in zip(drops, first):  # the first cell's masks
                    drop.mask = shared.mask
            elif t:  # cells built differently: masks of their own
                reset_dropout(cell, x)
            with parametrize.cached():  # one masked weight per cell: mask on the fly
                z = check_cell_output(cell(z, x), z)
        self.last_stats = {"cell_evals": float(depth)}
        return z


class DEQCore(Core):
    """The fixed point ``z* = F(z*, x)`` of the cell, by the engine's :class:`wtmodels.DEQ`.

    ``F`` is the cell, or with K masks the K-periodic composite ``f_{K-1} o ... o f_0`` (one
    solver step = K masked cell applications; the mask schedule does not apply). In pretrain
    mode (``set_pretrain(True)``, the DEQ warm-up) the core instead unrolls the cell ``depth``
    times with plain backprop, as :class:`UnrolledCore`; it computes no Jacobian term, so a
    forward in pretrain mode with ``set_jac_reg(True)`` raises ``ValueError``. ``set_depth(n)``
    sets the forward solver budget of both training and evaluation to ``n`` iterations.

    Args:
        cell: the weight-tied cell ``f(z, x)``.
        deq: a :class:`wtmodels.DEQ` (solver, budgets, gradient mode).
        depth: unrolled depth in pretrain mode.

    Example:
        >>> import torch, wtmodels as wt
        >>> from wtmodels.cells import ConvCell
        >>> core = DEQCore(ConvCell(8), wt.DEQ(f_max_iter=10), depth=4)
        >>> core(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, cell: nn.Module, deq: nn.Module, depth: int):
        super().__init__()
        self.cell = cell
        self.deq = deq
        self.depth = _check_depth(depth)
        self.pretrain = False
        self.jac_reg = False
        self._jac_loss: torch.Tensor | None = None

    def set_depth(self, depth: int) -> None:
        depth = _check_depth(depth)
        self.deq.f_max_iter = depth
        self.deq.eval_f_max_iter = depth

    def set_pretrain(self, enabled: bool) -> None:
        self.pretrain = bool(enabled)

    def set_jac_reg(self, enabled: bool) -> None:
        self.jac_reg = bool(enabled)

    def jac_loss(self) -> torch.Tensor | None:
        return self._jac_loss

    def __getstate__(self) -> dict:
        # the regulariser of the last forward carries that pass's autograd graph: a copy or a
        # pickle of the model (copy.deepcopy after a training step: "Only Tensors created
        # explicitly by the user (graph leaves) support the deepcopy protocol") leaves it out
        state = super().__getstate__()
        state["_jac_loss"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._jac_loss = None
        with forward_pass(self.cell, x):
            if self.pretrain:
                if self.jac_reg:  # the warm-up computes no Jacobian term: jac_loss() would
                    # be None (the model's 0.0) without a word, a regulariser silently off
                    raise ValueError(
                        "set_jac_reg(True) has no effect in pretrain mode (the unrolled "
                        "warm-up computes no Jacobian term); call set_jac_reg(False) during "
                        "set_pretrain(True), as wtmodels.train does")
                z = unroll(self.cell, x, self.depth)
                self.last_stats = {"cell_evals": float(self.depth)}
                return z
            k = mask_count(self.cell)
            evals = [0]

            def f(z: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
                z = match_layout(z, x)  # the solver's iterates are NCHW
                for i in range(max(k, 1)):
                    if k:
                        set_mask_index(self.cell, i)
                    z = check_cell_output(self.cell(z, x), z)
                evals[0] += max(k, 1)
                return z

            z, stats = self.deq(f, torch.zeros_like(x), jac_reg=self.jac_reg)
        self._jac_loss = getattr(stats, "jac_loss", None)
        self.last_stats = {"cell_evals": float(evals[0]), **stats.summary()}
        return z
