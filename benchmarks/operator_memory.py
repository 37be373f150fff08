"""Peak extra GPU memory of the whole operator against the bytes of q + k + v (CUDA machine).

For each (Hq/Hkv/D, N): structured synthetic bf16 inputs, one warm call, then the peak
allocated during one call minus what was allocated before it and minus the output, with the
operator's own block table in int16 (the default) and in int32.  JSON to $OUT/operator_memory.json.

    python benchmarks/operator_memory.py [9/3/64:262144,32/8/128:131072]
"""

from __future__ import annotations

import json
import os
import sys

import torch

import flexprefill as fp
from harness import env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S


def _extra(fn, out_bytes: int) -> int:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - out_bytes


def main():
    spec = sys.argv[1] if len(sys.argv) > 1 else "9/3/64:262144,32/8/128:131072"
    rows = []
    narrow = S.compact_index_dtype
    for item in spec.split(","):
        heads, n = item.split(":")
        hq, hkv, d = (int(x) for x in heads.split("/"))
        N = int(n)
        q, k, v = structured_qkv(1, N, hq, hkv, d, seed=1, dtype=torch.bfloat16, device="cuda", generate_on="device")
        qkv = sum(t.numel() * t.element_size() for t in (q, k, v))
        cfg = fp.FlexPrefillConfig(min_seq_len=0)
        call = lambda: fp.flex_prefill_attention(q, k, v, config=cfg)  # noqa: E731
        row = dict(heads=heads, N=N, qkv_mb=qkv / 2**20)
        for name, pick in (("int16", narrow), ("int32", lambda nb: torch.int32)):
            S.compact_index_dtype = pick
            try:
                row[f"extra_mb_{name}"] = _extra(call, q.numel() * q.element_size()) / 2**20
                row[f"extra_frac_{name}"] = row[f"extra_mb_{name}"] * 2**20 / qkv
            finally:
                S.compact_index_dtype = narrow
        rows.append(row)
        print(json.dumps(row), flush=True)
        q = k = v = call = None  # free before the next shape
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "operator_memory.json"), "w") as f:
        json.dump(dict(env=env_stamp(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
