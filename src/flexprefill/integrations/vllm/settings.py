"""Settings of the vLLM backend: a :class:`FlexPrefillConfig`, the layers that may run it and
runtime options, read from an environment variable and from vLLM's ``additional_config``.

Two sources, both JSON objects with the same keys; the second overrides the first key by key:

1. ``FLEXPREFILL_VLLM_CONFIG``: a JSON object, e.g.
   ``FLEXPREFILL_VLLM_CONFIG='{"gamma": 0.9, "min_seq_len": 16384}'``.  Environment variables
   reach vLLM's engine and worker processes.
2. ``additional_config={"flexprefill": {...}}`` of ``LLM(...)`` (``--additional-config`` of
   ``vllm serve``): travels with vLLM's config to every process.

Keys: every field of :class:`FlexPrefillConfig` (``gamma``, ``tau``, ``min_seq_len``,
``block_size``, ``min_budget``, ``max_budget``, ``dense_above``, ``backend``); ``layers``: a
list of layer indices that may run FlexPrefill (default: every layer that can; the others
keep vLLM's FlashAttention); ``options``: :class:`flexprefill.Options` fields applied while
FlexPrefill runs (e.g. ``{"search_graphs": false}``); ``enabled``: false runs vLLM's
FlashAttention everywhere (the backend then only adds a check per step).
This module does not import vLLM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ...config import FlexPrefillConfig
from ...options import Options

__all__ = ["ENV_VAR", "CONFIG_KEY", "VllmSettings", "load_settings", "parse_settings", "layer_index"]

ENV_VAR = "FLEXPREFILL_VLLM_CONFIG"
CONFIG_KEY = "flexprefill"

_CONFIG_FIELDS = tuple(f.name for f in fields(FlexPrefillConfig))
_OPTION_FIELDS = tuple(f.name for f in fields(Options))
_KEYS = _CONFIG_FIELDS + ("layers", "options", "enabled")


@dataclass(frozen=True)
class VllmSettings:
    """What the vLLM backend runs.

    Attributes:
        config: the FlexPrefill settings of every sparse chunk.
        layers: layer indices that may run FlexPrefill, or None for every layer that can.
        options: :class:`flexprefill.Options` changes applied while FlexPrefill runs.
        enabled: False keeps vLLM's FlashAttention on every step.
    """

    config: FlexPrefillConfig = field(default_factory=FlexPrefillConfig)
    layers: frozenset[int] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True

    def layer_enabled(self, index: int | None) -> bool:
        """Whether layer ``index`` may run FlexPrefill (a layer without an index: only when
        no ``layers`` list is set)."""
        if self.layers is None:
            return True
        return index is not None and index in self.layers


def _parse_layers(value, where: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where}: layers={value!r} must be a list of layer indices or null")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{where}: layers holds {i!r}; layer indices are ints >= 0")
        out.append(i)
    return frozenset(out)


def _parse_options(value, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: options={value!r} must be an object of flexprefill.Options fields")
    unknown = sorted(set(value) - set(_OPTION_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; accepted: {sorted(_OPTION_FIELDS)}")
    try:
        Options(**value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return dict(value)


def _merge(raw: Mapping, where: str, into: dict) -> None:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a JSON object of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(_KEYS)}")
    for k, v in raw.items():
        if k == "layers":
            v = _parse_layers(v, where)
        elif k == "options":
            v = {**into.get("options", {}), **_parse_options(v, where)}
        elif k == "enabled" and not isinstance(v, bool):
            raise ValueError(f"{where}: enabled={v!r} must be true or false")
        into[k] = v


def parse_settings(*sources: tuple[str, Mapping | None]) -> VllmSettings:
    """Settings from ``(where, mapping)`` pairs, later ones overriding earlier ones key by key;
    ``where`` names the source in error messages.  A None mapping is skipped."""
    merged: dict = {}
    for where, raw in sources:
        if raw is not None:
            _merge(raw, where, merged)
    cfg_kw = {k: merged[k] for k in _CONFIG_FIELDS if k in merged}
    try:
        cfg = FlexPrefillConfig(**cfg_kw)
    except (TypeError, ValueError) as e:
        names = " and ".join(w for w, r in sources if r is not None) or "the defaults"
        raise ValueError(f"flexprefill settings from {names}: {e}") from None
    return VllmSettings(config=cfg, layers=merged.get("layers"), options=merged.get("options", {}),
                        enabled=merged.get("enabled", True))


def _env_source(environ: Mapping[str, str]) -> tuple[str, Mapping | None]:
    raw = environ.get(ENV_VAR)
    if raw is None or not raw.strip():
        return ENV_VAR, None
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={raw!r} is not valid JSON: {e}") from None
    return ENV_VAR, value


def load_settings(additional_config: Mapping | None = None, environ: Mapping[str, str] | None = None) -> VllmSettings:
    """The settings in force: ``FLEXPREFILL_VLLM_CONFIG``, then ``additional_config["flexprefill"]``
    (vLLM's ``VllmConfig.additional_config``) over it."""
    environ = os.environ if environ is None else environ
    plugin = None
    # vLLM also takes an object of its own there, which cannot hold this plugin's key
    if isinstance(additional_config, Mapping):
        plugin = additional_config.get(CONFIG_KEY)
        if isinstance(plugin, str):
            try:
                plugin = json.loads(plugin)
            except ValueError as e:
                raise ValueError(f"additional_config[{CONFIG_KEY!r}] is a string but not valid JSON: {e}") from None
    return parse_settings(_env_source(environ), (f"additional_config[{CONFIG_KEY!r}]", plugin))


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a vLLM layer name (``"model.layers.3.self_attn.attn"`` -> 3),
    or None when the name holds no integer or more than one."""
    ints = [int(p) for p in name.split(".") if p.isdigit()]
    return ints[0] if len(ints) == 1 else None
