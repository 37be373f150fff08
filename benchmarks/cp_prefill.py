"""Context-parallel prefill on 2-8 GPUs: FlexPrefill against dense context parallelism.

Run under torchrun, one process per GPU (NCCL; NVLink multicast off):

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 8 benchmarks/cp_prefill.py --out OUT

Three parts, each row written to ``OUT/cp_prefill.json`` as soon as it is measured (a run that
is killed keeps what it finished):

* ``layer``: one attention layer of the Llama-3.1-8B shape (32 query / 8 K/V heads, d 128,
  bf16) at each ``--lengths`` (default 128k, 512k, 1M).  Methods: ``flexprefill`` (the
  pattern search plus the sparse ring exchange), ``flexprefill_a2a`` (one all-to-all),
  ``dense`` (every causal block through the same exchange and kernel: dense ring attention
  that skips what no causal row needs) and ``torch_cp`` (PyTorch's
  ``torch.distributed.tensor.experimental.context_parallel`` ring attention over SDPA, zig-zag
  load balancing, K/V rotated by all-to-all).  Inputs: structured synthetic q/k/v
  (``flexprefill_tools.synthetic``, built whole on each GPU and sharded) or ``random``.
* ``model``: a random-weight transformers model of the Llama-3.1-8B shape with
  ``--model-layers`` layers (no LM head), each rank running its tokens with their global
  positions; attention through :func:`flexprefill.distributed.flex_prefill_attention_cp`
  (``flexprefill``) or its dense table (``dense``).
* ``max``: the longest length that runs, doubling from ``--max-from`` (random inputs made
  per shard, so no GPU holds the whole sequence), for ``flexprefill`` and ``dense``.

Each time is the median over ``--reps`` timed calls (after one warm-up) of the slowest
rank's time; the search is part of FlexPrefill's time.  Rows carry the density, the K/V bytes
received (summed over ranks) against dense ring attention's, the control bytes, the GPU and
the versions.

``--smoke``: the same code on the CPU over gloo at tiny sizes (a check that it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.distributed import flex_prefill_attention_cp, zigzag_positions, zigzag_shard  # noqa: E402

METHODS = ("flexprefill", "flexprefill_a2a", "dense", "torch_cp")


def _lengths(text):
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
        out.append(int(t[:-1] if mult > 1 else t) * mult)
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        if self.smoke:
            dist.init_process_group("gloo")
            self.dev = torch.device("cpu")
            torch.set_num_threads(1)
        else:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.dev = torch.device("cuda", local)
            dist.init_process_group("nccl", device_id=self.dev)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.shape = (4, 2, 64) if self.smoke else (32, 8, 128)
        self.rows = []
        self.out = Path(args.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.meta = self._meta()

    def _meta(self):
        meta = dict(world=self.world, torch=torch.__version__, smoke=self.smoke,
                    nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
        try:
            from flexprefill_tools.stamp import env_stamp

            meta.update(env_stamp())
        except Exception as e:  # noqa: BLE001 - the stamp is informative only
            meta["stamp_error"] = str(e)
        if not self.smoke:
            meta["gpu"] = torch.cuda.get_device_name(self.dev)
        return meta

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize(self.dev)

    def free(self):
        if not self.smoke:
            torch.cuda.empty_cache()

    def timed(self, fn):
        """Median over reps of the slowest rank's time (ms), after one warm-up call; and the last result."""
        res = fn()
        times = []
        for _ in range(self.args.reps):
            dist.barrier()
            self.sync()
            t0 = time.perf_counter()
            res = fn()
            self.sync()
            t = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64, device=self.dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
        return statistics.median(times), times, res

    def add(self, row):
        row = dict(row, **{k: self.meta[k] for k in ("world", "torch", "gpu", "commit") if k in self.meta})
        self.rows.append(row)
        self.log(json.dumps(row))
        if self.rank == 0:
            (self.out / "cp_prefill.json").write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=1))

    def comm_sums(self, comm):
        keys = ("kv_bytes_received", "dense_ring_bytes", "dense_causal_bytes", "control_bytes_received")
        t = torch.tensor([float(getattr(comm, k)) for k in keys], dtype=torch.float64, device=self.dev)
        dist.all_reduce(t)
        return {k: int(v) for k, v in zip(keys, t.tolist())}

    # ---------------------------------------------------------------- inputs

    def inputs(self, N, kind):
        Hq, Hkv, D = self.shape
        if kind == "synthetic":
            from flexprefill_tools.synthetic import structured_qkv

            q, k, v = structured_qkv(1, N, Hq, Hkv, D, dtype=self.dtype, device=self.dev,
                                     generate_on="cpu" if self.smoke else "device", seed=0)
            parts = [zigzag_shard(t, self.world, self.rank) for t in (q, k, v)]
            del q, k, v
            self.free()
            return parts
        # random: each rank makes only its own part
        g = torch.Generator(device=self.dev).manual_seed(1000 + self.rank)
        n = N // self.world
        return [torch.randn(1, n, h, D, generator=g, device=self.dev, dtype=torch.float32).to(self.dtype)
                for h in (Hq, Hkv, Hkv)]

    def config(self, N, dense=False):
        return FlexPrefillConfig(gamma=self.args.gamma, tau=self.args.tau, block_size=self.args.block_size,
                                 min_seq_len=N + 1 if dense else 0, backend="torch" if self.smoke else "auto")

    # ---------------------------------------------------------------- layer

    def layer_method(self, method, q, k, v, N):
        if method == "torch_cp":
            return self.torch_cp(q, k, v, N)
        cfg = self.config(N, dense=method == "dense")
        exchange = "all_to_all" if method == "flexprefill_a2a" else "ring"

        def call():
            with torch.no_grad():
                return flex_prefill_attention_cp(q, k, v, config=cfg, exchange=exchange, return_stats=True,
                                                 return_comm=True)
        ms, times, (out, stats, comm) = self.timed(call)
        return dict(ms=ms, times=times, density=float(stats.density.mean()),
                    query_aware=float(stats.query_aware.float().mean()), **self.comm_sums(comm))

    def torch_cp(self, q, k, v, N):
        """PyTorch's context parallelism over SDPA: it shards full-length buffers itself, so the whole
        sequence is gathered first (not timed), in its [B, H, N, D] layout."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        from flexprefill.distributed import zigzag_unshard

        def whole(t):
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous())
            return zigzag_unshard(parts).transpose(1, 2).contiguous()

        qf, kf, vf = whole(q), whole(k), whole(v)
        group = qf.shape[1] // kf.shape[1]
        note = "enable_gqa"
        mesh = init_device_mesh(self.dev.type, (self.world,))
        set_rotate_method("alltoall")
        f = torch.nn.functional.scaled_dot_product_attention
        try:
            with torch.no_grad(), context_parallel(mesh, buffers=[qf, kf, vf], buffer_seq_dims=[2, 2, 2],
                                                   no_restore_buffers={qf, kf, vf}):
                ms, times, _ = self.timed(lambda: f(qf, kf, vf, is_causal=True, enable_gqa=True))
        except Exception:  # noqa: BLE001 - SDPA's ring may not take GQA: K/V repeated then
            note = "k/v repeated"
            qf, kf, vf = whole(q), whole(k).repeat_interleave(group, 1), whole(v).repeat_interleave(group, 1)
            with torch.no_grad(), context_parallel(mesh, buffers=[qf, kf, vf], buffer_seq_dims=[2, 2, 2],
                                                   no_restore_buffers={qf, kf, vf}):
                ms, times, _ = self.timed(lambda: f(qf, kf, vf, is_causal=True))
        # all-to-all rotation: every rank receives every other rank's K and V once
        Hkv = kf.shape[1]
        ring = (self.world - 1) * N * Hkv * kf.shape[-1] * 2 * kf.element_size()
        return dict(ms=ms, times=times, note=note, dense_ring_bytes=ring, kv_bytes_received=ring)

    def layer(self):
        for N in _lengths(self.args.lengths):
            for kind in self.args.inputs.split(","):
                try:
                    q, k, v = self.inputs(N, kind)
                except Exception as e:  # noqa: BLE001 - a length that does not fit is a result
                    self.add(dict(part="layer", N=N, input=kind, error=f"inputs: {type(e).__name__}: {e}"[:500]))
                    self.free()
                    continue
                for method in self.args.methods.split(","):
                    try:
                        row = self.layer_method(method, q, k, v, N)
                    except Exception as e:  # noqa: BLE001
                        row = dict(error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
                    self.add(dict(part="layer", N=N, input=kind, method=method, **row))
                    self.free()
                del q, k, v
                self.free()

    # ---------------------------------------------------------------- model

    def model(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        from flexprefill.integrations.tensor_parallel import random_model

        state = {}

        def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
            # query [B, Hq, n, D], key/value [B, Hkv, n, D]: this rank's tokens
            out, comm = flex_prefill_attention_cp(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                  config=state["cfg"], softmax_scale=scaling, return_comm=True)
            state["comms"].append(comm)
            return out, None

        def no_mask(*args, **kwargs):
            # causality is by global position inside the attention: no mask
            return None

        AttentionInterface.register("flexprefill_cp", attention)
        AttentionMaskInterface.register("flexprefill_cp", no_mask)
        arch = "tiny-llama" if self.smoke else "llama3.1-8b"
        lm = random_model(arch, layers=self.args.model_layers, dtype=self.dtype, device=self.dev)
        lm.config._attn_implementation = "flexprefill_cp"
        body = lm.model  # no LM head: the logits of 1M tokens would not fit
        vocab = lm.config.vocab_size
        for N in _lengths(self.args.model_lengths):
            g = torch.Generator(device="cpu").manual_seed(5)
            ids = torch.randint(0, vocab, (1, N), generator=g)
            local = zigzag_shard(ids, self.world, self.rank).to(self.dev)
            pos = zigzag_positions(N, self.world, self.rank, self.dev)[None]
            for method in ("flexprefill", "dense"):
                state.update(cfg=self.config(N, dense=method == "dense"), comms=[])
                try:
                    def call():
                        state["comms"] = []
                        with torch.no_grad():
                            return body(input_ids=local, position_ids=pos, use_cache=False).last_hidden_state
                    ms, times, h = self.timed(call)
                    sums = [self.comm_sums(c) for c in state["comms"]]
                    row = dict(ms=ms, times=times, layers=self.args.model_layers,
                               kv_bytes_received=sum(s["kv_bytes_received"] for s in sums),
                               dense_ring_bytes=sum(s["dense_ring_bytes"] for s in sums),
                               finite=bool(torch.isfinite(h).all()))
                    if self.smoke:
                        row["max_diff_vs_one_process"] = self.model_check(lm, ids, h, state)
                except Exception as e:  # noqa: BLE001
                    row = dict(error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
                self.add(dict(part="model", N=N, method=method, **row))
                self.free()

    def model_check(self, lm, ids, h, state):
        """Smoke only: the same model in one process with SDPA, against this rank's hidden states
        (gamma=1 or dense, so the two must agree to rounding)."""
        if self.args.gamma < 1 and state["cfg"].min_seq_len == 0:
            return None
        lm.config._attn_implementation = "sdpa"
        try:
            with torch.no_grad():
                full = lm.model(input_ids=ids.to(self.dev), use_cache=False).last_hidden_state
        finally:
            lm.config._attn_implementation = "flexprefill_cp"
        return float((zigzag_shard(full, self.world, self.rank) - h).abs().max())

    # ---------------------------------------------------------------- longest length

    def longest(self):
        for method in ("flexprefill", "dense"):
            N = _lengths(self.args.max_from)[0]
            best = None
            while N <= _lengths(self.args.max_to)[0]:
                try:
                    q, k, v = self.inputs(N, "random")
                    cfg = self.config(N, dense=method == "dense")
                    self.sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        flex_prefill_attention_cp(q, k, v, config=cfg)
                    self.sync()
                    ok, ms = 1.0, (time.perf_counter() - t0) * 1e3
                    peak = torch.cuda.max_memory_allocated(self.dev) / 2**30 if not self.smoke else 0.0
                except Exception as e:  # noqa: BLE001 - out of memory is the answer sought
                    ok, ms, peak = 0.0, float("nan"), float("nan")
                    err = f"{type(e).__name__}: {e}"[:300]
                q = k = v = None
                self.free()
                if not self.smoke:
                    torch.cuda.reset_peak_memory_stats(self.dev)
                # every rank must agree before the next length
                flag = torch.tensor([ok], device=self.dev)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                row = dict(part="max", N=N, method=method, ran=bool(flag.item()), first_call_ms=ms, peak_gib=peak)
                if not flag.item():
                    row["error"] = err if ok == 0 else "another rank failed"
                self.add(row)
                if not flag.item():
                    break
                best = N
                N *= 2
            self.add(dict(part="max_summary", method=method, longest=best))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="layer,model,max")
    ap.add_argument("--lengths", default="128k,512k,1m")
    ap.add_argument("--inputs", default="synthetic", help="synthetic and/or random")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--model-lengths", default="128k,512k")
    ap.add_argument("--max-from", default="1m")
    ap.add_argument("--max-to", default="16m")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny sizes")
    args = ap.parse_args()
    if args.smoke:
        args.block_size = 32
    b = Bench(args)
    for part in args.parts.split(","):
        getattr(b, {"layer": "layer", "model": "model", "max": "longest"}[part])()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
