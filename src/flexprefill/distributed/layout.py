"""The load-balanced causal split of a sequence over ranks ("zig-zag").

A sequence of ``N`` tokens is cut into ``2 * world`` chunks of ``L = N / (2 * world)`` tokens;
rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r``, in that order, as one local tensor of
``2 * L`` tokens.  Under a causal mask chunk ``c`` costs work proportional to ``c + 1/2``, so
every rank's pair costs the same.  Chunks are whole blocks: ``N`` must be a multiple of
``2 * world * block_size``.
"""

from __future__ import annotations

import torch

__all__ = ["zigzag_chunks", "zigzag_owner", "zigzag_positions", "zigzag_shard", "zigzag_unshard"]


def _check_world(world: int, rank: int | None = None) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} must be a positive int (the number of ranks)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world):
        raise ValueError(f"rank={rank!r} must be an int in [0, {world})")


def zigzag_chunks(world: int, rank: int) -> tuple[int, int]:
    """The two chunks rank ``rank`` holds, early one first: ``(rank, 2 * world - 1 - rank)``."""
    _check_world(world, rank)
    return rank, 2 * world - 1 - rank


def zigzag_owner(chunk: int, world: int) -> tuple[int, int]:
    """The rank holding ``chunk`` and its slot there (0: the early chunk, 1: the late one)."""
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def _chunk_len(seq_len: int, world: int) -> int:
    if seq_len % (2 * world):
        raise ValueError(f"seq_len={seq_len} is not a multiple of 2 * world = {2 * world}")
    return seq_len // (2 * world)


def zigzag_positions(seq_len: int, world: int, rank: int, device=None) -> torch.Tensor:
    """Global positions (int64 [2 * L]) of the tokens rank ``rank`` holds, in local order:
    the position ids (RoPE) of a model that runs on the shard."""
    _check_world(world, rank)
    L = _chunk_len(seq_len, world)
    a, b = zigzag_chunks(world, rank)
    ar = torch.arange(L, device=device)
    return torch.cat([a * L + ar, b * L + ar])


def zigzag_shard(x: torch.Tensor, world: int, rank: int, *, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` (split along ``dim``): chunks
    ``rank`` and ``2 * world - 1 - rank`` concatenated (a new tensor)."""
    _check_world(world, rank)
    L = _chunk_len(x.shape[dim], world)
    a, b = zigzag_chunks(world, rank)
    return torch.cat([x.narrow(dim, a * L, L), x.narrow(dim, b * L, L)], dim=dim)


def zigzag_unshard(shards, *, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's part (a list in rank order), the inverse of :func:`zigzag_shard`."""
    shards = list(shards)
    world = len(shards)
    _check_world(world)
    n = shards[0].shape[dim]
    if n % 2 or any(s.shape[dim] != n for s in shards):
        raise ValueError(f"every shard must hold the same even number of tokens along dim {dim}; got "
                         f"{[s.shape[dim] for s in shards]}")
    L = n // 2
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        a, b = zigzag_chunks(world, r)
        chunks[a], chunks[b] = s.narrow(dim, 0, L), s.narrow(dim, L, L)
    return torch.cat(chunks, dim=dim)
