"""The gamma rule on the device: the two-level scan, the count, the radix threshold entry."""

import pytest
import torch

import flexprefill as fp



@pytest.mark.parametrize("n", [7, 4096, 4097, 5000, 1 << 16, 300_001])
def test_two_level_scan_equals_cumsum(n):
    from flexprefill.search.gamma import count_to_mass as _count_to_mass, cumsum_rows as _cumsum_rows

    g = torch.Generator().manual_seed(n)
    x = torch.rand(3, n, generator=g)
    got = _cumsum_rows(x)
    want = x.double().cumsum(-1)
    assert got.shape == x.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    # the count of entries that reach gamma of the mass: at most one off from float rounding
    srt = torch.sort(x, dim=-1, descending=True).values
    exact = ((srt.double().cumsum(-1) < 0.9 * want[:, -1:]).sum(-1) + 1).clamp_max(n)
    assert (_count_to_mass(x, 0.9) - exact).abs().max() <= 1


def _threshold_valid(row: torch.Tensor, value: float, pos: int, gamma: float) -> bool:
    """Whether entry (value, pos) of ``row`` may end the ranking: in (value desc, position asc)
    order the fp64 running sum before it is below the goal and through it reaches the goal,
    both within fp32 rounding of the row total."""
    srt = torch.sort(row.double(), descending=True, stable=True)
    n = int((srt.indices == pos).nonzero()[0, 0])
    assert float(row[pos]) == value
    cum = srt.values.cumsum(0)
    total = float(cum[-1])
    goal, eps = gamma * total, 1e-6 * max(total, 1e-30)
    before = float(cum[n - 1]) if n > 0 else 0.0
    return before < goal + eps and float(cum[n]) >= goal - eps


@pytest.mark.parametrize("T", [1, 7, 136, 5000, 9000])
@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "power-law"])
def test_radix_threshold_entry_equals_sort(T, kind, monkeypatch):
    # the query-aware ranking's threshold entry by radix selection (8 passes of 4 bits, then
    # the ties) against a stable sort and its cumsum; several splits from T > 4096
    from flexprefill.search.gamma import threshold_entry as _threshold_entry

    g = torch.Generator().manual_seed(T)
    H = 4
    x = torch.rand(H, T, generator=g)
    if kind == "ties":
        x = (x * 8).floor() / 8
    elif kind == "sparse":
        x = torch.where(torch.rand(H, T, generator=g) < 0.7, 0.0, x)
    elif kind == "power-law":
        x = x**8 / T
    x[-1] = 0.0  # a row of zeros: the first entry ends it
    x = x.to("cuda" if torch.cuda.is_available() else "cpu")
    for gamma in (0.5, 0.9, 0.99):
        thr, pos = _threshold_entry(x, gamma)
        fp.set_options(radix_select=False)
        thr_s, pos_s = _threshold_entry(x, gamma)
        fp.set_options(radix_select=True)
        assert thr.dtype == thr_s.dtype and pos.dtype == pos_s.dtype
        for h in range(H):
            assert _threshold_valid(x[h].cpu(), float(thr[h]), int(pos[h]), gamma), (kind, T, gamma, h)
        assert torch.equal(thr, thr_s) and torch.equal(pos, pos_s)


def test_radix_threshold_entry_with_long_splits(monkeypatch):
    # past _RADIX_MAX_SPLITS splits each program takes a longer stretch of the list (several
    # loop steps); the same entries as the sort
    from flexprefill.search import gamma as G

    monkeypatch.setattr(G, "_RADIX_MAX_SPLITS", 2)
    monkeypatch.setattr(G, "_RADIX_PER_SPLIT", 1024)
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(3, 9000, generator=g) ** 4).to("cuda" if torch.cuda.is_available() else "cpu")
    x[1, ::3] = 0.25  # many ties
    thr, pos = G.threshold_entry(x, 0.9)
    fp.set_options(radix_select=False)
    thr_s, pos_s = G.threshold_entry(x, 0.9)
    assert torch.equal(thr, thr_s) and torch.equal(pos, pos_s)
