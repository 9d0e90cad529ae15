"""Parameter-efficient fine-tuning: LoRA and bottleneck adapters with CapaBoost masked copies.

CapaBoost raises the rank of a parameter-efficient update at no parameter cost: one shared set
of update weights is used as ``d`` copies under ``d`` distinct static random masks and the
copies' outputs are summed (the same idea as distinct masks per iteration of a weight-tied
cell). ``add_lora`` and ``add_adapters`` wrap chosen ``Conv2d`` / ``Linear`` layers of a built
model, freeze the rest, and return the wrappers.

============================  ==============================================================
name                          what
============================  ==============================================================
:func:`add_lora`              wrap layers with (CapaBoost-)LoRA updates
:func:`add_adapters`          add (CapaBoost) bottleneck adapters after layers
:func:`merge_lora`            fold every LoRA update into its base weight (base-speed inference)
:func:`unmerge_lora`          undo the merge
:func:`count_trainable`       trainable parameter entries of a model
:class:`LoRALayer`            one wrapped layer: ``delta_weight()``, ``merge()``, ``unmerge()``
:class:`AdapterLayer`         one adapted layer
============================  ==============================================================

Example:
    >>> import torch
    >>> from torch import nn
    >>> from wtmodels.peft import add_lora, count_trainable, merge_lora
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> lora = add_lora(net, rank=2, copies=4, density=0.5, seed=0)
    >>> count_trainable(net)  # A: (2, 1, 3, 3) + B: (8, 2); A: (2, 8, 3, 3) + B: (8, 2)
    194
    >>> x = torch.randn(2, 1, 6, 6)
    >>> y = net(x)
    >>> merge_lora(net)
    2
    >>> torch.allclose(net(x), y, atol=1e-6)
    True
"""

from wtmodels.peft.adapters import ACTIVATIONS, AdapterLayer, add_adapters
from wtmodels.peft.lora import LoRAConv2d, LoRALayer, LoRALinear, add_lora, merge_lora, unmerge_lora
from wtmodels.peft.wrap import SUPPORTED_TYPES, PEFTLayer, count_trainable, peft_layers

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_TYPES",
    "AdapterLayer",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "PEFTLayer",
    "add_adapters",
    "add_lora",
    "count_trainable",
    "merge_lora",
    "peft_layers",
    "unmerge_lora",
]
