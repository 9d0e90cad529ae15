"""Bottleneck adapters with CapaBoost masked parallel copies.

An adapter follows a frozen ``Conv2d`` / ``Linear`` layer and adds a residual bottleneck on its
output ``h`` (over channels: ``1 x 1`` convolutions for a conv, linear maps for a linear layer):

    h + sum_{i=1..d} (M_U^i * U) act((M_D^i * D) h + b_D) + b_U

``D`` ``(b, C)`` and ``U`` ``(C, b)`` are shared by the ``d`` copies, each under its own static
masks (CapaBoost's second use), so the trainable parameters do not depend on ``d`` or the
density. ``d = 1`` at density 1 is the plain (Houlsby) adapter. The activation acts entrywise,
so the sum over copies is one down-projection to ``d * b`` channels and one up-projection.
``U`` starts at zero: an adapted model starts equal to the base model. Adapters are non-linear
and cannot be merged into the base weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wtmodels.keywords import keyword_names, refuse_unknown
from wtmodels.masks import derive_seed
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
    replace_layers,
    resolve_head,
    wrap_each,
)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class AdapterLayer(PEFTLayer):
    """A frozen ``Conv2d`` / ``Linear`` followed by a (CapaBoost) bottleneck adapter.

    Use :func:`add_adapters` to adapt a model; this class wraps one layer.

    Attributes:
        base: the wrapped layer.
        adapter_down: ``(bottleneck, C)`` (Kaiming-uniform init); ``adapter_down_bias``
            ``(bottleneck,)``, shared by the copies.
        adapter_up: ``(C, bottleneck)``, zero init; ``adapter_up_bias`` ``(C,)``, added once.
        mask_down, mask_up: bool buffers ``(copies, *weight.shape)``; None at density 1.

    Args:
        base: the layer whose output is adapted (``nn.Conv2d`` or ``nn.Linear``).
        bottleneck: bottleneck width ``b`` of each copy (>= 1).
        copies: number ``d`` of masked copies (>= 1).
        density: share of entries each mask keeps, in (0, 1].
        kind: mask kind, ``"random"``, ``"bernoulli"`` or ``"nm"``.
        seed: seed of this layer's masks.
        activation: one of ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``.

    Example:
        >>> import torch
        >>> layer = AdapterLayer(torch.nn.Conv2d(3, 8, 3, padding=1), bottleneck=2, copies=2,
        ...                      density=0.5)
        >>> layer(torch.randn(1, 3, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(
        self,
        base: nn.Module,
        bottleneck: int,
        copies: int = 1,
        density: float = 1.0,
        kind: str = "random",
        seed: int = 0,
        activation: str = "relu",
    ):
        check_adapter_args(bottleneck, copies, density, kind, activation, seed)
        bottleneck, copies, density, seed = int(bottleneck), int(copies), float(density), int(seed)
        if not isinstance(base, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"adapters follow nn.Conv2d or nn.Linear, got {type(base).__name__}")
        check_materialized(base)
        super().__init__(base)
        self.bottleneck = bottleneck
        self.copies = copies
        self.density = float(density)
        self.kind = kind
        self.activation = activation
        self.is_conv = isinstance(base, nn.Conv2d)
        channels = base.out_channels if self.is_conv else base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_down = nn.Parameter(torch.empty(bottleneck, channels, **factory))
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck, **factory))
        self.adapter_up = nn.Parameter(torch.zeros(channels, bottleneck, **factory))
        self.adapter_up_bias = nn.Parameter(torch.zeros(channels, **factory))
        nn.init.kaiming_uniform_(self.adapter_down, a=5**0.5)
        for name, weight in (("down", self.adapter_down), ("up", self.adapter_up)):
            masks = draw_copy_masks(weight.shape, copies, density, kind, derive_seed(seed, name),
                                    label=f"adapter_{name}")
            self.register_buffer(
                f"mask_{name}", None if masks is None else masks.to(weight.device)
            )

    def peft_parameters(self) -> list[nn.Parameter]:
        return [self.adapter_down, self.adapter_down_bias, self.adapter_up, self.adapter_up_bias]

    def form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(down_cat (d b, C), down_bias_cat (d b,), up_cat (C, d b))``."""
        down = concat_copies(self.adapter_down, self.mask_down, self.copies, 0)  # (d*b, C)
        bias = self.adapter_down_bias.repeat(self.copies)  # (d*b,)
        up = concat_copies(self.adapter_up, self.mask_up, self.copies, 1)  # (C, d*b)
        return down, bias, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (N, C, H, W) or (..., C)
        down, bias, up = self.formed()
        act = ACTIVATIONS[self.activation]
        if self.is_conv:
            z = act(F.conv2d(h, down[:, :, None, None], bias))  # (N, d*b, H, W)
            return h + F.conv2d(z, up[:, :, None, None], self.adapter_up_bias)
        z = act(F.linear(h, down, bias))  # (..., d*b)
        return h + F.linear(z, up, self.adapter_up_bias)

    def extra_repr(self) -> str:
        return (
            f"bottleneck={self.bottleneck}, copies={self.copies}, density={self.density:g}, "
            f"kind={self.kind!r}, activation={self.activation!r}"
        )


def check_adapter_args(bottleneck, copies, density, kind, activation, seed=0) -> None:
    """Validate the arguments of :func:`add_adapters` before anything is changed.

    Example:
        >>> check_adapter_args(bottleneck=4, copies=2, density=0.5, kind="nm", activation="gelu")
        >>> check_adapter_args(4, 2, 0.5, "random", activation="relu6")
        Traceback (most recent call last):
        ...
        ValueError: unknown activation 'relu6'; valid activations: relu, gelu, silu, tanh
    """
    check_int("bottleneck", bottleneck)
    check_copy_args(copies, density, kind, seed)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; valid activations: {', '.join(ACTIVATIONS)}"
        )


def add_adapters(
    model: nn.Module,
    bottleneck: int,
    copies: int = 1,
    density: float = 1.0,
    kind: str = "random",
    seed: int = 0,
    targets: type | str | Sequence[type | str] = (nn.Conv2d,),
    activation: str = "relu",
    train_head: bool | str = False,
    **unknown,
) -> list[AdapterLayer]:
    """Put a (CapaBoost) bottleneck adapter after selected layers of ``model``.

    Selection, replacement, freezing and mask seeding work as in
    :func:`wtmodels.peft.add_lora` (see there for ``targets`` and ``train_head``).

    Args:
        model: the model to adapt (in place).
        bottleneck: bottleneck width ``b`` (>= 1).
        copies: CapaBoost copies ``d`` (>= 1).
        density: share of entries each copy's masks keep, in (0, 1].
        kind: mask kind: ``"random"``, ``"bernoulli"`` or ``"nm"``.
        seed: base seed of the masks.
        targets: layer types and/or name patterns (default: every ``Conv2d``).
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        train_head: keep the head (``True``: module ``"head"``; or a module name) trainable.

    Returns:
        The new wrappers, in module order.

    Raises:
        ValueError: ``bottleneck < 1``, ``copies < 1``, density outside (0, 1], unknown mask
            kind or activation, bad targets, no layer matched, an unknown head, an unknown
            keyword (the message names the valid ones).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> layers = add_adapters(net, bottleneck=2, copies=2, density=0.5, targets=["0"])
        >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # 2*8 + 2 + 8*2 + 8
        42
    """
    refuse_unknown("add_adapters", unknown, keyword_names(add_adapters))
    check_adapter_args(bottleneck, copies, density, kind, activation, seed)
    head = resolve_head(model, train_head)
    selected = find_targets(model, targets, exclude=() if head is None else (head,))
    wrappers = wrap_each(selected, lambda name, layer: AdapterLayer(
        layer, bottleneck, copies=copies, density=density, kind=kind,
        seed=derive_seed(seed, name), activation=activation,
    ))  # every layer validated before the model changes
    replace_layers(model, wrappers)
    freeze_base(model, head)
    install_forming_hooks(model)
    return list(wrappers.values())
