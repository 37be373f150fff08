"""Implementation switches of the library: one frozen object, read by the code where it decides.

These change how the result is computed (which kernel, whether CUDA graphs are used, which
threshold algorithm), never what is computed beyond fp32 rounding: the method's settings
are :class:`flexprefill.FlexPrefillConfig`.  Defaults come from ``FLEXPREFILL_*`` environment
variables, read once when this module is imported; change them later with
:func:`set_options` or, for a block of code, :func:`use_options`::

    import flexprefill as fp
    with fp.use_options(search_graphs=False):
        fp.flex_prefill_attention(q, k, v)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, fields, replace

__all__ = ["Options", "options", "set_options", "use_options", "set_from_env", "interpreting", "ENV"]

HOPPER_KERNELS = ("auto", "tiled", "ws", "off")
GRAPH_POOLS = ("shared", "private")


@dataclass(frozen=True)
class Options:
    """The implementation switches (environment variable of each default in brackets).

    Args:
        rep_block_stats: the representative rows' first pass over the keys stores each key
            block's row max and sum, so the block-mass pass reads them instead of passing
            over the keys again.  None (default): while sequences x query heads x key blocks
            <= 2^14, where it measured faster; True / False: always / never.
            [``FLEXPREFILL_REP_BLOCK_STATS``: ``1``, ``0``, unset]
        radix_select: the query-aware ranking's gamma threshold by radix selection on the
            fp32 bit patterns (no sort); False: a stable sort and its cumulative sum.
            [``FLEXPREFILL_RADIX_SELECT=0`` turns it off]
        search_graphs: replay the pattern search from cached CUDA graphs where launches bound
            its time (on CUDA; never while the caller is capturing a graph).
            [``FLEXPREFILL_SELECTION_GRAPHS=0`` turns it off]
        whole_search_graph: the dense search's passes over q and k join its graph (the graph
            reads q and k where they are); False: they run eagerly and only the rest is
            graphed.  [``FLEXPREFILL_SEARCH_GRAPH=0`` turns it off]
        search_graph_max_elems: past 256 blocks a search is graphed while heads x blocks^2 is
            at most this (0: graphs up to 256 blocks only).
            [``FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS``, default 2^24]
        graph_pool: "shared" (one memory pool per device for every cached search graph) or
            "private" (one pool per graph).  [``FLEXPREFILL_GRAPH_POOL``]
        graph_seed: seed a graph's pool with one block sized by trial calls, so the
            capture's requests are carved from it.  [``FLEXPREFILL_GRAPH_SEED=0`` turns it off]
        int16_block_ids: the operator's own block tables hold int16 block ids while there
            are fewer than 2^15 blocks (half the memory); False: int32.
            [``FLEXPREFILL_INT16_BLOCK_IDS=0`` turns it off]
        tma: the Triton kernel loads off-diagonal K/V tiles through tensor descriptors where
            the layout and the GPU (Hopper or newer) allow.  [``FLEXPREFILL_TMA=0`` turns it off]
        hopper_kernel: which Gluon kernel the sparse attention runs on Hopper: "auto" (per
            head dim: tiled at 64, warp-specialised at 128 and 256), "tiled", "ws"
            (warp-specialised) or "off" (the Triton kernel).
            [``FLEXPREFILL_HOPPER_KERNEL``: unset, ``1``, ``ws``, ``0``]
        diag_first: the Triton kernel runs the diagonal block before the listed ones.  None
            (default): for padded head dim 64 only; True / False: always / never.
            [``FLEXPREFILL_DIAG_FIRST``: unset, ``1``, ``0``]
        dense_cudnn: dense attention on CUDA asks SDPA for cuDNN first; False: torch's own
            order.  [``FLEXPREFILL_DENSE_CUDNN=0`` turns it off]
    """

    rep_block_stats: bool | None = None
    radix_select: bool = True
    search_graphs: bool = True
    whole_search_graph: bool = True
    search_graph_max_elems: int = 1 << 24
    graph_pool: str = "shared"
    graph_seed: bool = True
    int16_block_ids: bool = True
    tma: bool = True
    hopper_kernel: str = "auto"
    diag_first: bool | None = None
    dense_cudnn: bool = True

    def __post_init__(self) -> None:
        for name in ("radix_select", "search_graphs", "whole_search_graph", "graph_seed", "int16_block_ids", "tma",
                     "dense_cudnn"):
            _check_bool(name, getattr(self, name))
        for name in ("rep_block_stats", "diag_first"):
            if getattr(self, name) is not None:
                _check_bool(name, getattr(self, name), "True, False or None (automatic)")
        n = self.search_graph_max_elems
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"search_graph_max_elems={n!r} must be an int >= 0")
        if self.graph_pool not in GRAPH_POOLS:
            raise ValueError(f"graph_pool={self.graph_pool!r} is not supported; accepted: {GRAPH_POOLS}")
        if self.hopper_kernel not in HOPPER_KERNELS:
            raise ValueError(f"hopper_kernel={self.hopper_kernel!r} is not supported; accepted: {HOPPER_KERNELS}")


def _check_bool(name: str, value, accepted: str = "True or False") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be {accepted}")


def _off_if_zero(v: str) -> bool:
    return v != "0"


def _tri_state(v: str):
    return {"0": False, "1": True}.get(v)


def _max_elems(v: str) -> int:
    return max(0, int(v)) if v else Options.search_graph_max_elems


# field -> (environment variable, parser of its value); an unset variable keeps the field's default
ENV = {
    "rep_block_stats": ("FLEXPREFILL_REP_BLOCK_STATS", _tri_state),
    "radix_select": ("FLEXPREFILL_RADIX_SELECT", _off_if_zero),
    "search_graphs": ("FLEXPREFILL_SELECTION_GRAPHS", _off_if_zero),
    "whole_search_graph": ("FLEXPREFILL_SEARCH_GRAPH", _off_if_zero),
    "search_graph_max_elems": ("FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS", _max_elems),
    "graph_pool": ("FLEXPREFILL_GRAPH_POOL", lambda v: "private" if v == "private" else "shared"),
    "graph_seed": ("FLEXPREFILL_GRAPH_SEED", _off_if_zero),
    "int16_block_ids": ("FLEXPREFILL_INT16_BLOCK_IDS", _off_if_zero),
    "tma": ("FLEXPREFILL_TMA", _off_if_zero),
    "hopper_kernel": ("FLEXPREFILL_HOPPER_KERNEL", lambda v: {"1": "tiled", "ws": "ws", "0": "off"}.get(v, "auto")),
    "diag_first": ("FLEXPREFILL_DIAG_FIRST", _tri_state),
    "dense_cudnn": ("FLEXPREFILL_DENSE_CUDNN", _off_if_zero),
}


def _from_env(environ) -> Options:
    """Options whose defaults the ``FLEXPREFILL_*`` variables of ``environ`` override; a value
    that cannot be read keeps the default, with a warning."""
    changes = {}
    for name, (var, parse) in ENV.items():
        raw = environ.get(var)
        if raw is None:
            continue
        try:
            changes[name] = parse(raw)
        except ValueError:
            warnings.warn(f"flexprefill: {var}={raw!r} cannot be read; {name} keeps its default", RuntimeWarning,
                          stacklevel=3)
    return Options(**changes)


_current = _from_env(os.environ)
# triton's interpreter is chosen by TRITON_INTERPRET when triton is imported; read it once too
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def options() -> Options:
    """The options in force."""
    return _current


def set_options(**changes) -> Options:
    """Change some options (validated: a bad name or value raises and changes nothing); returns
    the options now in force."""
    global _current
    names = {f.name for f in fields(Options)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; accepted: {sorted(names)}")
    _current = replace(_current, **changes)
    return _current


@contextlib.contextmanager
def use_options(**changes):
    """Options changed for the ``with`` block (validated as in :func:`set_options`), restored after it."""
    global _current
    before = _current
    set_options(**changes)
    try:
        yield _current
    finally:
        _current = before


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when
    flexprefill was imported)."""
    return _TRITON_INTERPRET


def set_from_env(var: str, value: str | None) -> Options:
    """Set the option of environment variable ``var`` (e.g. ``"FLEXPREFILL_TMA"``) as if
    ``value`` had been in the environment at import (None: the option's default), for scripts
    that sweep switches by their variable names; returns the options now in force."""
    by_var = {v: (name, parse) for name, (v, parse) in ENV.items()}
    if var not in by_var:
        raise ValueError(f"{var!r} is not an option's variable; accepted: {sorted(by_var)}")
    name, parse = by_var[var]
    return set_options(**{name: getattr(Options(), name) if value is None else parse(value)})
