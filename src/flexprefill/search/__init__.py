"""FlexPrefill's pattern search on the device: Triton for the streamed scores, batched
PyTorch for the rest.  No host sync and no Python loop over data-dependent values, so a
fixed shape can be captured in a CUDA graph (``graph`` wraps the plain search below from
outside).  Semantics match ``flexprefill.reference.select_blocks`` exactly (same ranks, same
tie-breaking; the radix threshold may take one ranked entry more or less where a running
sum sits on the goal within fp32 rounding).

Modules: ``scores`` (steps 1-3: representative scores, block means, estimate), ``gamma``
(the gamma rule), ``block_sets`` (step 4: the sets and the block table), ``graph`` (the
CUDA-graph cache), ``device`` (the entry points below); ``torch_search`` is the same search
in plain PyTorch, all heads at once, equal to the oracle's block table: the "torch" backend's
search, importable without Triton.
"""

try:
    import triton as _triton  # noqa: F401
except ModuleNotFoundError:  # CPU torch wheels bring no triton: only ``torch_search`` is importable then
    __all__ = []
else:
    from . import block_sets, graph  # noqa: F401
    from .device import *  # noqa: F401,F403
    from .device import __all__  # noqa: F401
