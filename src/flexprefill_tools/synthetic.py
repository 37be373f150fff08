"""Structured synthetic Q/K/V with the attention shapes real LLMs show.

Each head mixes, with its own weights: an attention sink on the first token, a
local window (a diagonal band, from position features that make nearby tokens
align), vertical stripes (a few key positions every query attends to), and
query-dependent blocks (the sequence is cut into segments with their own topic
vectors; a query attends to its own segment and to a few earlier segments it
"recalls").  Uniform random inputs are the worst case; these are the typical one.
Used by the tests and the benchmarks; ``pattern_stats`` compares its statistics with
real captured activations.
"""

from __future__ import annotations

import math

import torch

__all__ = ["structured_qkv", "HEAD_KINDS"]

HEAD_KINDS = ("sink_local", "vertical", "blocky", "mixed")


_WEIGHTS = {
    # per head kind: (sink, local window, vertical stripes, recalled segments)
    "sink_local": (1.0, 2.0, 0.0, 0.1),
    "vertical": (0.8, 0.6, 2.2, 0.1),
    "blocky": (0.5, 0.4, 0.3, 2.2),
    "mixed": (1.0, 1.0, 1.0, 1.0),
}


def structured_qkv(
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    kinds: tuple[str, ...] | None = None,
    strength: float = 1.0,
    generate_on: str = "cpu",
):
    """q [B, N, Hq, D], k and v [B, N, Hkv, D] with structured attention.

    ``kinds`` gives each query head's dominant structure (cycled over heads), from
    ``HEAD_KINDS``; default cycles through all of them.  ``strength`` scales how peaked
    the structures are (0 gives plain random inputs).  ``generate_on``: ``"cpu"`` builds in
    fp32 on the host with a CPU generator and moves the result to ``device`` (the same
    tensors on every device; ~10 s per 32k Llama-shaped tokens on two cores), ``"device"``
    builds on ``device`` with a generator there (well under a second at 256k on a GPU; the
    same structure, another random stream, except on the CPU where both are equal).
    """
    kinds = kinds or HEAD_KINDS
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"kinds contains {kind!r}; accepted: {HEAD_KINDS}")
    if generate_on not in ("cpu", "device"):
        raise ValueError(f"generate_on={generate_on!r}; accepted: 'cpu', 'device'")
    at = torch.device(device) if generate_on == "device" else torch.device("cpu")
    g = torch.Generator(device=at).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, device=at)

    def unit(n, d):
        x = randn(n, d)
        return x / x.norm(dim=-1, keepdim=True)

    B, N, Hq, Hkv, D = batch, seq_len, q_heads, kv_heads, head_dim
    group = Hq // Hkv
    # logits are q.k / sqrt(D): a component a*s on q and b*s on k along one unit
    # direction adds a*b to the logit
    s = D**0.25
    q = 0.6 * randn(B, N, Hq, D)
    k = 0.6 * randn(B, N, Hkv, D)
    v = randn(B, N, Hkv, D)
    pos = torch.arange(N, dtype=torch.float32, device=at)

    n_seg = max(1, N // 512)
    seg = torch.clamp((pos * n_seg / N).long(), max=n_seg - 1)
    for hk in range(Hkv):
        dirs = unit(4, D)  # sink, vertical, topic basis seed, position basis seed
        # position features: a band of low frequencies -> q_i . k_j peaks at i == j
        n_freq = max(2, D // 16)
        freqs = 1.0 / (24.0 * (4.0 ** torch.linspace(0, 1, n_freq, device=at)))
        ang = pos[:, None] * freqs[None, :]
        feats = torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(n_freq)  # [N, 2F]
        pos_basis = unit(2 * n_freq, D)
        pos_emb = feats @ pos_basis  # [N, D]
        topics = unit(n_seg, D)
        stripes = torch.randperm(N, generator=g, device=at)[: max(1, N // 700)]

        k[:, :, hk] += strength * 2.0 * s * pos_emb
        k[:, 0, hk] += strength * 3.0 * s * dirs[0]
        k[:, stripes, hk] += strength * 2.5 * s * dirs[1]
        k[:, :, hk] += strength * 1.5 * s * topics[seg]
        for j in range(group):
            h = hk * group + j
            w = _WEIGHTS[kinds[h % len(kinds)]]
            q[:, :, h] += strength * w[0] * 2.0 * s * dirs[0]
            q[:, :, h] += strength * w[1] * 2.0 * s * pos_emb
            q[:, :, h] += strength * w[2] * 2.0 * s * dirs[1]
            # recall: each segment's queries point at their own topic and one earlier one
            recall = torch.randint(0, n_seg, (n_seg,), generator=g, device=at)
            recall = torch.minimum(recall, torch.arange(n_seg, device=at))
            q[:, :, h] += strength * w[3] * 1.5 * s * (topics[seg] + topics[recall[seg]])
    return (
        q.to(device=device, dtype=dtype),
        k.to(device=device, dtype=dtype),
        v.to(device=device, dtype=dtype),
    )
