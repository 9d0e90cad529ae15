"""wtmodels: weight-tied, implicit (DEQ), ODE and untied vision models with distinct sparse masks.

The public names are imported lazily, so ``import wtmodels as wt`` is cheap and each
submodule loads on first use.

Example:
    >>> import torch, wtmodels as wt
    >>> z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), method="anderson")
    >>> bool(stats.converged.all())
    True
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it (one line per name; add yours here)
_EXPORTS = {
    # fixed-point engine
    "solve": "wtmodels.solvers",
    "list_solvers": "wtmodels.solvers",
    "register_solver": "wtmodels.solvers",
    "get_solver": "wtmodels.solvers",
    "SolverStats": "wtmodels.solvers",
    "DEQ": "wtmodels.implicit",
    # masks
    "make_masks": "wtmodels.masks",
    "apply_masks": "wtmodels.masks",
    "remove_masks": "wtmodels.masks",
    # models
    "create_model": "wtmodels.models",
    "list_models": "wtmodels.models",
    "register_model": "wtmodels.models",
    "get_config": "wtmodels.models",
    "ModelConfig": "wtmodels.models",
    "ImplicitClassifier": "wtmodels.models",
    "model_summary": "wtmodels.models",
    # data and training
    "get_datasets": "wtmodels.data",
    "list_datasets": "wtmodels.data",
    "build_loaders": "wtmodels.data",
    "TrainConfig": "wtmodels.train_config",
    # parameter-efficient fine-tuning
    "add_lora": "wtmodels.peft",
    "add_adapters": "wtmodels.peft",
    "merge_lora": "wtmodels.peft",
    "unmerge_lora": "wtmodels.peft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wtmodels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access skips this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
