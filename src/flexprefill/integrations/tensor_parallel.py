"""FlexPrefill inside transformers' tensor parallelism (``torchrun``, NCCL on GPUs, gloo on CPUs).

transformers shards a model's attention by heads (``DistributedConfig(tp_size=N)``, the
former ``tp_plan="auto"``): ``q_proj``, ``k_proj`` and ``v_proj`` are split by output
columns, so each rank's attention function receives its own ``Hq / N`` query and
``Hkv / N`` key/value heads as ordinary local tensors, and ``o_proj`` sums the ranks'
outputs.  FlexPrefill needs no change there: each rank searches the patterns of its own
heads and runs the sparse kernel on them (no collective inside attention).

What this module adds:

* :func:`check_tp_heads`: the head counts a tensor-parallel plan needs, with a clear error.
* :func:`repeat_kv_heads`: a model with fewer key/value heads than ranks (Gemma 3 270M has
  one) is made shardable by repeating each K/V head's projection rows, an exact rewrite
  (every query head reads the same keys and values as before).
* :func:`random_model`: a random-weight model of a real architecture (Llama-3.1-8B's layer
  shapes, any number of layers) for the sizes the packaged models do not reach.
* :func:`prepare_checkpoint`: a safetensors folder (K/V repeated, cast, tokenizer beside it)
  that ``from_pretrained(..., distributed_config=...)`` shards on load.
* :func:`init_distributed` and :func:`load_sharded`: the process group from torchrun's
  variables and the sharded model.

The torchrun check and benchmark built on these is ``flexprefill tp-check``
(``flexprefill_tools.tp_check``, installed with ``pip install "flexprefill[tools]"``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "ARCHITECTURES",
    "check_tp_heads",
    "kv_repeat_factor",
    "repeat_kv_heads",
    "random_model",
    "prepare_checkpoint",
    "init_distributed",
    "load_sharded",
]

# Random-weight architectures: the layer shapes of a real model (the number of layers is an
# option), or tiny ones for CPU tests.  Llama-3.1-8B from its published config.json.
ARCHITECTURES = {
    "llama3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    ),
    "tiny-llama": dict(
        model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # one K/V head (as Gemma 3 270M): needs repeat_kv_heads to shard; layer 1 is global
    "tiny-gemma3": dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=4096, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=64,
    ),
}
_RANDOM_PREFIX = "random:"
_FORMAT = 1  # bump when prepare_checkpoint writes something else


def _log(msg: str) -> None:
    rank = os.environ.get("RANK")
    print(f"[flexprefill tensor_parallel{'' if rank is None else ' rank ' + rank}] {msg}", file=sys.stderr, flush=True)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_repeat_factor(num_heads: int, num_kv_heads: int, tp_size: int) -> int:
    """Smallest ``f`` such that ``num_kv_heads * f`` K/V heads split evenly over ``tp_size``
    ranks and still group the query heads evenly (``num_heads % (num_kv_heads * f) == 0``).

    Raises ``ValueError`` when the query heads themselves do not split over ``tp_size``."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("tp_size", tp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if num_heads % tp_size:
        raise ValueError(
            f"the model's {num_heads} query heads do not split over tp_size={tp_size} ranks; "
            f"accepted tp sizes: {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}"
        )
    f = 1
    while (num_kv_heads * f) % tp_size or num_heads % (num_kv_heads * f):
        f += 1
    return f


def check_tp_heads(config, tp_size: int) -> None:
    """Raise ``ValueError`` unless the model's query and K/V heads split evenly over ``tp_size``
    ranks; the message names the :func:`repeat_kv_heads` factor that would fix the K/V heads."""
    c = _text_config(config)
    hq, hkv = int(c.num_attention_heads), int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    f = kv_repeat_factor(hq, hkv, tp_size)
    if f != 1:
        raise ValueError(
            f"the model's {hkv} key/value heads do not split over tp_size={tp_size} ranks; "
            f"repeat_kv_heads(model, {f}) makes {hkv * f} (exact: each query head reads the same keys and values)"
        )


def _attention_modules(model) -> list:
    from .transformers import _attention_modules as modules

    return modules(model)


@torch.no_grad()
def repeat_kv_heads(model, factor: int):
    """Repeat every key/value head ``factor`` times, in place (``k_proj``/``v_proj`` rows and
    biases, ``num_key_value_heads``); returns the model.

    Exact: K/V head ``j`` becomes heads ``j*factor .. j*factor + factor-1``, and query head
    ``h`` (which read K/V head ``h // g`` of ``g = Hq / Hkv``) now reads head ``h // (g/factor)``,
    one of the copies of the same head.  ``factor`` must divide the query heads per K/V head.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor={factor!r}: expected a positive int")
    c = _text_config(model.config)
    hq = int(c.num_attention_heads)
    hkv = int(getattr(c, "num_key_value_heads", None) or hq)
    if (hq // hkv) % factor:
        raise ValueError(
            f"factor={factor} does not divide the {hq // hkv} query heads per key/value head "
            f"({hq} query, {hkv} key/value heads)"
        )
    if factor == 1:
        return model
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules to rewrite")
    for m in modules:
        for name in ("k_proj", "v_proj"):
            lin = getattr(m, name, None)
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"{type(m).__name__}.{name} is not an nn.Linear: cannot repeat its heads")
            d = lin.out_features // hkv
            if d * hkv != lin.out_features:
                raise ValueError(f"{type(m).__name__}.{name} has {lin.out_features} outputs, not a multiple of {hkv} heads")
            w = lin.weight.data.view(hkv, d, -1).repeat_interleave(factor, dim=0).reshape(hkv * factor * d, -1)
            lin.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
            if lin.bias is not None:
                b = lin.bias.data.view(hkv, d).repeat_interleave(factor, dim=0).reshape(-1)
                lin.bias = torch.nn.Parameter(b.contiguous(), requires_grad=False)
            lin.out_features = hkv * factor * d
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = hq // (hkv * factor)
        if hasattr(m, "num_key_value_heads"):
            m.num_key_value_heads = hkv * factor
    c.num_key_value_heads = hkv * factor
    return model


def random_model(arch: str, *, layers: int | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu"):
    """A causal LM of architecture ``arch`` (a key of :data:`ARCHITECTURES`) with random weights
    (transformers' own initialisation, seeded), ``layers`` decoder layers (default: the
    architecture's), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not known; accepted: {sorted(ARCHITECTURES)}")
    kw = dict(ARCHITECTURES[arch])
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers={layers!r}: expected a positive int")
        kw["num_hidden_layers"] = layers
        if "layer_types" in kw:
            base = kw["layer_types"]
            kw["layer_types"] = [base[i % len(base)] for i in range(layers)]
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _write_folder(folder: Path, key: dict, build) -> Path:
    """Write ``folder`` through a temporary sibling (``build(tmp)`` saves into it), keyed."""
    import shutil

    if _key_matches(folder, key):
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / "flexprefill_tp.json").write_text(json.dumps(key, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _key_matches(folder: Path, key: dict) -> bool:
    try:
        return json.loads((Path(folder) / "flexprefill_tp.json").read_text()) == key
    except (OSError, ValueError):
        return False


def prepare_checkpoint(model: str, *, tp_size: int, folder: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.bfloat16, layers: int | None = None, seed: int = 0,
                       cache_dir: str | os.PathLike | None = None, folder_root: str | os.PathLike | None = None,
                       loader: Callable[[str], tuple] | None = None) -> Path:
    """A Hugging Face folder of ``model`` that transformers can shard over ``tp_size`` ranks.

    ``model``: ``"random:<arch>"`` with ``arch`` in :data:`ARCHITECTURES` (``layers``,
    ``seed``), a local Hugging Face folder, or any name ``loader(model) -> (model, tokenizer)``
    understands (``flexprefill_tools.tp_check`` passes one that reads the packaged models and
    ``.gguf`` files).  K/V heads are repeated as :func:`kv_repeat_factor` says, weights cast to
    ``dtype``.  Written once to ``folder`` (default ``<folder_root>/<name>-tp<N>-<dtype>``, where
    ``folder_root`` defaults to ``<cache_dir or $FLEXPREFILL_CACHE or ~/.cache/flexprefill>/tp``)
    and reused while its key (source, layers, seed, factor, dtype, transformers version) holds.
    Call it on one rank, then a barrier.
    """
    import transformers

    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size={tp_size!r}: expected a positive int")
    dname = str(dtype).replace("torch.", "")
    if model.startswith(_RANDOM_PREFIX):
        arch = model[len(_RANDOM_PREFIX):]
        if arch not in ARCHITECTURES:
            raise ValueError(f"model={model!r}: unknown architecture {arch!r}; accepted: "
                             f"{[_RANDOM_PREFIX + a for a in sorted(ARCHITECTURES)]}")
        n_layers = layers if layers is not None else ARCHITECTURES[arch]["num_hidden_layers"]
        name = f"random-{arch}-{n_layers}l-seed{seed}"
        source = {"random": arch, "layers": n_layers, "seed": seed}
    else:
        if layers is not None:
            raise ValueError(f"layers={layers} applies to random:<arch> models only, not to {model!r}")
        if loader is None and not (Path(model) / "config.json").is_file():
            raise ValueError(f"model={model!r}: expected random:<arch> or a local Hugging Face folder (with "
                             "config.json), or pass loader=; flexprefill_tools.tp_check.prepare_packaged_checkpoint "
                             "reads the packaged models and .gguf files")
        name = Path(model).stem if os.sep in model or model.endswith(".gguf") else model
        source = {"model": str(model)}
    if folder is None:
        if folder_root is None:
            env = os.environ.get("FLEXPREFILL_CACHE")
            base = Path(cache_dir).expanduser() if cache_dir is not None else (
                Path(env).expanduser() if env else Path.home() / ".cache" / "flexprefill")
            folder_root = base / "tp"
        folder = Path(folder_root) / f"{name}-tp{tp_size}-{dname}"
    folder = Path(folder)
    key = {"source": source, "tp_size": tp_size, "dtype": dname, "transformers": transformers.__version__,
           "format": _FORMAT}

    def build(tmp: Path) -> None:
        tokenizer = None
        if "random" in source:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            _log(f"building random {arch} with {n_layers} layers on {dev}")
            m = random_model(arch, layers=n_layers, seed=seed, dtype=dtype, device=dev)
        elif loader is not None:
            m, tokenizer = loader(model)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(model) if any(
                (Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
        c = _text_config(m.config)
        f = kv_repeat_factor(int(c.num_attention_heads), int(c.num_key_value_heads or c.num_attention_heads), tp_size)
        if f > 1:
            _log(f"repeating each of the {c.num_key_value_heads} key/value heads {f} times (exact) so they split over {tp_size} ranks")
            repeat_kv_heads(m, f)
        m = m.to(dtype)
        _log(f"saving {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B parameters ({dname}) to {folder}")
        m.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _write_folder(folder, key, build)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the default process group from torchrun's variables (NCCL on CUDA, bound to
    ``LOCAL_RANK``'s GPU; gloo on CPU); returns ``(rank, world_size, device)``.  Without
    torchrun (no ``RANK``) it returns ``(0, 1, device)`` and starts nothing.  NVLink multicast
    stays off (``NCCL_NVLS_ENABLE=0`` unless set)."""
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # the other ranks wait while rank 0 prepares the checkpoint and runs the single-device
        # cases, minutes for a large model: a longer timeout than the default 10 minutes
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(hours=2))
    return rank, world, device


def load_sharded(folder: str | os.PathLike, *, tp_size: int, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """``from_pretrained(folder)`` sharded by transformers' own tensor-parallel plan over
    ``tp_size`` ranks (``DistributedConfig(tp_size=...)``; the same as ``tp_plan="auto"``)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    check_tp_heads(_config(folder), tp_size)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation,
        distributed_config=DistributedConfig(tp_size=tp_size),
    )
    return model.eval()


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))
