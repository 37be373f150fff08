"""Interchangeable executors of a :class:`flexprefill.BlockSelection`.

Every backend takes ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]`` and a selection in
the one shared format (``counts [B, Hq, nb]``, ascending ``indices [B, Hq, nb, nb]``,
-1 padded) and returns ``out [B, N, Hq, D]``.
"""

from .flex_attention import flex_attention_from_selection, selection_to_block_mask

__all__ = ["flex_attention_from_selection", "selection_to_block_mask"]
