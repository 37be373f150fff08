"""Options: each switch changes what it says, bad values raise, the environment sets the defaults."""

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import flexprefill as fp
from flexprefill.options import ENV, Options


def test_defaults_and_documented_fields():
    o = Options()
    assert (o.rep_block_stats, o.radix_select, o.search_graphs, o.whole_search_graph) == (None, True, True, True)
    assert (o.search_graph_max_elems, o.graph_pool, o.graph_seed, o.int16_block_ids) == (1 << 24, "shared", True, True)
    assert (o.tma, o.hopper_kernel, o.diag_first, o.dense_cudnn) == (True, "auto", None, True)
    # every field has its environment variable and a line in the docstring
    names = set(Options.__dataclass_fields__)
    assert set(ENV) == names and len(names) == 12
    for name in names:
        assert f"    {name}:" in Options.__doc__, name


@pytest.mark.parametrize("changes, match", [
    (dict(radix_select="yes"), "radix_select='yes' must be True or False"),
    (dict(rep_block_stats=1), r"rep_block_stats=1 must be True, False or None"),
    (dict(search_graph_max_elems=-1), "search_graph_max_elems=-1 must be an int >= 0"),
    (dict(graph_pool="mine"), r"graph_pool='mine' is not supported; accepted: \('shared', 'private'\)"),
    (dict(hopper_kernel="1"), r"hopper_kernel='1' is not supported; accepted: \('auto', 'tiled', 'ws', 'off'\)"),
    (dict(radix=False), r"unknown option\(s\) \['radix'\]; accepted: \["),
])
def test_invalid_values_raise_and_change_nothing(changes, match):
    before = fp.options()
    with pytest.raises((TypeError, ValueError), match=match):
        fp.set_options(**changes)
    with pytest.raises((TypeError, ValueError), match=match):
        with fp.use_options(**changes):
            pass
    assert fp.options() == before


def test_set_and_use_options():
    with fp.use_options(search_graphs=False, tma=False) as o:
        assert o is fp.options() and not o.search_graphs and not o.tma
    assert fp.options().search_graphs and fp.options().tma
    assert fp.set_options(graph_seed=False).graph_seed is False and fp.options().graph_seed is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.options().tma = False


def test_environment_sets_the_defaults_once():
    env = dict(os.environ, FLEXPREFILL_RADIX_SELECT="0", FLEXPREFILL_HOPPER_KERNEL="1", FLEXPREFILL_DIAG_FIRST="0",
               FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS="123", FLEXPREFILL_GRAPH_POOL="private",
               FLEXPREFILL_REP_BLOCK_STATS="1", FLEXPREFILL_SELECTION_GRAPHS="0", FLEXPREFILL_SEARCH_GRAPH="0",
               FLEXPREFILL_GRAPH_SEED="0", FLEXPREFILL_INT16_BLOCK_IDS="0", FLEXPREFILL_TMA="0",
               FLEXPREFILL_DENSE_CUDNN="0")
    code = ("import os, flexprefill as fp; o = fp.options(); os.environ['FLEXPREFILL_TMA'] = '1'; "
            "print(o == fp.options(), o.radix_select, o.hopper_kernel, o.diag_first, o.search_graph_max_elems, "
            "o.graph_pool, o.rep_block_stats, o.search_graphs, o.whole_search_graph, o.graph_seed, "
            "o.int16_block_ids, o.tma, o.dense_cudnn)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "tiled", "False", "123", "private", "True", "False", "False", "False",
                           "False", "False", "False"]
    # an unreadable value keeps the default, with a warning
    env = dict(os.environ, FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS="lots")
    res = subprocess.run([sys.executable, "-W", "always", "-c", "import flexprefill as fp; print(fp.options().search_graph_max_elems)"],
                         env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split() == [str(1 << 24)] and "cannot be read" in res.stderr


def test_search_switches():
    from flexprefill.search import compact_index_dtype, graph, scores

    with fp.use_options(rep_block_stats=False):
        assert not scores._block_stats_enabled(1, 1)
    with fp.use_options(rep_block_stats=True):
        assert scores._block_stats_enabled(1 << 10, 1 << 10)
    with fp.use_options(int16_block_ids=False):
        assert compact_index_dtype(100) == torch.int32
    assert compact_index_dtype(100) == torch.int16
    with fp.use_options(search_graphs=False):
        assert not graph._graphs_enabled()
    assert graph._graphs_enabled() and graph._search_graph_enabled()
    with fp.use_options(whole_search_graph=False):
        assert not graph._search_graph_enabled()
    with fp.use_options(graph_seed=False):
        assert not graph._seeding()
    with fp.use_options(search_graph_max_elems=0):
        assert graph._graph_pays(9, 256) and not graph._graph_pays(9, 257)
    assert graph._graph_pays(9, 1024) and not graph._graph_pays(32, 1024)
    with fp.use_options(graph_pool="private"):
        assert graph._graph_pool("cuda:0") is None
    # the head chunk of a graph follows the threshold algorithm
    assert graph._graph_chunk(100) == graph._GRAPH_CHUNK_ELEMS_LARGE
    with fp.use_options(radix_select=False):
        assert graph._graph_chunk(100) == graph._GRAPH_CHUNK_ELEMS


def test_radix_select_switch_picks_the_algorithm(monkeypatch):
    from flexprefill.search import gamma

    launched = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(grid)

    x = torch.rand(2, 300, generator=torch.Generator().manual_seed(0))
    want = gamma.threshold_entry(x, 0.9)
    monkeypatch.setattr(gamma, "radix_hist_kernel", Spy())
    monkeypatch.setattr(gamma, "radix_final_kernel", Spy())
    with fp.use_options(radix_select=False):
        got = gamma.threshold_entry(x, 0.9)
    assert not launched and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gamma.threshold_entry(x, 0.9)
    assert len(launched) == 10  # 9 histogram passes and the final kernel


def test_kernel_switches():
    from flexprefill.ops import sparse_attention as SA
    from flexprefill.ops.dense_attention import _sdpa_order

    assert SA._diag_first(64) and not SA._diag_first(128)
    with fp.use_options(diag_first=True):
        assert SA._diag_first(128)
    with fp.use_options(diag_first=False):
        assert not SA._diag_first(64)
    # tensor descriptors for K/V (the interpreter runs them) unless tma is off
    k = torch.randn(1, 256, 2, 64, dtype=torch.float16)
    from flexprefill.options import interpreting

    if interpreting():
        assert SA._tma_descriptors(k, k, 64, 64) is not None
    with fp.use_options(tma=False):
        assert SA._tma_descriptors(k, k, 64, 64) is None
    # the Hopper kernel choice (None: the Triton kernel)
    assert SA._hopper_policy("auto", 128, 128, True) == "ws" and SA._hopper_policy("tiled", 128, 128, True) == "tiled"
    assert SA._hopper_policy("off", 128, 128, True) is None
    # dense attention asks SDPA for cuDNN first on CUDA unless dense_cudnn is off
    assert not isinstance(_sdpa_order(torch.device("cuda")), contextlib.nullcontext)
    with fp.use_options(dense_cudnn=False):
        assert isinstance(_sdpa_order(torch.device("cuda")), contextlib.nullcontext)
    assert isinstance(_sdpa_order(torch.device("cpu")), contextlib.nullcontext)
