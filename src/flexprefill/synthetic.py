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


def _unit(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


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
):
    """q [B, N, Hq, D], k and v [B, N, Hkv, D] with structured attention.

    ``kinds`` gives each query head's dominant structure (cycled over heads), from
    ``HEAD_KINDS``; default cycles through all of them.  ``strength`` scales how peaked
    the structures are (0 gives plain random inputs).
    """
    kinds = kinds or HEAD_KINDS
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"kinds contains {kind!r}; accepted: {HEAD_KINDS}")
    g = torch.Generator().manual_seed(seed)
    B, N, Hq, Hkv, D = batch, seq_len, q_heads, kv_heads, head_dim
    group = Hq // Hkv
    # logits are q.k / sqrt(D): a component a*s on q and b*s on k along one unit
    # direction adds a*b to the logit
    s = D**0.25
    q = 0.6 * torch.randn(B, N, Hq, D, generator=g)
    k = 0.6 * torch.randn(B, N, Hkv, D, generator=g)
    v = torch.randn(B, N, Hkv, D, generator=g)
    pos = torch.arange(N, dtype=torch.float32)

    n_seg = max(1, N // 512)
    seg = torch.clamp((pos * n_seg / N).long(), max=n_seg - 1)
    for hk in range(Hkv):
        dirs = _unit(g, 4, D)  # sink, vertical, topic basis seed, position basis seed
        # position features: a band of low frequencies -> q_i . k_j peaks at i == j
        n_freq = max(2, D // 16)
        freqs = 1.0 / (24.0 * (4.0 ** torch.linspace(0, 1, n_freq)))
        ang = pos[:, None] * freqs[None, :]
        feats = torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(n_freq)  # [N, 2F]
        pos_basis = _unit(g, 2 * n_freq, D)
        pos_emb = feats @ pos_basis  # [N, D]
        topics = _unit(g, n_seg, D)
        stripes = torch.randperm(N, generator=g)[: max(1, N // 700)]

        k[:, :, hk] += strength * 2.0 * s * pos_emb
        k[:, 0, hk] += strength * 3.0 * s * dirs[0]
        k[:, stripes, hk] += strength * 2.5 * s * dirs[1]
        k[:, :, hk] += strength * 1.5 * s * topics[seg]
        for j in range(group):
            h = hk * group + j
            kind = kinds[h % len(kinds)]
            w = {
                "sink_local": (1.0, 2.0, 0.0, 0.1),
                "vertical": (0.8, 0.6, 2.2, 0.1),
                "blocky": (0.5, 0.4, 0.3, 2.2),
                "mixed": (1.0, 1.0, 1.0, 1.0),
            }[kind]
            q[:, :, h] += strength * w[0] * 2.0 * s * dirs[0]
            q[:, :, h] += strength * w[1] * 2.0 * s * pos_emb
            q[:, :, h] += strength * w[2] * 2.0 * s * dirs[1]
            # recall: each segment's queries point at their own topic and one earlier one
            recall = torch.randint(0, n_seg, (n_seg,), generator=g)
            recall = torch.minimum(recall, torch.arange(n_seg))
            q[:, :, h] += strength * w[3] * 1.5 * s * (topics[seg] + topics[recall[seg]])
    return (
        q.to(device=device, dtype=dtype),
        k.to(device=device, dtype=dtype),
        v.to(device=device, dtype=dtype),
    )
