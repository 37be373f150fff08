"""Where a whole-model prefill spends its time, per attention layer (run on a CUDA machine).

For each packaged model at its longest context (the needle prompt of the benchmark's model
mode): the prefill with SDPA (cuDNN first), with FlexPrefill, and, for models with
sliding-window layers, with the windowed kernel alone.  Per layer: median milliseconds of
the attention call (CUDA events in forward hooks of each attention module) and what the
integration did there; per mode: the top CUDA kernels and the host-side operators of one
prefill (torch.profiler).  JSON to $OUT/model_layers.json.

    python benchmarks/profile_model_layers.py [gemma3-270m,smollm2-135m]
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

import flexprefill as fp
from harness import CAPTURE_MODELS, _dense_sdpa_context, _set_attn, env_stamp, load_model, needle_prompt
from flexprefill.integrations import transformers as tfi


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def _layer_times(model, ids, reps: int) -> dict[int, float]:
    """Median ms of each attention module's forward over ``reps`` prefills."""
    events: dict[int, list] = {}
    hooks = []
    for m in _attention_modules(model):
        def pre(mod, args, kwargs, i=m.layer_idx):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.setdefault(i, []).append([e, None])

        def post(mod, args, kwargs, out, i=m.layer_idx):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events[i][-1][1] = e

        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        for _ in range(reps):
            model(input_ids=ids, logits_to_keep=1)
        torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    return {i: statistics.median(a.elapsed_time(b) for a, b in ev) for i, ev in sorted(events.items())}


def _whole(model, ids, reps: int) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        model(input_ids=ids, logits_to_keep=1)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _profile(model, ids) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        model(input_ids=ids, logits_to_keep=1)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kern = sorted((e for e in ka if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    host = sorted(ka, key=lambda e: -e.self_cpu_time_total)
    return dict(
        top_device=[dict(name=e.key[:100], calls=e.count, ms=e.device_time_total / 1e3) for e in kern[:20]],
        top_host_self=[dict(name=e.key[:100], calls=e.count, ms=e.self_cpu_time_total / 1e3) for e in host[:20]],
    )


def run(key: str, reps: int = 5) -> dict:
    spec = CAPTURE_MODELS[key]
    model, tok = load_model(key, {}, device="cuda", dtype=torch.bfloat16)
    ids_list, _ = needle_prompt(tok, spec.context - 32)
    ids = torch.tensor([ids_list], device="cuda")
    sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
    cfg = fp.FlexPrefillConfig().replace(min_seq_len=1024)
    out = dict(model=key, N=ids.shape[1], modes={})
    for mode in ("sdpa", "flexprefill") + (("windows_only",) if sliding else ()):
        if mode == "sdpa":
            _set_attn(model, "sdpa")
        elif mode == "flexprefill":
            fp.patch(model, config=cfg)
        else:
            fp.patch(model, config=cfg, layers=())
        try:
            with _dense_sdpa_context(), torch.inference_mode():
                model(input_ids=ids, logits_to_keep=1)  # warm-up: autotune, graph capture
                torch.cuda.synchronize()
                row = dict(whole_ms=_whole(model, ids, reps), layer_ms=_layer_times(model, ids, reps))
                row["attention_ms_sum"] = sum(row["layer_ms"].values())
                if mode != "sdpa":
                    rec = tfi.last_record(model)
                    row["layers"] = {i: dict(path=r.path, reason=r.reason) for i, r in rec.items()}
                row.update(_profile(model, ids))
        finally:
            if mode != "sdpa":
                fp.unpatch(model)
        out["modes"][mode] = row
        print(f"{key} N={out['N']} {mode}: whole {row['whole_ms']:.1f} ms, attention modules {row['attention_ms_sum']:.1f} ms", flush=True)
        print("   per layer: " + " ".join(f"{i}:{t:.2f}" for i, t in row["layer_ms"].items()), flush=True)
        for t in row["top_device"][:10]:
            print(f"   dev {t['ms']:8.2f} ms x{t['calls']:<5d} {t['name']}", flush=True)
        for t in row["top_host_self"][:8]:
            print(f"   host {t['ms']:8.2f} ms x{t['calls']:<5d} {t['name']}", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def main():
    keys = (sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m,smollm2-135m").split(",")
    res = dict(env=env_stamp(), models=[])
    for k in keys:
        try:
            res["models"].append(run(k))
        except Exception as e:  # keep the other model
            import traceback

            traceback.print_exc()
            res["models"].append(dict(model=k, error=f"{type(e).__name__}: {e}"))
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model_layers.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
