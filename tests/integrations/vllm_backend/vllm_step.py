"""A vLLM step built by hand on the CPU: requests with cached prefixes and new chunks, a paged
K/V cache written through ``slot_mapping`` as vLLM's cache update does, and the metadata vLLM
hands an attention backend (``query_start_loc``, ``seq_lens``, ``block_table``,
``slot_mapping``).  The contiguous K/V of every request is kept as the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Step:
    query: torch.Tensor  # [num_tokens, Hq, D]
    kv_cache: torch.Tensor  # [num_pages, 2, page_size, Hkv, D] (logical; strides per layout)
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    block_table: torch.Tensor  # int32 [R, max_pages]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    keys: list  # per request [seq_len, Hkv, D] (contiguous reference)
    values: list

    @property
    def key_cache(self):
        return self.kv_cache.unbind(1)[0]

    @property
    def value_cache(self):
        return self.kv_cache.unbind(1)[1]


def make_step(requests, *, Hq=4, Hkv=2, D=64, page_size=16, dtype=torch.float16, layout="NHD", seed=0,
              spare_pages=3, pad_reqs=0) -> Step:
    """``requests``: (cached, new) token counts per request (a decode is (n, 1)).

    Pages are handed out in a shuffled order (so no request's pages are contiguous), the
    cached prefix is written before the step and the chunk through the step's
    ``slot_mapping``.  ``pad_reqs`` adds requests with no tokens (vLLM's CUDA-graph padding).
    """
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-(c + n) // page_size) for c, n in requests]
    num_pages = sum(pages_per) + spare_pages + 1
    if layout == "NHD":
        kv_cache = torch.zeros(num_pages, 2, page_size, Hkv, D, dtype=dtype)
    elif layout == "HND":
        kv_cache = torch.zeros(num_pages, 2, Hkv, page_size, D, dtype=dtype).permute(0, 1, 3, 2, 4)
    else:
        raise ValueError(layout)
    order = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()  # page 0 stays the null page
    max_pages = max(pages_per) + 2
    R = len(requests) + pad_reqs
    block_table = torch.zeros(R, max_pages, dtype=torch.int32)
    key_cache, value_cache = kv_cache.unbind(1)
    keys, values, queries, slots, qsl, lens = [], [], [], [], [0], []
    for r, (cached, new) in enumerate(requests):
        pages = [order.pop() for _ in range(pages_per[r])]
        block_table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        n = cached + new
        k = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v = torch.randn(n, Hkv, D, generator=g).to(dtype)
        keys.append(k)
        values.append(v)
        pos = torch.arange(n)
        slot = torch.tensor(pages)[pos // page_size] * page_size + pos % page_size
        # the cached prefix, written by earlier steps
        key_cache[slot[:cached] // page_size, slot[:cached] % page_size] = k[:cached]
        value_cache[slot[:cached] // page_size, slot[:cached] % page_size] = v[:cached]
        slots.append(slot[cached:])
        queries.append(torch.randn(new, Hq, D, generator=g).to(dtype))
        qsl.append(qsl[-1] + new)
        lens.append(n)
    for _ in range(pad_reqs):
        qsl.append(qsl[-1])
        lens.append(0)
    slot_mapping = torch.cat(slots)
    # this step's cache update: the new tokens' K/V go to their slots
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, requests)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, requests)])
    key_cache[slot_mapping // page_size, slot_mapping % page_size] = new_k
    value_cache[slot_mapping // page_size, slot_mapping % page_size] = new_v
    return Step(
        query=torch.cat(queries), kv_cache=kv_cache, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_table=block_table, slot_mapping=slot_mapping,
        keys=keys, values=values,
    )
