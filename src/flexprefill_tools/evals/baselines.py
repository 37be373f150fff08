"""Fixed-budget sparse-attention baselines as block selectors.

Each baseline is a callable ``selector(q, k, *, config, softmax_scale) -> BlockSelection``
(q [B, N, Hq, D], k [B, N, Hkv, D]) that ``flexprefill.patch(model, selector=...)`` runs in
place of FlexPrefill's own search, so every method shares the same hook and executor.
Vectorised torch over batches and heads, no host sync (python ints come from shapes only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexprefill.block_table import BlockSelection, mask_to_selection

__all__ = ["StreamingSelector", "VerticalSlashFixedSelector", "BASELINES"]


def _no_search(B: int, Hq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(B, Hq, dtype=torch.bool, device=device),
        torch.full((B, Hq), float("nan"), dtype=torch.float32, device=device),
    )


class StreamingSelector:
    """StreamingLLM-style: ``sink`` tokens at the start plus a local window of ``window`` tokens.

    In blocks: the first ``ceil(sink / bs)`` key blocks and the ``ceil(window / bs)`` nearest
    block offsets (the diagonal included) of every query block.
    """

    name = "streaming"

    def __init__(self, *, window: int = 1024, sink: int = 128):
        if window < 1 or sink < 0:
            raise ValueError(f"window={window} must be >= 1 and sink={sink} >= 0 tokens")
        self.window = int(window)
        self.sink = int(sink)

    def settings(self) -> dict:
        return {"window": self.window, "sink": self.sink}

    def __call__(self, q, k, *, config, softmax_scale=None) -> BlockSelection:
        B, N, Hq, _ = q.shape
        bs = config.block_size
        nb = math.ceil(N / bs)
        ar = torch.arange(nb, device=q.device)
        off = ar[:, None] - ar[None, :]
        sink_blocks = max(1, math.ceil(self.sink / bs))
        window_blocks = max(1, math.ceil(self.window / bs))
        mask = (ar[None, :] < sink_blocks) | ((off >= 0) & (off < window_blocks))
        qa, js = _no_search(B, Hq, q.device)
        return mask_to_selection(
            mask.expand(B, Hq, nb, nb), block_size=bs, seq_len=N, query_aware=qa, js_distance=js
        )


class VerticalSlashFixedSelector:
    """MInference-style vertical-slash pattern with fixed budgets.

    The last ``last_q`` queries' causal attention (fp32, ``softmax_scale``) scores every key
    column (summed over those queries) and every diagonal offset (mass at distance ``o``
    behind each query).  Both are pooled to blocks (a token offset ``o`` counts for the block
    offsets ``floor(o/bs)`` and ``ceil(o/bs)`` it crosses), then the top ``ceil(vertical/bs)``
    column blocks and top ``ceil(slash/bs)`` block offsets are kept, plus the sink block and the
    diagonal.  Pooling before the top-k keeps the budget a block budget: top-k tokens spread
    over many blocks would otherwise select nearly every block.
    """

    name = "vertical_slash_fixed"

    def __init__(self, *, vertical: int = 1024, slash: int = 2048, last_q: int = 64):
        if vertical < 1 or slash < 1 or last_q < 1:
            raise ValueError(f"vertical={vertical}, slash={slash}, last_q={last_q} must all be >= 1")
        self.vertical = int(vertical)
        self.slash = int(slash)
        self.last_q = int(last_q)

    def settings(self) -> dict:
        return {"vertical": self.vertical, "slash": self.slash, "last_q": self.last_q}

    def scores(self, q, k, *, softmax_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Column and offset scores of the last queries: fp32 [B, Hq, N] each."""
        B, N, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
        n = min(self.last_q, N)
        qs = q[:, N - n :].float().reshape(B, n, Hkv, G, D)
        s = torch.einsum("bqhgd,bkhd->bhgqk", qs, k.float()).reshape(B, Hq, n, N) * scale
        pos_q = torch.arange(N - n, N, device=q.device)
        pos_k = torch.arange(N, device=q.device)
        off = pos_q[:, None] - pos_k[None, :]  # [n, N]
        a = torch.softmax(s.masked_fill(off < 0, float("-inf")), dim=-1)
        vert = a.sum(2)
        slash = torch.zeros(B, Hq, N, dtype=torch.float32, device=q.device)
        # masked entries have probability 0, so clamping their offsets to 0 adds nothing
        idx = off.clamp_min(0).reshape(1, 1, n * N).expand(B, Hq, n * N)
        slash.scatter_add_(-1, idx, a.reshape(B, Hq, n * N))
        return vert, slash

    def block_scores(self, q, k, *, block_size: int, softmax_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores pooled to column blocks and block offsets: fp32 [B, Hq, nb] each."""
        N = q.shape[1]
        nb = math.ceil(N / block_size)
        vert, slash = self.scores(q, k, softmax_scale=softmax_scale)
        pad = nb * block_size - N
        v_blk = F.pad(vert, (0, pad)).view(*vert.shape[:-1], nb, block_size).sum(-1)
        s_lo = F.pad(slash, (0, pad)).view(*slash.shape[:-1], nb, block_size).sum(-1)
        # ceil(o/bs) == d for o in ((d-1)*bs, d*bs]: shift by bs-1 and pool again
        s_hi = F.pad(slash, (block_size - 1, pad))[..., : nb * block_size].view(*slash.shape[:-1], nb, block_size).sum(-1)
        return v_blk, s_lo + s_hi

    def __call__(self, q, k, *, config, softmax_scale=None) -> BlockSelection:
        B, N, Hq, _ = q.shape
        bs = config.block_size
        nb = math.ceil(N / bs)
        v_score, s_score = self.block_scores(q, k, block_size=bs, softmax_scale=softmax_scale)
        false = torch.zeros(B, Hq, nb, dtype=torch.bool, device=q.device)
        v_blk = false.scatter(-1, torch.topk(v_score, min(math.ceil(self.vertical / bs), nb), dim=-1).indices, True)
        s_blk = false.scatter(-1, torch.topk(s_score, min(math.ceil(self.slash / bs), nb), dim=-1).indices, True)
        v_blk[..., 0] = True
        s_blk[..., 0] = True
        ar = torch.arange(nb, device=q.device)
        off = (ar[:, None] - ar[None, :]).clamp_min(0)  # [nb, nb]
        mask = v_blk[:, :, None, :] | s_blk[:, :, off]
        qa, js = _no_search(B, Hq, q.device)
        return mask_to_selection(mask, block_size=bs, seq_len=N, query_aware=qa, js_distance=js)


BASELINES = {
    StreamingSelector.name: StreamingSelector,
    VerticalSlashFixedSelector.name: VerticalSlashFixedSelector,
}
