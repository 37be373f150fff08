"""Which key/value blocks a rank's selection reads from which rank, and what moving them costs.

The unit of exchange is one key block of one K/V head of one sequence of the batch: ``bs``
keys and ``bs`` values of ``D`` elements.  A rank requests a (sequence, K/V head, block)
when some query head of that K/V head's group, in some query block of its own, selects the
block; blocks it holds itself are never requested.  :func:`exchange_volume` computes the
same counts from a whole-sequence block mask, with no process group: what the benchmarks and
the CPU measurements use to compare against dense ring attention.
"""

from __future__ import annotations

import torch

from .layout import zigzag_chunks

__all__ = ["needed_blocks", "block_owner", "exchange_volume"]


def needed_blocks(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """bool [2, B, Hkv, nb]: the key blocks each of a rank's two chunks reads, per sequence and K/V head,
    from its rows' block mask bool [B, Hq, 2 * nbc, nb] (early chunk's rows first)."""
    B, Hq, R, nb = mask.shape
    group = Hq // num_kv_heads
    m = mask.reshape(B, num_kv_heads, group, 2, R // 2, nb)
    return m.any(dim=4).any(dim=2).permute(2, 0, 1, 3)


def block_owner(num_blocks: int, blocks_per_chunk: int, world: int, device=None) -> torch.Tensor:
    """int64 [nb]: the rank holding each key block."""
    chunk = torch.arange(num_blocks, device=device) // blocks_per_chunk
    return torch.where(chunk < world, chunk, 2 * world - 1 - chunk)


def dense_bytes(*, world: int, rank: int, batch: int, num_kv_heads: int, head_dim: int, chunk_len: int,
                element_size: int) -> tuple[int, int]:
    """(dense ring, dense causal) bytes of keys and values rank ``rank`` receives.

    Dense ring attention moves every other rank's two chunks to this rank.  A dense exchange
    that skips what no causal row needs moves the remote chunks before this rank's late chunk
    (``2 * world - 2 - rank`` of them)."""
    per_chunk = batch * num_kv_heads * chunk_len * 2 * head_dim * element_size
    late = zigzag_chunks(world, rank)[1]
    return 2 * (world - 1) * per_chunk, max(0, late - 1) * per_chunk


def exchange_volume(mask: torch.Tensor, *, world: int, block_size: int, num_kv_heads: int, head_dim: int,
                    element_size: int) -> list[dict]:
    """The K/V exchange of a context-parallel call whose selection is ``mask`` bool [B, Hq, nb, nb]
    (the whole sequence's block mask, e.g. ``BlockSelection.to_mask()``), per rank.

    Returns one dict per rank: ``kv_blocks_received``, ``kv_bytes_received``, ``kv_bytes_sent``,
    ``dense_ring_bytes``, ``dense_causal_bytes`` (as :class:`flexprefill.distributed.CommStats`)."""
    B, Hq, nb, _ = mask.shape
    if nb % (2 * world):
        raise ValueError(f"the mask has {nb} blocks, not a multiple of 2 * world = {2 * world}")
    nbc = nb // (2 * world)
    owner = block_owner(nb, nbc, world, mask.device)
    blk = block_size * 2 * head_dim * element_size
    ar = torch.arange(nbc, device=mask.device)
    out, sent = [], [0] * world
    for r in range(world):
        a, b = zigzag_chunks(world, r)
        rows = torch.cat([a * nbc + ar, b * nbc + ar])
        need = needed_blocks(mask[:, :, rows], num_kv_heads)
        remote = (need[0] | need[1]) & (owner != r)
        per_src = torch.bincount(owner.expand_as(remote)[remote], minlength=world)
        for s in range(world):
            sent[s] += int(per_src[s]) * blk
        n = int(remote.sum())
        ring, causal = dense_bytes(world=world, rank=r, batch=B, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   chunk_len=nbc * block_size, element_size=element_size)
        out.append(dict(kv_blocks_received=n, kv_bytes_received=n * blk, dense_ring_bytes=ring,
                        dense_causal_bytes=causal))
    for r in range(world):
        out[r]["kv_bytes_sent"] = sent[r]
    return out
