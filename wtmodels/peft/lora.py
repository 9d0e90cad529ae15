"""LoRA with CapaBoost masked parallel copies, for ``Conv2d`` and ``Linear`` layers.

A wrapped layer computes ``base(x) + scale * x @ dW.T`` with the update

    dW = sum_{i=1..d} (M_B^i * B) @ (M_A^i * A),    A: (r, in), B: (out, r)

where ``M_A^i``, ``M_B^i`` are the static masks of copy ``i`` (bool, from
:func:`wtmodels.make_masks`: exact count, seeded, distinct per copy). The copies share ``A`` and
``B``, so the trainable parameters do not depend on ``d`` or the density, while the rank of
``dW`` can reach ``d * r`` (CapaBoost). ``d = 1`` at density 1 is plain LoRA. For a ``Conv2d``
with a ``k x k`` kernel, ``A`` is ``(r, in, k, k)`` and the update is the factorised convolution
``k x k`` conv to ``r`` channels (with the base's stride, padding and dilation), then ``1 x 1``
conv to ``out``; ``dW`` is the equivalent ``(out, in, k, k)`` kernel.

The sum over copies is one product: the masked ``A`` copies are concatenated along the rank
dimension and the masked ``B`` copies along their input dimension, so the update runs as one
down-projection to ``d * r`` channels and one up-projection ("factorized"). Where that thin
product would cost more than a tenth of the base layer, the layer instead runs once with the
weight ``W + dW`` ("dense", chosen per layer by ``impl="auto"``); both give the same values and
gradients, and both form the masked copies once per forward pass of the model.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from wtmodels.keywords import keyword_names, refuse_unknown
from wtmodels.masks import MaskedLayer, derive_seed
from wtmodels.peft.wrap import (
    PEFTLayer,
    check_copy_args,
    check_int,
    check_materialized,
    concat_copies,
    draw_copy_masks,
    find_targets,
    freeze_base,
    install_forming_hooks,
    peft_layers,
    replace_layers,
    resolve_head,
    wrap_each,
)

IMPLS = ("auto", "factorized", "dense")
# factorised-update cost (share of the base layer's) above which "auto" computes densely
DENSE_THRESHOLD = 0.1


class LoRALayer(PEFTLayer):
    """A frozen ``Conv2d`` / ``Linear`` plus a (CapaBoost) low-rank update.

    Use :func:`add_lora` to wrap the layers of a model; this class wraps one layer.

    Attributes:
        base: the wrapped layer (its parameters are not touched here; :func:`add_lora` freezes
            them).
        lora_A: ``(rank, in)`` for Linear, ``(rank, in, kh, kw)`` for Conv2d; Kaiming-uniform
            init (as ``nn.Linear``).
        lora_B: ``(out, rank)``, zero init, so the wrapped layer starts equal to ``base``.
        mask_A, mask_B: bool buffers ``(copies, *lora_A.shape)``, ``(copies, *lora_B.shape)``;
            None (not stored) at density 1.
        scale: ``alpha / rank``.
        merged: whether the update is folded into ``base.weight`` (saved in the state dict).

    Args:
        base: the layer to wrap (``nn.Conv2d`` with ``groups=1``, or ``nn.Linear``).
        rank: rank ``r`` of each copy (>= 1).
        copies: number ``d`` of masked copies (>= 1).
        density: share of entries each mask keeps, in (0, 1]. The update's mean over the
            masks is ``copies * density**2`` times one unmasked copy's (0.5x at d=2, 1x at d=4
            for density 0.5); one draw's norm is larger, ``sqrt(d p^2 + d (d-1) p^4)`` times
            for factors unrelated to the masks (0.79x, 1.32x); at density 1 the copies are
            identical: one update scaled by ``d``, rank ``r`` (a control: the masks are what
            raise the rank). ``alpha`` rescales.
        kind: mask kind, ``"random"`` (exact count), ``"bernoulli"`` or ``"nm"``.
        seed: seed of this layer's masks (A and B masks derive their own from it).
        alpha: scale numerator; the update is multiplied by ``alpha / rank`` (default
            ``alpha = rank``: scale 1).
        impl: how the update runs (same values either way): ``"factorized"`` (base output
            plus the thin down / up products), ``"dense"`` (one conv / linear with
            ``W + delta_weight()``, formed once per forward pass; a base with forward hooks
            runs factorised, so that its hooks see its output) or ``"auto"``
            (:func:`choose_impl`: dense once the factorised update would cost more than a
            tenth of the base layer).

    Example:
        >>> import torch
        >>> layer = LoRALayer.wrap(torch.nn.Linear(16, 8), rank=2, copies=4, density=0.5)
        >>> _ = torch.nn.init.normal_(layer.lora_B)
        >>> int(torch.linalg.matrix_rank(layer.delta_weight().detach()))
        8
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        copies: int = 1,
        density: float = 1.0,
        kind: str = "random",
        seed: int = 0,
        alpha: float | None = None,
        impl: str = "auto",
    ):
        check_lora_args(rank, copies, density, kind, alpha, impl, seed)
        rank, copies, density, seed = int(rank), int(copies), float(density), int(seed)
        if type(self) is LoRALayer:  # its _update is abstract
            raise ValueError(f"{type(self).__name__} is the base class: build LoRALinear or "
                             "LoRAConv2d, or LoRALayer.wrap(layer, rank) to pick the one that "
                             "matches the layer")
        expected = nn.Linear if isinstance(self, LoRALinear) else nn.Conv2d
        if not isinstance(base, expected):
            raise ValueError(f"{type(self).__name__} wraps an {expected.__name__}, got "
                             f"{type(base).__name__}; LoRALayer.wrap(layer, rank) picks the class")
        check_materialized(base)
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"LoRA on a grouped Conv2d (groups={base.groups}) is not supported; "
                             "leave it out of targets")
        super().__init__(base)
        if impl == "auto":
            impl = choose_impl(base, rank * copies)
        if impl == "dense" and not _plain_forward(base):
            raise ValueError(
                f"impl='dense' needs a plain Conv2d / Linear forward, got {type(base).__name__}"
            )
        self.impl = impl
        self.rank, self.copies = rank, copies
        self.density = float(density)
        self.kind = kind
        self.scale = (rank if alpha is None else float(alpha)) / rank
        self.merged = False
        # the base weight's tensors before merge() (weight norm: g and v) and the tensors /
        # content fingerprints merge() left, so that unmerge() can give the very same bits back
        self._pre_merge: tuple[dict, dict] | None = None
        weight = base.weight
        self.weight_shape = tuple(weight.shape)
        a_shape = (rank, *weight.shape[1:])  # (r, in) or (r, in, kh, kw)
        b_shape = (weight.shape[0], rank)  # (out, r)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        for name, shape in (("A", a_shape), ("B", b_shape)):
            masks = draw_copy_masks(shape, copies, density, kind, derive_seed(seed, name),
                                    label=f"lora_{name}")
            self.register_buffer(
                f"mask_{name}", None if masks is None else masks.to(weight.device)
            )

    @staticmethod
    def wrap(base: nn.Module, rank: int, **kw) -> LoRALayer:
        """Wrap one layer in the LoRA class matching its type (validated).

        Example:
            >>> import torch
            >>> type(LoRALayer.wrap(torch.nn.Conv2d(3, 4, 3), rank=2)).__name__
            'LoRAConv2d'
        """
        if isinstance(base, nn.Conv2d):
            return LoRAConv2d(base, rank, **kw)
        if isinstance(base, nn.Linear):
            return LoRALinear(base, rank, **kw)
        raise ValueError(f"LoRA wraps nn.Conv2d or nn.Linear, got {type(base).__name__}")

    def peft_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    @property
    def active(self) -> bool:
        return not self.merged

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_cat, B_cat)``: masked copies concatenated, ``(d r, in, ...)`` and ``(out, d r)``."""
        a_cat = concat_copies(self.lora_A, self.mask_A, self.copies, 0)  # (d*r, in[, kh, kw])
        b_cat = concat_copies(self.lora_B, self.mask_B, self.copies, 1)  # (out, d*r)
        return a_cat, b_cat

    def form(self) -> tuple[torch.Tensor, ...]:
        """What a forward pass needs: ``(A_cat, B_cat)`` (factorized) or ``(delta_weight,)``."""
        if self.impl == "dense":
            return (self.delta_weight(),)
        return self.concatenated()

    def delta_weight(self) -> torch.Tensor:
        """The effective update ``scale * sum_i (M_B^i * B)(M_A^i * A)``, shaped like the weight.

        Example:
            >>> import torch
            >>> layer = LoRALayer.wrap(torch.nn.Conv2d(3, 4, 3), rank=2)
            >>> layer.delta_weight().shape
            torch.Size([4, 3, 3, 3])
        """
        a_cat, b_cat = self.concatenated()
        delta = b_cat @ a_cat.flatten(1)  # (out, in * kh * kw)
        return self.scale * delta.view(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        formed = self.formed()
        if self.impl == "dense":
            base = self.base
            if not _has_hooks(base):
                weight = base.masked_weight() if isinstance(base, MaskedLayer) else base.weight
                return self._apply_weight(x, weight + formed[0])
            formed = self.concatenated()  # the base's hooks must run: the factorised path
        return self.base(x) + self.scale * self._update(x, *formed)

    def _update(self, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        if isinstance(self.base, MaskedLayer):
            raise ValueError(
                "cannot merge into a layer with static masks: the mask would also cut the "
                "update; run it unmerged"
            )
        if not dense_capable(self.base):
            raise ValueError(
                f"cannot merge into {type(self.base).__name__}: its forward is not the plain "
                "conv / linear one or it has forward hooks, so W + delta would not give the "
                "unmerged output; run it unmerged"
            )
        if "weight" not in self.base._parameters and not parametrize.is_parametrized(
            self.base, "weight"
        ):
            raise ValueError(
                "cannot merge: the base weight is neither a parameter nor a "
                "torch.nn.utils.parametrize parametrization; run it unmerged"
            )

    def _shift_weight(self, delta: torch.Tensor) -> None:
        """Make the base's effective weight ``W + delta`` (exactly, up to rounding)."""
        base = self.base
        with torch.no_grad():
            if "weight" in base._parameters:
                base.weight.add_(delta)
                return
            # parametrized (e.g. weight norm): assign through the parametrization's right
            # inverse, then check that it gives the target back
            saved = {k: v.clone() for k, v in base.parametrizations.weight.state_dict().items()}
            target = base.weight + delta
            base.weight = target
            tol = max(1e-5, 16 * torch.finfo(target.dtype).eps)  # bf16 rounds at ~4e-3
            if not torch.allclose(base.weight, target, rtol=tol,
                                  atol=tol * float(target.abs().max())):
                base.parametrizations.weight.load_state_dict(saved)
                raise ValueError(
                    f"cannot merge exactly into {type(base).__name__}: its weight "
                    "parametrization has no exact right inverse (e.g. spectral norm); run it "
                    "unmerged"
                )

    def merge(self) -> None:
        """Fold ``delta_weight()`` into the base weight: the layer then costs what the base does.

        A plain weight gets the update added; a parametrized one (weight norm) is assigned
        ``W + delta`` through the parametrization's right inverse. A layer cannot see who
        else uses its base weight: :func:`merge_lora` refuses tied weights, this method does
        not (a module sharing the weight would change too).

        Raises:
            RuntimeError: already merged.
            ValueError: the base weight is masked, or parametrized without an exact inverse.
        """
        if self.merged:
            raise RuntimeError("LoRA update is already merged; unmerge() first")
        self._check_mergeable()
        originals = self._weight_originals()
        before = {k: p.detach().clone() for k, p in originals.items()}
        self._shift_weight(self.delta_weight().detach())
        self._pre_merge = (before, {k: (p, _fingerprint(p)) for k, p in originals.items()})
        self.merged = True

    def _weight_originals(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the base weight: the parameter, or a parametrized weight's
        originals (weight norm: g and v)."""
        if not parametrize.is_parametrized(self.base, "weight"):
            return {"weight": self.base.weight}
        return dict(self.base.parametrizations.weight.named_parameters(recurse=False))

    def _restore_pre_merge(self) -> bool:
        """Give the base its pre-merge weight tensors back, bit for bit, when nothing changed
        them since :meth:`merge` (``W + delta - delta`` is ``W`` only up to rounding: 0.4% in
        bfloat16, and weight norm's right inverse rescales (g, v))."""
        if self._pre_merge is None:
            return False
        before, after = self._pre_merge
        now = self._weight_originals()
        # the contents are compared, not version counters: edits through ``.data`` (an EMA
        # update, torch.nn.utils.vector_to_parameters) leave the counter as it was
        if now.keys() != after.keys() or any(
            now[k] is not p or p.dtype != before[k].dtype
            or p.device != before[k].device or p.shape != before[k].shape
            or _fingerprint(p) != digest
            for k, (p, digest) in after.items()
        ):
            return False
        with torch.no_grad():
            for k, p in now.items():
                p.copy_(before[k])
        return True

    def unmerge(self) -> None:
        """Undo :meth:`merge`.

        If nothing changed the base weight since :meth:`merge` (an in-place change, also
        through ``.data``, a load, a move to another dtype or device: the contents are
        compared), its pre-merge tensors are put back bit for bit (weight norm's g and v
        included); otherwise the update, recomputed from the factors,
        is subtracted (equal to the original weight up to rounding, and to the update merge
        added while the factors are unchanged: a merged layer's forward gives them no
        gradient). While merged the layer keeps the pre-merge weight: one weight-sized copy.

        Raises:
            RuntimeError: not merged.
        """
        if not self.merged:
            raise RuntimeError("LoRA update is not merged; nothing to unmerge")
        if not self._restore_pre_merge():
            delta = self.delta_weight()
            weight = self.base.weight  # the model may have moved (device, dtype) since merging
            self._shift_weight(-delta.detach().to(device=weight.device, dtype=weight.dtype))
        self._pre_merge = None
        self.merged = False

    def get_extra_state(self) -> dict:
        return {"merged": self.merged}

    def set_extra_state(self, state: dict) -> None:
        self.merged = bool(state["merged"])
        self._pre_merge = None  # a loaded merged layer: unmerge recomputes the update

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, copies={self.copies}, density={self.density:g}, "
            f"kind={self.kind!r}, scale={self.scale:g}, impl={self.impl!r}, merged={self.merged}"
        )


class LoRALinear(LoRALayer):
    """LoRA / CapaBoost update of an ``nn.Linear``: ``x -> (x A_cat^T) B_cat^T``.

    Example:
        >>> layer = LoRALayer.wrap(nn.Linear(4, 3), rank=2)
        >>> type(layer).__name__, layer.lora_A.shape, layer.lora_B.shape
        ('LoRALinear', torch.Size([2, 4]), torch.Size([3, 2]))
        >>> _ = nn.init.normal_(layer.lora_B)  # B starts at zero: a non-zero update
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(layer(x), F.linear(x, layer.weight + layer.delta_weight(), layer.bias),
        ...                atol=1e-6)
        True
    """

    def _update(self, x, a_cat, b_cat):
        return F.linear(F.linear(x, a_cat), b_cat)  # (..., d*r) -> (..., out)

    def _apply_weight(self, x, weight):
        return F.linear(x, weight, self.base.bias)


class LoRAConv2d(LoRALayer):
    """LoRA / CapaBoost update of an ``nn.Conv2d``: ``k x k`` conv to ``d r`` channels, then 1x1.

    Example:
        >>> layer = LoRALayer.wrap(nn.Conv2d(2, 4, 3, padding=1), rank=2)
        >>> type(layer).__name__, layer.lora_A.shape, layer.lora_B.shape
        ('LoRAConv2d', torch.Size([2, 2, 3, 3]), torch.Size([4, 2]))
        >>> _ = nn.init.normal_(layer.lora_B)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> ref = F.conv2d(x, layer.weight + layer.delta_weight(), layer.bias, padding=1)
        >>> torch.allclose(layer(x), ref, atol=1e-5)
        True
    """

    def _update(self, x, a_cat, b_cat):
        h = self.base._conv_forward(x, a_cat, None)  # (N, d*r, H', W'), base stride/padding
        return F.conv2d(h, b_cat[:, :, None, None])  # (N, out, H', W')

    def _apply_weight(self, x, weight):
        return self.base._conv_forward(x, weight, self.base.bias)


def _fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: tells whether its contents changed, however they were
    changed (in place, through ``.data``)."""
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.sha256(raw).hexdigest()


def dense_capable(base: nn.Module) -> bool:
    """Whether ``base``'s forward is the plain (or statically masked) conv / linear forward,
    with no forward hooks (which a weight-level shortcut would skip).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> dense_capable(lin)
        True
        >>> _ = lin.register_forward_hook(lambda module, args, out: None)
        >>> dense_capable(lin)
        False
    """
    return _plain_forward(base) and not _has_hooks(base)


def _plain_forward(base: nn.Module) -> bool:
    return type(base).forward in (nn.Conv2d.forward, nn.Linear.forward, MaskedLayer.forward)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def update_cost_ratio(base: nn.Module, width: int) -> float:
    """Multiply-adds of the factorised update at ``width = copies * rank`` over the base's.

    Per output position the factorised update costs ``width * (fan_in + out)`` and the base
    ``fan_in * out`` (``fan_in = in * kh * kw``).

    Example:
        >>> from torch import nn
        >>> update_cost_ratio(nn.Linear(100, 100), width=5)
        0.1
    """
    out, fan_in = base.weight.shape[0], base.weight[0].numel()
    return width * (fan_in + out) / (fan_in * out)


def choose_impl(base: nn.Module, width: int, threshold: float = DENSE_THRESHOLD) -> str:
    """``"dense"`` when the factorised update would cost more than ``threshold`` of the base.

    The dense path runs one conv / linear with ``W + delta_weight()`` (its weight gradient flows
    to A and B); the factorised path runs the base plus two thin products. Thin products use the
    CPU poorly: from about a tenth of the base's cost the dense path was the faster one on the
    CPU we measured (``benchmarks/peft_speed.py``), and its cost does not grow with the number
    of copies. Layers whose forward is not the plain conv / linear one stay factorised.

    Example:
        >>> from torch import nn
        >>> choose_impl(nn.Conv2d(64, 64, 3), width=2), choose_impl(nn.Conv2d(64, 64, 3), width=16)
        ('factorized', 'dense')
    """
    if not dense_capable(base):
        return "factorized"
    return "dense" if update_cost_ratio(base, width) > threshold else "factorized"


def check_impl(impl: object) -> None:
    """``ValueError`` unless ``impl`` is one of :data:`IMPLS`.

    Example:
        >>> check_impl("dense")
        >>> check_impl("fast")
        Traceback (most recent call last):
        ...
        ValueError: unknown impl 'fast'; valid impls: auto, factorized, dense
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid impls: {', '.join(IMPLS)}")


def check_lora_args(rank, copies, density, kind, alpha, impl="auto", seed=0) -> None:
    """Validate the arguments of :func:`add_lora` before anything is changed.

    Example:
        >>> check_lora_args(rank=4, copies=2, density=0.5, kind="nm", alpha=8.0)
        >>> check_lora_args(rank=4, copies=2, density=0.5, kind="nm", alpha=0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a finite number > 0 or None, got 0
    """
    check_int("rank", rank)
    check_copy_args(copies, density, kind, seed)
    check_impl(impl)
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
        or not 0 < alpha < math.inf
    ):
        raise ValueError(f"alpha must be a finite number > 0 or None, got {alpha!r}")


def add_lora(
    model: nn.Module,
    rank: int,
    copies: int = 1,
    density: float = 1.0,
    kind: str = "random",
    seed: int = 0,
    targets: type | str | Sequence[type | str] = (nn.Conv2d,),
    alpha: float | None = None,
    train_head: bool | str = False,
    impl: str = "auto",
    **unknown,
) -> list[LoRALayer]:
    """Add LoRA (``copies=1, density=1``) or CapaBoost-LoRA updates to layers of ``model``.

    Each selected ``Conv2d`` / ``Linear`` is replaced, under every parent holding it, by a
    :class:`LoRALayer` wrapping it (its keys in the state dict move to ``<name>.base.*``; load
    pretrained weights before this call). Then every parameter of ``model`` is frozen except the
    LoRA factors (of this and earlier calls) and, if asked, the head. The masked copies are
    formed once per forward pass of ``model``. Each layer's masks are drawn from a seed derived
    from ``seed`` and the layer's name, so two calls with equal arguments give equal masks.

    Args:
        model: the model to adapt (in place).
        rank: rank ``r`` of the shared factors (>= 1).
        copies: CapaBoost copies ``d`` (>= 1); the update's rank can reach ``d * r`` at the
            same number of trainable parameters.
        density: share of entries kept by each copy's masks, in (0, 1].
        kind: mask kind: ``"random"`` (exact count), ``"bernoulli"`` or ``"nm"``.
        seed: base seed of the masks.
        targets: which layers to wrap: layer types (``nn.Conv2d``, ``nn.Linear`` or
            subclasses) and/or ``fnmatch`` name patterns matched against a layer's qualified
            name or any enclosing module's name (``"core"`` = every layer inside ``core``);
            a layer is wrapped when any item selects it. Default: every ``Conv2d``.
        alpha: the update is scaled by ``alpha / rank`` (default ``alpha = rank``, scale 1).
        train_head: ``True`` keeps the module named ``"head"`` trainable, a string names
            another module; that module is never wrapped. ``False`` trains the factors only.
        impl: ``"auto"`` (per layer, see :func:`choose_impl`), ``"factorized"`` or ``"dense"``
            (see :class:`LoRALayer`); outputs and gradients are the same.

    Returns:
        The new wrappers, in module order.

    Raises:
        ValueError: ``rank < 1``, ``copies < 1``, density outside (0, 1], unknown mask kind,
            bad alpha or targets, no layer matched, an unknown head, a grouped convolution,
            an unknown keyword (the message names the valid ones).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> layers = add_lora(net, rank=2, copies=4, density=0.5, seed=0)
        >>> [type(m).__name__ for m in net], len(layers)
        (['LoRAConv2d', 'ReLU', 'Flatten', 'Linear'], 1)
        >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # A: 2*9, B: 8*2
        34
        >>> net(torch.randn(5, 1, 3, 3)).shape
        torch.Size([5, 3])
    """
    refuse_unknown("add_lora", unknown, keyword_names(add_lora))
    check_lora_args(rank, copies, density, kind, alpha, impl, seed)
    head = resolve_head(model, train_head)
    selected = find_targets(model, targets, exclude=() if head is None else (head,))
    wrappers = wrap_each(selected, lambda name, layer: LoRALayer.wrap(
        layer, rank, copies=copies, density=density, kind=kind,
        seed=derive_seed(seed, name), alpha=alpha, impl=impl,
    ))  # every layer validated before the model changes
    replace_layers(model, wrappers)
    freeze_base(model, head)
    install_forming_hooks(model)
    return list(wrappers.values())


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA update in ``model`` into its base weight; returns how many.

    Merged, the model runs at the base model's cost and gives the same outputs (up to
    rounding). Raises ``RuntimeError`` if a layer is already merged, ``ValueError`` if one
    cannot be merged exactly (nothing is changed then).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = add_lora(net, rank=2, targets=torch.nn.Linear)
        >>> merge_lora(net), unmerge_lora(net)
        (1, 1)
    """
    layers = peft_layers(model, LoRALayer)
    if any(layer.merged for layer in layers):
        raise RuntimeError("some LoRA layers are already merged; unmerge_lora(model) first")
    owners: dict[int, LoRALayer] = {}
    inside = {id(m) for layer in layers for m in layer.modules()}
    # weights that modules outside the LoRA layers use too (tied weights): a merge would
    # change those modules as well
    elsewhere = {id(p) for m in model.modules() if id(m) not in inside
                 for p in m.parameters(recurse=False)}
    for layer in layers:
        layer._check_mergeable()
        for p in layer.base.parameters():
            if p.dim() > 1 and owners.setdefault(id(p), layer) is not layer:
                raise ValueError("cannot merge: two LoRA layers share a base weight, and each "
                                 "would add its update to it; run them unmerged")
            if p.dim() > 1 and id(p) in elsewhere:
                raise ValueError("cannot merge: a LoRA layer's base weight is tied to a layer "
                                 "without LoRA, which the merge would change too; run it "
                                 "unmerged")
    done = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except ValueError:
        for layer in done:
            layer.unmerge()
        raise
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns how many layers were unmerged.

    Raises:
        RuntimeError: a LoRA layer of ``model`` is not merged (nothing is changed then).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = add_lora(net, rank=2, targets=nn.Linear)
        >>> _ = nn.init.normal_(net[0].lora_B)  # B starts at zero: a non-zero update
        >>> w = net[0].weight.clone()
        >>> merge_lora(net), torch.equal(net[0].weight, w)  # the update is in the weight
        (1, False)
        >>> unmerge_lora(net), torch.equal(net[0].weight, w), net[0].merged
        (1, True, False)
        >>> unmerge_lora(net)
        Traceback (most recent call last):
        ...
        RuntimeError: some LoRA layers are not merged; merge_lora(model) first
    """
    layers = peft_layers(model, LoRALayer)
    if not all(layer.merged for layer in layers):
        raise RuntimeError("some LoRA layers are not merged; merge_lora(model) first")
    for layer in layers:
        layer.unmerge()
    return len(layers)
