"""Shared machinery of the PEFT wrappers: masked copies, target matching, freezing, forming.

A PEFT wrapper (:class:`PEFTLayer`) replaces a ``Conv2d`` / ``Linear`` layer of a built model,
keeps that layer as its frozen ``base`` and adds a small trainable update. CapaBoost turns one
shared set of update weights into ``copies`` differently masked copies whose outputs are summed;
:func:`concat_copies` lays the masked copies side by side so that the sum costs one wide
product instead of a loop over copies. The masked copies are formed once per forward pass of the
model the wrapper was added to (:func:`install_forming_hooks`), so a weight-tied cell applied D
times pays for the masking once.
"""

from __future__ import annotations

import fnmatch
import numbers
import sys
from collections.abc import Sequence

import torch
from torch import nn

from wtmodels.masks import (
    MASK_KINDS,
    apply_to_mask_stacks,
    keep_transformer_fused_path_off,
    make_masks,
)

SUPPORTED_TYPES = (nn.Conv2d, nn.Linear)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# plain attributes of the wrapped Conv2d / Linear that a wrapper answers for it, so that code
# written for the layer keeps working (``model.head.in_features``, ``layer.weight.device``)
BASE_ATTRIBUTES = frozenset({
    "weight", "bias", "in_features", "out_features", "in_channels", "out_channels",
    "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
})


class _FormedStack(list):
    """The passes of a model that formed masked copies (see :func:`install_forming_hooks`).

    What it holds belongs to forward passes of this process (their frames and formed tensors):
    a copy or a pickle of the model starts empty, also after a pass cut short by Ctrl-C left
    entries behind."""

    def __deepcopy__(self, memo):
        return _FormedStack()

    def __reduce__(self):
        return _FormedStack, ()


class PEFTLayer(nn.Module):
    """Base of the wrappers: a frozen ``base`` layer plus a trainable update.

    Subclasses implement :meth:`form` (the concatenated masked-copy weights, recomputed from the
    trainable parameters) and :meth:`peft_parameters`. While the model the wrapper was added to
    runs its forward pass, :meth:`formed` returns the weights formed once on entry; called on its
    own the wrapper forms them on the fly (same values).

    The wrapper answers the base layer's plain attributes (:data:`BASE_ATTRIBUTES`:
    ``in_features``, ``out_channels``, ``kernel_size``, ...; ``weight`` and ``bias`` are the
    base's own, without the update: a LoRA layer's effective weight is
    ``weight + delta_weight()``), so code written for the layer keeps working.

    Example:
        >>> from wtmodels.peft import LoRALayer
        >>> layer = LoRALayer.wrap(nn.Conv2d(3, 8, 3), rank=2)
        >>> isinstance(layer, PEFTLayer), layer.out_channels, layer.weight is layer.base.weight
        (True, 8, True)
        >>> [tuple(p.shape) for p in layer.peft_parameters()]  # A (r, in, kh, kw), B (out, r)
        [(2, 3, 3, 3), (8, 2)]
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self._formed: tuple[torch.Tensor, ...] | None = None
        self._formed_frame = None  # the frame of the forward pass that formed them

    def form(self) -> tuple[torch.Tensor, ...]:
        """The update weights with the copies' masks applied and concatenated."""
        raise NotImplementedError

    def formed(self) -> tuple[torch.Tensor, ...]:
        """The weights formed for the current forward pass, or freshly formed ones."""
        if self._formed is not None:
            return self._formed
        # Formed on the fly, e.g. while activation checkpointing (use_reentrant=False)
        # recomputes a region after the model's forward pass: the forward pass itself used the
        # weights formed on entry and saved none of the forming's tensors, so the forming's own
        # saved tensors are kept out of any enclosing saved-tensor hooks (identity hooks),
        # or the recomputation would save more tensors than the forward pass did.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return self.form()

    def peft_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters this wrapper adds (the base's are not among them)."""
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """Whether the update takes part in the forward pass (False once merged)."""
        return True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base")
            if name in BASE_ATTRIBUTES and base is not None and hasattr(base, name):
                return getattr(base, name)  # the wrapped layer's (``weight``: the frozen W)
            raise

    def __getstate__(self) -> dict:
        # the weights formed for a forward pass (and its frame) belong to that pass: after a
        # pass cut short by Ctrl-C they are still set, and a frame cannot be pickled nor a
        # formed (non-leaf) tensor deep-copied; a copy forms its own on its next pass
        state = super().__getstate__()
        state["_formed"], state["_formed_frame"] = None, None
        return state

    def _apply(self, fn, recurse: bool = True):
        # mask stacks follow the update weights into a memory format (e.g. channels_last)
        names = tuple(n for n in self._buffers if n.startswith("mask_"))
        return apply_to_mask_stacks(self, names, super()._apply, fn, recurse)


# --------------------------------------------------------------------------------------------
# Argument checks and masked copies


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name`` and the valid range.

    Example:
        >>> import numpy as np
        >>> check_int("rank", np.int64(3))
        3
        >>> check_int("rank", 0)
        Traceback (most recent call last):
        ...
        ValueError: rank must be an integer >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_copy_args(copies: object, density: object, kind: object, seed: object = 0) -> None:
    """Validate the CapaBoost arguments shared by every wrapper.

    Example:
        >>> check_copy_args(copies=4, density=0.5, kind="bernoulli", seed=1)
        >>> check_copy_args(copies=4, density=1.5, kind="bernoulli")
        Traceback (most recent call last):
        ...
        ValueError: density must be in (0, 1], got 1.5
    """
    check_int("copies", copies)
    check_int("seed", seed, minimum=0)
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not (
        0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")


def check_materialized(base: nn.Module) -> None:
    """``ValueError`` if ``base`` is a lazy layer whose weight has no shape yet.

    Example:
        >>> check_materialized(nn.Linear(4, 3))
        >>> check_materialized(nn.LazyLinear(3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: LazyLinear is not initialized yet (lazy module): run one forward pass ...
    """
    if any(nn.parameter.is_lazy(p) for p in base.parameters(recurse=False)):
        raise ValueError(
            f"{type(base).__name__} is not initialized yet (lazy module): run one forward pass "
            "of the model so that its weight gets a shape, then add LoRA / adapters"
        )


def draw_copy_masks(
    shape: Sequence[int], copies: int, density: float, kind: str, seed: int,
    label: str = "the update weight",
) -> torch.Tensor | None:
    """Masks ``(copies, *shape)`` (bool) for the copies of one weight; None at density 1.

    At density 1 every copy is the unmasked weight, so no mask is stored. A request the shape
    cannot hold raises ``ValueError`` naming ``label`` (e.g. ``"lora_B"``).

    Example:
        >>> draw_copy_masks((4, 3), copies=2, density=0.5, kind="random", seed=0).shape
        torch.Size([2, 4, 3])
        >>> draw_copy_masks((4, 3), copies=2, density=1.0, kind="random", seed=0) is None
        True
    """
    if density == 1.0:
        return None
    try:
        return make_masks(tuple(shape), k=copies, density=density, kind=kind, seed=seed)
    except ValueError as err:
        raise ValueError(f"masks of {label} {tuple(shape)}: {err}") from None


def wrap_each(selected: list[tuple[str, nn.Module]], build) -> dict[int, nn.Module]:
    """``{id(layer): build(name, layer)}`` for the selected layers; a ``ValueError`` names the
    layer it came from (a model may hold dozens of similar layers).

    Example:
        >>> from wtmodels.peft import LoRALayer
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
        >>> wrappers = wrap_each([("0", net[0])], lambda name, layer: LoRALayer.wrap(layer, 1))
        >>> list(wrappers) == [id(net[0])], type(wrappers[id(net[0])]).__name__
        (True, 'LoRALinear')
        >>> wrap_each(list(net.named_children()), lambda name, layer: LoRALayer.wrap(layer, 1))
        Traceback (most recent call last):
        ...
        ValueError: layer '1' (Conv1d): LoRA wraps nn.Conv2d or nn.Linear, got Conv1d
    """
    wrappers = {}
    for name, layer in selected:
        try:
            wrappers[id(layer)] = build(name, layer)
        except ValueError as err:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}): {err}") from None
    return wrappers


def concat_copies(
    weight: torch.Tensor, masks: torch.Tensor | None, copies: int, dim: int
) -> torch.Tensor:
    """The ``copies`` masked copies of ``weight`` concatenated along dimension ``dim``.

    Copy ``i`` is ``masks[i] * weight`` (or ``weight`` itself when ``masks`` is None) and fills
    positions ``i * n ... (i + 1) * n - 1`` of ``dim`` (``n = weight.shape[dim]``). Summing
    products of masked copies pairwise, ``sum_i (M_B^i * B) @ (M_A^i * A)``, then equals one
    product ``concat_copies(B, M_B, d, 1) @ concat_copies(A, M_A, d, 0)``.

    Args:
        weight: the shared weight, e.g. ``A`` ``(r, in)`` or ``B`` ``(out, r)``.
        masks: bool ``(copies, *weight.shape)`` or None.
        copies: number of copies.
        dim: dimension to concatenate along (0 for ``A``, 1 for ``B``).

    Returns:
        Tensor with ``weight.shape[dim] * copies`` entries along ``dim``.

    Example:
        >>> import torch
        >>> a = torch.ones(2, 3)
        >>> m = torch.tensor([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]], dtype=torch.bool)
        >>> concat_copies(a, m, 2, 0).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if masks is None:
        return weight if copies == 1 else torch.cat([weight] * copies, dim=dim)
    stacked = masks * weight.unsqueeze(0)  # (copies, *weight.shape)
    return stacked.movedim(0, dim).flatten(dim, dim + 1)


# --------------------------------------------------------------------------------------------
# Finding, wrapping and freezing layers


def _check_targets(targets: object) -> tuple[tuple[type, ...], tuple[str, ...]]:
    valid = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
    try:
        items = (targets,) if isinstance(targets, (str, type)) else tuple(targets)
    except TypeError:
        raise ValueError(f"targets must be layer types among {valid} and/or module name "
                         f"patterns (str), got {targets!r}") from None
    types, patterns = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, SUPPORTED_TYPES):
            types.append(item)
        else:
            raise ValueError(
                f"targets must hold layer types among {valid} (or subclasses) and/or module "
                f"name patterns (str), got {item!r}"
            )
    if not items:
        raise ValueError(f"targets is empty; give layer types among {valid} or name patterns")
    return tuple(types), tuple(patterns)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _named(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern matches ``name`` or the name of a module containing it."""
    return any(fnmatch.fnmatchcase(p, pat) for p in _prefixes(name) for pat in patterns)


def _attention_projections(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of each ``nn.MultiheadAttention`` in ``model``: it reads that
    layer's weight directly, so a wrapper there would break it (never a target)."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _candidates(model: nn.Module, patterns: Sequence[str]) -> str:
    """The tail of a no-match error: the layers a target could name, those already wrapped,
    and the layers of unsupported types (Conv1d, ...) and attention ``out_proj`` layers that
    ``patterns`` name."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, PEFTLayer)]
    inside = tuple(f"{n}." for n in wrapped)
    never = _attention_projections(model)
    shown = ", ".join(n for n, m in model.named_modules()
                      if n and isinstance(m, SUPPORTED_TYPES) and not n.startswith(inside)
                      and n not in never)
    # layers with a weight of another type (Conv1d, Conv3d, ConvTranspose2d, ...) that a
    # pattern names: say why they are not candidates
    other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
             if n and not isinstance(m, SUPPORTED_TYPES) and not n.startswith(inside)
             and isinstance(getattr(m, "weight", None), torch.Tensor)
             and _named(n, patterns)]
    valid = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
    attention = [n for n in sorted(never) if _named(n, patterns)]
    return (f"; candidate layers: {shown or 'none'}"
            + (f"; {', '.join(attention)}: an nn.MultiheadAttention's out_proj is never wrapped "
               "(the attention reads its weight directly)" if attention else "")
            + (f"; already wrapped: {', '.join(wrapped)}" if wrapped else "")
            + (f"; the pattern(s) name layers of unsupported types: {', '.join(other)} "
               f"(LoRA / adapters wrap {valid})" if other else ""))


def find_targets(
    model: nn.Module, targets: object, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The ``Conv2d`` / ``Linear`` layers of ``model`` selected by ``targets``.

    ``targets`` is a layer type, a name pattern, or a sequence of them. A layer is selected when
    it is an instance of one of the given types, or when a pattern (``fnmatch`` glob, e.g.
    ``"core.*"`` or ``"head"``) matches its qualified name or the name of a module containing
    it (so ``"core"`` selects every supported layer inside ``core``; a bare ``"conv1"`` matches
    a top-level name only, ``"*conv1"`` every layer so named). Layers under a name in
    ``exclude``, layers already inside a PEFT wrapper and the ``out_proj`` of an
    ``nn.MultiheadAttention`` (which reads its weight directly) are skipped; a layer shared by
    several parents counts once.

    Raises:
        ValueError: bad ``targets``, no layer selected, a pattern that selects no layer, or
            ``model`` itself selected.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> [name for name, _ in find_targets(net, nn.Conv2d)]
        ['0']
        >>> [name for name, _ in find_targets(net, ["2"])]
        ['2']
    """
    types, patterns = _check_targets(targets)
    skipped: list[str] = list(exclude)
    attention_projections = _attention_projections(model)
    selected = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skipped if s):
            continue
        if isinstance(module, PEFTLayer):
            skipped.append(name)
            continue
        if not isinstance(module, SUPPORTED_TYPES) or name in attention_projections:
            continue
        by_type = isinstance(module, types) if types else False
        by_name = _named(name, patterns)
        if by_type or by_name:
            selected.append((name, module))
    unused = [pat for pat in patterns
              if not any(_named(n, [pat]) for n, _ in selected)]
    if selected and unused:
        raise ValueError(f"target pattern(s) {unused} match no layer (misspelt?)"
                         + _candidates(model, unused))
    if not selected:
        raise ValueError(
            f"no module matched targets {targets!r} (layers already wrapped and excluded ones "
            "are skipped)" + _candidates(model, patterns)
        )
    if any(name == "" for name, _ in selected):
        raise ValueError(
            f"the model itself ({type(model).__name__}) is a target; pass a module containing "
            "the layers to wrap"
        )
    return selected


def replace_layers(model: nn.Module, wrappers: dict[int, nn.Module]) -> None:
    """Put each wrapper where its base layer (keyed by ``id``) sits, under every parent.

    Example:
        >>> from wtmodels.peft import LoRALayer
        >>> lin = nn.Linear(3, 3)
        >>> net = nn.Sequential(lin, nn.ReLU(), lin)  # one layer under two names
        >>> replace_layers(net, {id(lin): LoRALayer.wrap(lin, rank=1)})
        >>> [type(m).__name__ for m in net], net[0] is net[2]
        (['LoRALinear', 'ReLU', 'LoRALinear'], True)
    """
    parents = list(model.modules())  # listed before the swap: never recurse into wrappers
    for parent in parents:
        for child_name, child in list(parent._modules.items()):  # duplicates included
            if id(child) in wrappers:
                setattr(parent, child_name, wrappers[id(child)])


def resolve_head(model: nn.Module, train_head: bool | str) -> str | None:
    """Name of the module whose parameters stay trainable (``True`` means ``"head"``).

    Example:
        >>> net = nn.Sequential()
        >>> net.body, net.head = nn.Linear(3, 3), nn.Linear(3, 2)
        >>> resolve_head(net, True), resolve_head(net, False), resolve_head(net, "body")
        ('head', None, 'body')
        >>> resolve_head(net, "fc")
        Traceback (most recent call last):
        ...
        ValueError: train_head: no module named 'fc'; top-level modules: body, head
    """
    if train_head is False or train_head is None:
        return None
    name = "head" if train_head is True else train_head
    if not isinstance(name, str):
        raise ValueError(f"train_head must be a bool or a module name, got {train_head!r}")
    names = dict(model.named_modules())
    if name not in names or name == "":
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"train_head: no module named {name!r}; top-level modules: {top}")
    return name


def freeze_base(model: nn.Module, head: str | None) -> None:
    """Freeze every parameter except those of PEFT wrappers and of the module ``head``.

    Example:
        >>> net = nn.Sequential()
        >>> net.body, net.head = nn.Linear(3, 3), nn.Linear(3, 2)
        >>> freeze_base(net, "head")
        >>> [name for name, p in net.named_parameters() if p.requires_grad]
        ['head.weight', 'head.bias']
    """
    keep = {id(p) for m in model.modules() if isinstance(m, PEFTLayer) for p in m.peft_parameters()}
    if head is not None:
        keep |= {id(p) for p in model.get_submodule(head).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameter entries of ``model`` (shared parameters counted once).

    Example:
        >>> from torch import nn
        >>> count_trainable(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_layers(model: nn.Module, kind: type = PEFTLayer) -> list[PEFTLayer]:
    """The PEFT wrappers of class ``kind`` inside ``model`` (each once).

    Example:
        >>> from wtmodels.peft import LoRAConv2d, LoRALinear, add_lora
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = add_lora(net, rank=1, targets=nn.Linear)
        >>> len(peft_layers(net)), len(peft_layers(net, LoRALinear)), peft_layers(net, LoRAConv2d)
        (2, 2, [])
        >>> count_trainable(net)  # the factors alone: A (1, 3) + B (3, 1), A (1, 3) + B (2, 1)
        11
    """
    return [m for m in model.modules() if isinstance(m, kind)]


# --------------------------------------------------------------------------------------------
# Forming the masked copies once per forward pass


def _live_frames() -> set[int]:
    """Ids of the frames on the current call stack."""
    live, frame = set(), sys._getframe(1)
    while frame is not None:
        live.add(id(frame))
        frame = frame.f_back
    return live


def _drop_stale(model: nn.Module, layers: list[PEFTLayer]) -> None:
    """Forget weights formed by passes that ended without the releasing forward hook.

    torch runs an ``always_call`` forward hook after an ``Exception`` only: a pass cut short by
    a ``KeyboardInterrupt`` (Ctrl-C in a notebook) left its formed weights behind, and the
    next passes would reuse them (old factor values, a graph freed by the first backward). A
    pass is live while the frame that ran its pre-hook (and runs its forward) is on the stack.
    """
    live = _live_frames()
    stack = model._peft_formed_stack
    stack[:] = [entry for entry in stack if id(entry[0]) in live]
    for layer in layers:
        if layer._formed is not None and id(getattr(layer, "_formed_frame", None)) not in live:
            layer._formed, layer._formed_frame = None, None


def _form_all(model: nn.Module, args: tuple) -> None:
    layers = peft_layers(model)
    frame = None
    if not torch.compiler.is_compiling():
        _drop_stale(model, layers)
        frame = sys._getframe(1)  # runs the pre-hooks, then the forward (torch's _call_impl)
    fresh = [m for m in layers if m._formed is None and m.active]
    for layer in fresh:
        layer._formed, layer._formed_frame = layer.form(), frame
    model._peft_formed_stack.append((frame, fresh))


def _release_all(model: nn.Module, args: tuple, output: object) -> None:
    stack = model._peft_formed_stack
    for layer in stack.pop()[1] if stack else ():
        layer._formed, layer._formed_frame = None, None


def install_forming_hooks(model: nn.Module) -> None:
    """Make ``model``'s forward pass form every wrapper's masked copies once, on entry.

    A forward pre-hook forms them, a forward hook (run even when the forward raises) drops
    them, so every call of a wrapper inside the pass (D calls in a weight-tied cell) reuses one
    formed tensor and gradients of all calls meet in it. What a pass cut short by a
    ``KeyboardInterrupt`` formed (torch skips the hook then) is dropped by the next pass.
    Installing twice is a no-op. Transformer encoder layers holding wrappers are kept off
    torch's fused eval path (:func:`~wtmodels.masks.keep_transformer_fused_path_off`).

    Example:
        >>> from wtmodels.peft import LoRALayer
        >>> layer = LoRALayer.wrap(nn.Linear(4, 4), rank=2, copies=2, density=0.5)
        >>> net = nn.Sequential(layer, layer)  # one wrapper applied twice (weight tied)
        >>> install_forming_hooks(net); install_forming_hooks(net)
        >>> seen = []  # whether the copies were formed already when the wrapper runs
        >>> _ = layer.register_forward_pre_hook(lambda m, args: seen.append(m._formed is not None))
        >>> _ = net(torch.randn(1, 4))
        >>> seen, layer._formed is None, len(net._forward_pre_hooks)  # formed once, then dropped
        ([True, True], True, 1)
    """
    keep_transformer_fused_path_off(model, lambda m: isinstance(m, PEFTLayer))
    if _form_all in model._forward_pre_hooks.values():
        return
    model._peft_formed_stack = _FormedStack()
    model.register_forward_pre_hook(_form_all)
    model.register_forward_hook(_release_all, always_call=True)
