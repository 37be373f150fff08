"""Which requests of one vLLM step run FlexPrefill, and the varlen inputs they need.

vLLM packs every request of a step into one token batch: request ``r`` has query rows
``query_start_loc[r] .. query_start_loc[r+1]`` and a context of ``seq_lens[r]`` tokens (the
cached prefix plus this step's chunk), whose K/V live in the paged cache at the pages
``block_table[r]`` lists.  Each request falls in one of three classes:

* a *decode* row: ``query_len <= decode_threshold`` (one token, or a speculative-decoding
  row of ``1 + k`` tokens);
* a *short prefill*: a prefill chunk whose context is below ``min_seq_len``;
* a *sparse prefill*: a prefill chunk with ``seq_len >= min_seq_len``.  Its queries are the
  chunk and its keys the whole context, bottom-right causal: what
  :func:`flexprefill.flex_prefill_attention_varlen` computes for a sequence with
  ``n_q = query_len`` queries and ``n_k = seq_len`` keys.

Decodes and short prefills stay on vLLM's own path; :func:`plan_step` lists the sparse ones.
Requests with no query rows (the padding vLLM adds for CUDA graphs) belong to no class.  The
order of the batch does not matter: nothing assumes decodes come first.

Everything here reads CPU tensors only (``query_start_loc_cpu`` and the CPU bound on
``seq_lens``, exact for prefill rows), so planning a step costs no device sync.  This module
does not import vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepSplit", "SparsePlan", "SparseBatch", "plan_step", "to_device"]


@dataclass(frozen=True)
class StepSplit:
    """How many requests of a step fall in each class (padding rows in none)."""

    num_decodes: int
    num_short_prefills: int
    num_sparse: int
    num_decode_tokens: int
    num_short_prefill_tokens: int
    num_sparse_tokens: int


@dataclass(frozen=True)
class SparsePlan:
    """The sparse prefill chunks of one step, on the host.

    Attributes:
        req_idx: batch indices of the requests that run FlexPrefill, in batch order.
        q_start, q_end: each one's query rows in the step's packed tokens.
        seq_lens: each one's context length (keys), cached prefix included.
        cu_seqlens_q: int32 [S + 1], the chunks packed one after another.
        cu_seqlens_k: int32 [S + 1], the contexts packed one after another.
        max_seqlen_q, max_seqlen_k: the longest chunk and context.
        contiguous: the chunks are adjacent in the batch, so their queries are the one row
            range ``q_start[0] .. q_end[-1]`` (a view, no copy).
        covers_batch: every request with query rows is sparse (vLLM's own kernel has nothing
            to do this step).
        split: the class counts of the whole step.
    """

    req_idx: tuple[int, ...]
    q_start: tuple[int, ...]
    q_end: tuple[int, ...]
    seq_lens: tuple[int, ...]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    contiguous: bool
    covers_batch: bool
    split: StepSplit

    @property
    def num_seqs(self) -> int:
        return len(self.req_idx)

    @property
    def total_q(self) -> int:
        return int(self.cu_seqlens_q[-1])

    @property
    def total_k(self) -> int:
        return int(self.cu_seqlens_k[-1])


def _check_cpu_vector(name: str, t, n: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the host copy vLLM keeps), got one on {t.device}")
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
    if n is not None and t.numel() < n:
        raise ValueError(f"{name} has {t.numel()} entries, need at least {n}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")


def plan_step(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    min_seq_len: int,
    decode_threshold: int = 1,
    num_reqs: int | None = None,
) -> SparsePlan | None:
    """Classify the requests of a step and plan its sparse prefill chunks.

    Args:
        query_start_loc: CPU int [num_reqs + 1], vLLM's ``query_start_loc_cpu``.
        seq_lens: CPU int [num_reqs], context length per request (cached tokens plus this
            step's); vLLM's ``seq_lens_cpu_upper_bound`` is exact for prefill rows, the only
            rows read here.
        min_seq_len: a prefill chunk runs FlexPrefill when its context has at least this
            many tokens.
        decode_threshold: rows with at most this many query tokens are decodes.
        num_reqs: requests to read (default ``len(seq_lens)``).

    Returns:
        A :class:`SparsePlan`, or None when no request of the step runs FlexPrefill.
    """
    _check_int("min_seq_len", min_seq_len, 0)
    _check_int("decode_threshold", decode_threshold, 1)
    _check_cpu_vector("seq_lens", seq_lens)
    if num_reqs is None:
        num_reqs = seq_lens.numel()
    _check_int("num_reqs", num_reqs, 0)
    _check_cpu_vector("seq_lens", seq_lens, num_reqs)
    _check_cpu_vector("query_start_loc", query_start_loc, num_reqs + 1)
    qsl = query_start_loc[: num_reqs + 1].tolist()
    lens = seq_lens[:num_reqs].tolist()

    counts = [0, 0, 0]
    tokens = [0, 0, 0]
    picked: list[int] = []
    for r in range(num_reqs):
        n_q = qsl[r + 1] - qsl[r]
        if n_q < 0:
            raise ValueError(f"query_start_loc must be non-decreasing; request {r} has {n_q} query rows")
        if n_q == 0:
            continue
        if n_q <= decode_threshold:
            cls = 0
        else:
            if lens[r] < n_q:
                raise ValueError(
                    f"request {r} has {n_q} query rows but seq_len={lens[r]}; a request's context "
                    "includes its queries (seq_len >= query_len)"
                )
            cls = 2 if lens[r] >= min_seq_len else 1
        counts[cls] += 1
        tokens[cls] += n_q
        if cls == 2:
            picked.append(r)
    split = StepSplit(counts[0], counts[1], counts[2], tokens[0], tokens[1], tokens[2])
    if not picked:
        return None

    q_start = tuple(qsl[r] for r in picked)
    q_end = tuple(qsl[r + 1] for r in picked)
    ctx = tuple(lens[r] for r in picked)
    n_q = [e - s for s, e in zip(q_start, q_end)]
    cu_q = torch.zeros(len(picked) + 1, dtype=torch.int32)
    cu_q[1:] = torch.tensor(n_q, dtype=torch.int64).cumsum(0)
    cu_k = torch.zeros(len(picked) + 1, dtype=torch.int32)
    cu_k[1:] = torch.tensor(ctx, dtype=torch.int64).cumsum(0)
    contiguous = all(q_end[i] == q_start[i + 1] for i in range(len(picked) - 1))
    return SparsePlan(
        req_idx=tuple(picked), q_start=q_start, q_end=q_end, seq_lens=ctx, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max(n_q), max_seqlen_k=max(ctx), contiguous=contiguous,
        covers_batch=counts[0] == 0 and counts[1] == 0, split=split,
    )


@dataclass
class SparseBatch:
    """A :class:`SparsePlan` with its tensors on the device, ready for the forward pass.

    Attributes:
        plan: the host plan.
        cu_seqlens_q, cu_seqlens_k: int32 [S + 1] on the device.
        seq_lens: int32 [S] on the device (each context length).
        block_table: int32 [S, max_pages]: the sparse requests' rows of vLLM's block table.
        rows: int64 [total_q], the query rows of the chunks in the step's batch, or None when
            the chunks are contiguous (then ``plan.q_start[0] .. plan.q_end[-1]``).
        req_idx: int64 [S] on the device, the batch indices (to take rows of a new block
            table for another KV-cache group).
    """

    plan: SparsePlan
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    rows: torch.Tensor | None
    req_idx: torch.Tensor

    def with_block_table(self, block_table: torch.Tensor) -> "SparseBatch":
        """The same batch reading another KV-cache group's block table (same requests)."""
        return SparseBatch(self.plan, self.cu_seqlens_q, self.cu_seqlens_k, self.seq_lens,
                           block_table.index_select(0, self.req_idx), self.rows, self.req_idx)


def to_device(plan: SparsePlan, block_table: torch.Tensor) -> SparseBatch:
    """Move a plan's tensors to ``block_table``'s device (vLLM's ``block_table_tensor``,
    int32 [num_reqs, max_pages]) and take the sparse requests' block-table rows there.
    Host-to-device copies only; nothing is read back."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ValueError(f"block_table must be a 2-D tensor [num_reqs, max_pages], got {got}")
    if max(plan.req_idx) >= block_table.shape[0]:
        raise ValueError(f"block_table has {block_table.shape[0]} rows; the plan reads request {max(plan.req_idx)}")
    dev = block_table.device
    req_idx = torch.tensor(plan.req_idx, dtype=torch.int64).to(dev, non_blocking=True)
    rows = None
    if not plan.contiguous:
        rows = torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in zip(plan.q_start, plan.q_end)])
        rows = rows.to(dev, non_blocking=True)
    return SparseBatch(
        plan=plan,
        cu_seqlens_q=plan.cu_seqlens_q.to(dev, non_blocking=True),
        cu_seqlens_k=plan.cu_seqlens_k.to(dev, non_blocking=True),
        seq_lens=torch.tensor(plan.seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
        block_table=block_table.index_select(0, req_idx),
        rows=rows,
        req_idx=req_idx,
    )
