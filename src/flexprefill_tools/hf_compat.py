"""The KV cache's name in transformers' model calls, across releases.

Later releases call the forward's cache argument and output field ``cache`` and warn on
``past_key_values`` (to be removed); earlier ones know only ``past_key_values``.
"""

from __future__ import annotations

import inspect

__all__ = ["cache_kwarg", "cache_of", "with_cache"]


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache argument: ``cache`` or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``), None if none."""
    for name in ("cache", "past_key_values"):
        if name in out:
            return out[name]
    return None


def with_cache(model, cache) -> dict:
    """``{name: cache}`` to pass to ``model(...)`` under the name its forward takes."""
    return {cache_kwarg(model): cache}
