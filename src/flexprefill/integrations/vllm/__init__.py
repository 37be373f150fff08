"""FlexPrefill as a vLLM (V1) attention backend.

``pip install "flexprefill[vllm]"`` installs an entry point in vLLM's ``vllm.general_plugins``
group; vLLM calls :func:`register` in every process it starts, which registers
:class:`~flexprefill.integrations.vllm.backend.FlexPrefillBackend` as vLLM's ``CUSTOM``
attention backend.  Select it with ``--attention-backend CUSTOM`` (``vllm serve``) or
``LLM(model=..., attention_backend="CUSTOM")``.  Settings: :mod:`.settings`.

The backend subclasses vLLM's FlashAttention backend: decode rows and short prefill chunks
run vLLM's FlashAttention code; a prefill chunk whose context reaches ``min_seq_len`` runs
:func:`flexprefill.flex_prefill_attention_varlen` over its K/V read from the paged cache.

Importing this package does not import vLLM (``backend`` does); :mod:`.plan`,
:mod:`.attention` and :mod:`.settings` need torch only.
"""

from __future__ import annotations

import logging

__all__ = ["BACKEND_PATH", "register"]

BACKEND_PATH = "flexprefill.integrations.vllm.backend.FlexPrefillBackend"

_log = logging.getLogger(__name__)


def register() -> None:
    """Register FlexPrefill as vLLM's ``CUSTOM`` attention backend (the plugin entry point).

    Safe to call more than once.  When another plugin already registered a different class
    as ``CUSTOM``, that one is kept and a warning names both (``VLLM_PLUGINS`` chooses which
    plugins vLLM loads)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    current = custom.get_path() if custom.is_overridden() else None
    if current is not None and current != BACKEND_PATH:
        _log.warning("flexprefill: vLLM's CUSTOM attention backend is already %s; not registering %s "
                     "(set VLLM_PLUGINS to load one of the two plugins)", current, BACKEND_PATH)
        return
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
