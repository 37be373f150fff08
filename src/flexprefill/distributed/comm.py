"""The process group of a context-parallel call, its collectives, and what they moved.

Every collective the search and the K/V exchange run goes through :class:`Comm`, which
counts the bytes each rank receives (:class:`CommStats`).  Without an initialised process
group a call runs on one rank and no collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommStats", "Comm"]


@dataclass
class CommStats:
    """What one rank moved in one context-parallel call.

    K/V exchange (the attention's communication, what dense ring attention is compared on):

    * ``kv_bytes_received`` / ``kv_bytes_sent``: key and value bytes this rank received from /
      sent to other ranks; ``kv_blocks_received``: (batch, K/V head, key block) triples received.
    * ``kv_bytes_per_step``: received per exchange step (``world - 1`` entries, one per remote
      ring step; one entry for ``exchange="all_to_all"``).
    * ``dense_ring_bytes``: what dense ring attention on the same layout receives on this rank
      (every other rank's K and V: ``(world - 1) / world`` of the whole sequence's K/V).
    * ``dense_causal_bytes``: what a dense exchange that skips only the blocks no causal row
      needs receives (every remote block before this rank's late chunk).

    Everything else: ``control_bytes_received``, the bytes this rank receives in the other
    collectives (the check that every rank was called alike, the pattern search, the block
    requests), counted as ring algorithms move them: an all-gather ``(world - 1) x`` the
    contribution, an all-reduce ``2 (world - 1) / world x`` the tensor, a broadcast the tensor.
    ``collectives``: the number of collective calls (a ring step's send/receive pair counts
    as one).
    """

    kv_bytes_received: int = 0
    kv_bytes_sent: int = 0
    kv_blocks_received: int = 0
    kv_bytes_per_step: list[int] = field(default_factory=list)
    dense_ring_bytes: int = 0
    dense_causal_bytes: int = 0
    control_bytes_received: int = 0
    collectives: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__, kv_bytes_per_step=list(self.kv_bytes_per_step))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """A process group (or one rank without one) with counted collectives.

    ``group``: a ``torch.distributed`` process group, or None for the default group; with no
    initialised default group the call is a world of one rank.
    """

    def __init__(self, group=None):
        self.stats = CommStats()
        if not dist.is_available() or not dist.is_initialized():
            if group is not None:
                raise ValueError("group was given but torch.distributed is not initialised")
            self.pg, self.world, self.rank, self.backend = None, 1, 0, None
            return
        self.pg = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.pg)
        self.rank = dist.get_rank(self.pg)
        self.backend = str(dist.get_backend(self.pg)).lower()

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank) if self.pg is not dist.group.WORLD else group_rank

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's ``t`` (same shape and dtype on every rank)."""
        if self.world == 1:
            return t[None].clone()
        flat = t.contiguous().reshape(-1)
        out = torch.empty(self.world * flat.numel(), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, flat, group=self.pg)
        self.stats.control_bytes_received += (self.world - 1) * _nbytes(flat)
        self.stats.collectives += 1
        return out.view(self.world, *t.shape)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over the ranks, in place ("sum" or "max")."""
        if self.world == 1:
            return t
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.pg)
        self.stats.control_bytes_received += 2 * (self.world - 1) * _nbytes(t) // self.world
        self.stats.collectives += 1
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Group rank ``src``'s ``t`` on every rank, in place."""
        if self.world == 1:
            return t
        dist.broadcast(t, src=self.global_rank(src), group=self.pg)
        if self.rank != src:
            self.stats.control_bytes_received += _nbytes(t)
        self.stats.collectives += 1
        return t

    def exchange(self, send: torch.Tensor | None, dst: int, recv: torch.Tensor | None, src: int):
        """Start sending ``send`` to group rank ``dst`` and receiving ``recv`` from ``src``
        (either may be None: nothing to move that way); returns the handles to wait on."""
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.global_rank(dst), group=self.pg))
            self.stats.kv_bytes_sent += _nbytes(send)
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.global_rank(src), group=self.pg))
        if not ops:
            return []
        self.stats.collectives += 1
        return dist.batch_isend_irecv(ops)

    def all_to_all(self, send: torch.Tensor, send_rows: list[int], recv: torch.Tensor, recv_rows: list[int]):
        """Rows ``send_rows[d]`` of ``send`` (in rank order) to rank ``d``; ``recv_rows[s]`` rows from
        rank ``s`` into ``recv``."""
        self.stats.kv_bytes_sent += _nbytes(send)
        self.stats.collectives += 1
        dist.all_to_all_single(recv, send, output_split_sizes=recv_rows, input_split_sizes=send_rows, group=self.pg)
