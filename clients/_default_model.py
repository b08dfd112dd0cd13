"""Which model a call uses when it names none: the one model the server holds."""

from __future__ import annotations

from collections.abc import Sequence

from ._types import ModelInfo

__all__ = ["only_model"]


def only_model(models: Sequence[ModelInfo]) -> str:
    """The name of the only model in ``models``.

    Raises:
        ValueError: there are none or several: the caller must pass ``model=``.
    """
    if len(models) == 1:
        return models[0].name
    names = ", ".join(m.name for m in models) or "none"
    raise ValueError(f"the server holds several models ({names}): pass model=")
