"""Unknown keyword arguments as a ``ValueError`` that names the valid ones.

Python's own ``TypeError`` ("got an unexpected keyword argument") names none; the public
builders take ``**unknown`` and pass it here.

Example:
    >>> from wtmodels.keywords import refuse_unknown
    >>> refuse_unknown("build", {"sed": 1}, ("seed", "size"))
    Traceback (most recent call last):
    ...
    ValueError: build got unknown keyword(s) ['sed']; valid: ['seed', 'size']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable


def refuse_unknown(where: str, unknown: dict, valid: Iterable[str]) -> None:
    """``ValueError`` naming the valid keywords when ``unknown`` is not empty.

    Example:
        >>> refuse_unknown("build", {}, ("seed",))  # nothing unknown: no error
    """
    if unknown:
        raise ValueError(f"{where} got unknown keyword(s) {sorted(unknown)}; "
                         f"valid: {sorted(valid)}")


def keyword_names(fn: Callable) -> tuple[str, ...]:
    """The names ``fn`` takes as keywords (its ``*args`` / ``**kwargs`` left out).

    Example:
        >>> keyword_names(lambda a, b=1, *rest, c, **more: None)
        ('a', 'b', 'c')
    """
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind not in skip)
