"""Block-sparse causal attention with the sequence split over ranks, and the whole operator.

Each rank holds the queries, keys and values of its two chunks (:mod:`.layout`) and the
block lists of its own query blocks (:mod:`.search`).  From the lists it knows which key/value
blocks it reads (:func:`.exchange.needed_blocks`); the requests are all-gathered (one bit per
sequence, K/V head and key block), so each rank knows what every other rank reads from it,
and only those blocks move.

``exchange="ring"`` (default): ``world`` steps.  Step 0 attends each own chunk to its own keys
and the late chunk to the early one's; step ``t`` receives from rank ``rank - t`` and sends to
rank ``rank + t`` exactly the requested blocks (one send/receive pair; the next step's is
posted before this step's attention runs), then attends to them.  Partial outputs are kept
in fp32 and merged by their log-sum-exp.  At most two steps' blocks are held at once.
``exchange="all_to_all"``: one all-to-all moves every requested block, then one attention
call covers everything; no merge, but all received blocks are held at once.

Each step is one call of the block-sparse executor (the Triton kernel on CUDA, the
vectorised torch path on the CPU) over packed sequences, one per (batch element, own chunk):
the step's received blocks laid out in ascending order, followed by the chunk's own keys,
with the chunk's queries as the last positions (the chunked-prefill layout of
:func:`flexprefill.flex_prefill_attention_varlen`), and the block table renumbered to that
layout (the renumbering keeps each row's blocks in ascending order).
"""

from __future__ import annotations

import torch

from .. import api
from ..block_table import PatternStats, compact_block_mask, num_causal_blocks
from ..config import FlexPrefillConfig
from .comm import Comm
from .exchange import block_owner, dense_bytes, needed_blocks
from .layout import zigzag_chunks
from .search import LocalBlockSelection, dense_selection, search

__all__ = ["flex_prefill_attention_cp", "select_blocks_cp", "block_sparse_attention_cp", "EXCHANGES"]

EXCHANGES = ("ring", "all_to_all")
_BACKENDS = ("auto", "torch", "triton")


def flex_prefill_attention_cp(q, k, v, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                              group=None, exchange: str = "ring", return_lse: bool = False, return_stats: bool = False,
                              return_comm: bool = False):
    """FlexPrefill causal attention of one long prefill whose sequence is split over the ranks of ``group``.

    Every rank calls it with its own part, as :func:`flexprefill.distributed.zigzag_shard`
    lays it out (chunks ``rank`` and ``2 * world - 1 - rank`` of ``2 * world`` equal chunks),
    and the same arguments otherwise.

    Args:
        q: [B, n, Hq, D] this rank's queries, ``n = N / world`` of the ``N`` tokens; k, v:
            [B, n, Hkv, D]; ``N`` must be a multiple of ``2 * world * block_size`` (``n`` a
            multiple of ``2 * block_size``).  Dtypes and head dims as
            :func:`flexprefill.flex_prefill_attention`.
        config: :class:`flexprefill.FlexPrefillConfig`; ``backend`` "auto" (Triton on CUDA,
            torch on the CPU), "torch" or "triton".  ``N < min_seq_len`` runs every causal
            block (no search); ``dense_above`` is honoured (one more all-reduce; not with
            ``return_lse``, as in one process).
        softmax_scale: default ``1/sqrt(D)``.
        group: a ``torch.distributed`` process group (default: the default group; with no
            initialised group, one rank).  NCCL for CUDA tensors, gloo for CPU tensors.
        exchange: "ring" or "all_to_all" (see the module docstring).
        return_lse: also return ``lse`` fp32 [B, Hq, n] (natural log) of this rank's queries.
        return_stats: also return :class:`flexprefill.PatternStats` of the whole sequence (the
            same on every rank; one more all-reduce).
        return_comm: also return :class:`CommStats`, what this rank moved.

    Returns:
        ``out`` [B, n, Hq, D] in the input dtype for this rank's queries; then ``lse``,
        ``stats``, ``comm`` when asked, in that order.
    """
    cfg, scale, backend, comm = _validate(q, k, v, config, softmax_scale, group, exchange,
                                          (return_lse, return_stats, return_comm))
    B, n, Hq, _ = q.shape
    N = comm.world * n
    if N < cfg.min_seq_len:
        sel = dense_selection(B, Hq, N, cfg.block_size, comm, q.device)
    else:
        sel = search(q, k, cfg, scale, comm)
        if cfg.dense_above is not None and not return_lse:
            kept = comm.all_reduce(sel.mask.sum(dtype=torch.int64).reshape(1).double())
            if float(kept) > cfg.dense_above * B * Hq * num_causal_blocks(N // cfg.block_size):
                dense = dense_selection(B, Hq, N, cfg.block_size, comm, q.device)
                dense.query_aware, dense.js_distance = sel.query_aware, sel.js_distance
                sel = dense
    out, lse = attend(q, k, v, sel.mask, block_size=cfg.block_size, scale=scale, backend=backend, exchange=exchange,
                      comm=comm)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_stats:
        res += (_pattern_stats(sel, comm),)
    if return_comm:
        res += (comm.stats,)
    return res[0] if len(res) == 1 else res


def select_blocks_cp(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                     group=None) -> LocalBlockSelection:
    """The pattern search alone: this rank's :class:`LocalBlockSelection` (arguments as
    :func:`flex_prefill_attention_cp`; ``min_seq_len`` and ``dense_above`` are not applied)."""
    cfg, scale, _, comm = _validate(q, k, k, config, softmax_scale, group, "ring", ())
    return search(q, k, cfg, scale, comm)


def block_sparse_attention_cp(q, k, v, selection: LocalBlockSelection, *, softmax_scale: float | None = None,
                              group=None, backend: str = "auto", exchange: str = "ring", return_lse: bool = False,
                              return_comm: bool = False):
    """The attention alone, over a given :class:`LocalBlockSelection` (from :func:`select_blocks_cp`,
    or :meth:`LocalBlockSelection.from_global` of any whole-sequence block mask).

    Returns ``out`` [B, n, Hq, D]; then ``lse`` [B, Hq, n] and :class:`CommStats` when asked.
    """
    if not isinstance(selection, LocalBlockSelection):
        raise TypeError(f"selection must be a LocalBlockSelection, got {type(selection).__name__}")
    cfg = FlexPrefillConfig(block_size=selection.block_size, backend=backend)
    _, scale, be, comm = _validate(q, k, v, cfg, softmax_scale, group, exchange, (return_lse, return_comm))
    B, n, Hq, _ = q.shape
    want = (B, Hq, n // selection.block_size, comm.world * n // selection.block_size)
    if tuple(selection.mask.shape) != want or selection.world != comm.world or selection.rank != comm.rank:
        raise ValueError(
            f"selection (mask {tuple(selection.mask.shape)}, world {selection.world}, rank {selection.rank}) does not "
            f"fit q on rank {comm.rank} of {comm.world}: expected mask {want}"
        )
    out, lse = attend(q, k, v, selection.mask.to(q.device), block_size=selection.block_size, scale=scale, backend=be,
                      exchange=exchange, comm=comm)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_comm:
        res += (comm.stats,)
    return res[0] if len(res) == 1 else res


def _validate(q, k, v, config, softmax_scale, group, exchange, flags):
    """Checks on this rank, then one all-gather that every rank was called alike."""
    cfg = api._check_config(config)
    api._check_qkv(q, k, v)
    scale = api._check_scale(softmax_scale, q.shape[-1])
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not supported; accepted: {EXCHANGES}")
    cfg = cfg.resolved(q, k)  # min_seq_len=None: the shape's default on this device (q, k checked above)
    if cfg.backend not in _BACKENDS:
        raise ValueError(f"backend={cfg.backend!r} has no context-parallel path; accepted: {_BACKENDS}")
    backend = api._backend(cfg, q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("context-parallel attention has no backward pass; run it under torch.no_grad()")
    comm = Comm(group)
    if comm.backend == "nccl" and not q.is_cuda:
        raise ValueError(f"the process group's backend is nccl but q is on {q.device}; use gloo for CPU tensors")
    if comm.backend == "gloo" and q.is_cuda:
        raise ValueError("the process group's backend is gloo but q is on CUDA; use nccl for CUDA tensors")
    B, n, Hq, D = q.shape
    bs = cfg.block_size
    if n % (2 * bs):
        raise ValueError(
            f"q holds n={n} tokens on each rank, not a multiple of 2 * block_size = {2 * bs}: the sequence of "
            f"world * n tokens is cut into 2 * world chunks of whole blocks; pad it to a multiple of "
            f"2 * world * block_size = {2 * comm.world * bs}"
        )
    if comm.world > 1:
        _check_alike(comm, q, k, cfg, scale, exchange, flags)
    return cfg, scale, backend, comm


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_alike(comm: Comm, q, k, cfg, scale, exchange, flags) -> None:
    B, n, Hq, D = q.shape
    fields = dict(batch=B, tokens_per_rank=n, q_heads=Hq, kv_heads=k.shape[2], head_dim=D,
                  dtype=_DTYPES.index(q.dtype), block_size=cfg.block_size, gamma=cfg.gamma, tau=cfg.tau,
                  min_budget=cfg.min_budget, max_budget=-1 if cfg.max_budget is None else cfg.max_budget,
                  min_seq_len=cfg.min_seq_len, dense_above=-1 if cfg.dense_above is None else cfg.dense_above,
                  softmax_scale=scale, exchange=EXCHANGES.index(exchange),
                  **{f"flag{i}": int(f) for i, f in enumerate(flags)})
    mine = torch.tensor(list(fields.values()), dtype=torch.float64, device=q.device)
    every = comm.all_gather(mine).cpu()
    for i, name in enumerate(fields):
        col = every[:, i]
        if not bool((col == col[0]).all()):
            raise ValueError(f"ranks were called with different {name}: {col.tolist()} (rank order); every rank must "
                             "pass its own part of one sequence with the same settings")


def _pattern_stats(sel: LocalBlockSelection, comm: Comm) -> PatternStats:
    num = comm.all_reduce(sel.mask.sum((-1, -2), dtype=torch.int64))
    nb = sel.seq_len // sel.block_size
    return PatternStats(query_aware=sel.query_aware, js_distance=sel.js_distance, num_blocks=num,
                        density=num.float() / num_causal_blocks(nb), dense=sel.dense)


def attend(q, k, v, mask, *, block_size: int, scale: float, backend: str, exchange: str, comm: Comm):
    """out [B, n, Hq, D] and lse fp32 [B, Hq, n] of this rank's queries over the blocks ``mask``
    bool [B, Hq, n / bs, nb] lists (inputs checked)."""
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    P, r = comm.world, comm.rank
    bs = block_size
    L = n // 2
    nbc = L // bs
    nb = 2 * P * nbc
    dev = q.device
    stats = comm.stats
    stats.dense_ring_bytes, stats.dense_causal_bytes = dense_bytes(
        world=P, rank=r, batch=B, num_kv_heads=Hkv, head_dim=D, chunk_len=L, element_size=k.element_size())
    chunks = zigzag_chunks(P, r)
    first = [c * nbc for c in chunks]
    owner = block_owner(nb, nbc, P)  # host
    col = torch.arange(nb)
    need_dev = needed_blocks(mask, Hkv)
    remote = (need_dev[0] | need_dev[1]) & (owner.to(dev) != r)
    # every rank's requests (one host read): what to send to whom, what arrives from whom
    requests = comm.all_gather(remote.to(torch.uint8)).cpu().bool()  # [P, B, Hkv, nb]
    need = need_dev.cpu()
    blk_bytes = bs * 2 * D * k.element_size()
    kb = k.reshape(B, 2 * nbc, bs, Hkv, D)
    vb = v.reshape(B, 2 * nbc, bs, Hkv, D)

    def pack(pairs):
        """The blocks (b, g, c) [m, 3] this rank holds -> [m, bs, 2D] (keys, then values)."""
        c = pairs[:, 2]
        chunk = c // nbc
        local = (chunk != chunks[0]).long() * nbc + c - chunk * nbc
        b, lb, g = (t.to(dev) for t in (pairs[:, 0], local, pairs[:, 1]))
        return torch.cat([kb[b, lb, :, g], vb[b, lb, :, g]], dim=-1)

    def empty(m):
        return torch.empty(m, bs, 2 * D, dtype=k.dtype, device=dev)

    def from_rank(src):
        return requests[r] & (owner == src)

    def to_rank(dst):
        return requests[dst] & (owner == r)

    # the late chunk reads blocks of the early one: the only blocks a rank reads from itself
    own_pairs = (((need[0] & (col < first[0])) | (need[1] & (col < first[1]))) & (owner == r)).nonzero()

    def run(blocks, pairs, sources, own):
        return _step(q, k, v, mask, need, blocks, pairs, torch.isin(owner, torch.tensor(sources)), own, first=first,
                     L=L, bs=bs, scale=scale, backend=backend)

    acc = acc_lse = None

    def merge(res):
        nonlocal acc, acc_lse
        if res is None:
            return
        o, lse = res
        if acc is None:
            acc, acc_lse = o, lse
            return
        new = torch.logaddexp(acc_lse, lse)
        safe = torch.where(new == float("-inf"), 0.0, new)
        acc = acc * torch.exp(acc_lse - safe).T[..., None] + o * torch.exp(lse - safe).T[..., None]
        acc_lse = new

    if exchange == "all_to_all":
        recv_pairs = [from_rank(s).nonzero() if s != r else torch.zeros(0, 3, dtype=torch.long) for s in range(P)]
        send_pairs = [to_rank(d).nonzero() if d != r else torch.zeros(0, 3, dtype=torch.long) for d in range(P)]
        recv = empty(sum(len(p) for p in recv_pairs))
        if P > 1 and bool(requests.any()):
            send = torch.cat([pack(p) for p in send_pairs]) if any(len(p) for p in send_pairs) else empty(0)
            comm.all_to_all(send, [len(p) for p in send_pairs], recv, [len(p) for p in recv_pairs])
        stats.kv_bytes_received += recv.shape[0] * blk_bytes
        stats.kv_blocks_received += recv.shape[0]
        stats.kv_bytes_per_step.append(recv.shape[0] * blk_bytes)
        merge(run(torch.cat([pack(own_pairs), recv]), torch.cat([own_pairs, *recv_pairs]), list(range(P)), True))
    else:
        def post(t):
            src, dst = (r - t) % P, (r + t) % P
            rp, sp = from_rank(src).nonzero(), to_rank(dst).nonzero()
            send = pack(sp) if len(sp) else None
            recv = empty(len(rp)) if len(rp) else None
            return comm.exchange(send, dst, recv, src), send, recv, rp, src

        pending = post(1) if P > 1 else None
        merge(run(pack(own_pairs), own_pairs, [r], True))
        for t in range(1, P):
            handles, send, recv, rp, src = pending
            for h in handles:
                h.wait()
            pending = post(t + 1) if t + 1 < P else None
            m = 0 if recv is None else recv.shape[0]
            stats.kv_bytes_received += m * blk_bytes
            stats.kv_blocks_received += m
            stats.kv_bytes_per_step.append(m * blk_bytes)
            if m:
                merge(run(recv, rp, [src], False))
            del send
    out = acc.to(q.dtype).view(B, n, Hq, D)
    lse = acc_lse.view(Hq, B, n).transpose(0, 1).contiguous()
    return out, lse


def _step(q, k, v, mask, need, blocks, pairs, from_sources, own, *, first, L, bs, scale, backend):
    """One executor call: every own chunk of every sequence over the key blocks of this step.

    ``blocks`` [m, bs, 2D] are the keys and values of the (b, g, c) ``pairs`` [m, 3] (host) that
    arrived, all from ranks where ``from_sources`` bool [nb] (host) is True; ``own``: also the
    chunks' own keys (step 0).  Returns fp32 ``out`` [B * n, Hq, D] and ``lse`` [Hq, B * n], or
    None when no query reads a block of this step."""
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    nbc = L // bs
    nb = need.shape[-1]
    dev = q.device
    col = torch.arange(nb)
    seqs = []
    for b in range(B):
        for x in (0, 1):
            use = need[x, b] & (from_sources & (col < first[x]))[None, :]  # [Hkv, nb]: blocks read this step
            cols = use.any(0).nonzero()[:, 0]
            if len(cols) == 0 and not own:
                continue
            take = (pairs[:, 0] == b) & use[pairs[:, 1], pairs[:, 2]]
            if int(take.sum()) != int(use.sum()):
                raise RuntimeError(f"context-parallel exchange: sequence {b}, chunk {x} reads {int(use.sum())} blocks "
                                   f"of this step but {int(take.sum())} arrived")
            seqs.append((b, x, cols, take))
    if not seqs:
        return None
    lens = [len(cols) * bs + L for _, _, cols, _ in seqs]
    k_starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    total = sum(lens)
    k_all = torch.zeros(total, Hkv, D, dtype=k.dtype, device=dev)
    v_all = torch.zeros(total, Hkv, D, dtype=v.dtype, device=dev)
    max_nb = max(len(cols) for _, _, cols, _ in seqs) + nbc
    tables = []
    for (b, x, cols, take), k0 in zip(seqs, k_starts.tolist()):
        M = len(cols)
        if M:
            slot = torch.full((nb,), -1, dtype=torch.long)
            slot[cols] = torch.arange(M)
            j, g = slot[pairs[take, 2]].to(dev), pairs[take, 1].to(dev)
            src = blocks[take.to(dev)]
            k_all[k0:k0 + M * bs].view(M, bs, Hkv, D)[j, :, g] = src[..., :D]
            v_all[k0:k0 + M * bs].view(M, bs, Hkv, D)[j, :, g] = src[..., D:]
        k_all[k0 + M * bs:k0 + M * bs + L] = k[b, x * L:(x + 1) * L]
        v_all[k0 + M * bs:k0 + M * bs + L] = v[b, x * L:(x + 1) * L]
        rows = mask[b, :, x * nbc:(x + 1) * nbc]  # [Hq, nbc, nb]
        parts = [rows[:, :, cols.to(dev)]]
        if own:
            parts.append(rows[:, :, first[x]:first[x] + nbc])
        tables.append((M, *compact_block_mask(torch.cat(parts, -1))))
    width = max(1, int(max(int(c.max()) for _, c, _ in tables)))
    S = len(seqs)
    counts = torch.zeros(S, Hq, max_nb, dtype=torch.int32, device=dev)
    indices = torch.full((S, Hq, max_nb, width), -1, dtype=torch.int32, device=dev)
    for s, (M, c, idx) in enumerate(tables):
        counts[s, :, M:M + nbc] = c
        w = min(width, idx.shape[-1])
        indices[s, :, M:M + nbc, :w] = idx[..., :w]
    q_starts = torch.tensor([b * n + x * L for b, x, _, _ in seqs], dtype=torch.int32, device=dev)
    k_starts = k_starts.to(device=dev, dtype=torch.int32)
    k_ends = k_starts + torch.tensor(lens, dtype=torch.int32, device=dev)
    q_all = q.reshape(B * n, Hq, D)
    out = torch.zeros(B * n, Hq, D, dtype=torch.float32, device=dev)
    lse = torch.full((Hq, B * n), float("-inf"), dtype=torch.float32, device=dev)
    if backend == "torch":
        from ..ops import torch_attention

        torch_attention.sparse_attention_varlen(
            q_all, k_all, v_all, counts, indices, q_starts, q_starts + L, k_starts, k_ends, block_size=bs,
            softmax_scale=scale, return_lse=True, out=out, lse=lse)
    else:
        from ..ops.sparse_attention import sparse_attention_varlen

        sparse_attention_varlen(
            q_all, k_all, v_all, counts, indices, q_starts, q_starts + L, k_starts, k_ends, L, max(lens),
            block_size=bs, softmax_scale=scale, return_lse=True, out=out, lse=lse)
    return out, lse
