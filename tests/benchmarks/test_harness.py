"""The benchmark's bookkeeping on the CPU: counting, inputs, the FlexAttention backend, writers, a dry run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import flexprefill as fp
import harness as bm
from flexprefill.backends import flex_attention_from_selection
from flexprefill.block_table import mask_to_selection
from flexprefill_tools.synthetic import structured_qkv


def _random_selection_from_mask(B, H, N, bs, p, seed, keep_diag=True):
    nb = math.ceil(N / bs)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, nb, nb, generator=g) < p
    if keep_diag:
        mask |= torch.eye(nb, dtype=torch.bool)
    return mask_to_selection(mask, block_size=bs, seq_len=N, query_aware=torch.zeros(B, H, dtype=torch.bool),
                             js_distance=torch.zeros(B, H))


@pytest.mark.parametrize(
    "N,bs,keep_diag",
    [
        pytest.param(1000, 64, True, id="N1000-bs64"),
        pytest.param(257, 32, False, id="N257-bs32-some-rows-without-diagonal"),
        pytest.param(128, 128, True, id="N128-one-block"),
    ],
)
def test_count_pairs_matches_brute_force(N, bs, keep_diag):
    sel = _random_selection_from_mask(2, 3, N, bs, 0.4, seed=N, keep_diag=keep_diag)
    blk = torch.arange(N) // bs
    token = sel.to_mask()[:, :, blk][:, :, :, blk] & torch.ones(N, N, dtype=torch.bool).tril()
    assert bm.count_pairs(sel.counts, sel.indices, block_size=bs, seq_len=N) == int(token.sum())
    # the density counts blocks against the causal grid nb (nb + 1) / 2
    nb = math.ceil(N / bs)
    assert bm.causal_density(sel.counts) == pytest.approx(float(sel.counts.sum()) / (2 * 3 * nb * (nb + 1) / 2))


def test_full_selection_counts_dense_causal_pairs_and_flops():
    N, bs = 300, 64
    nb = math.ceil(N / bs)
    sel = _random_selection_from_mask(1, 2, N, bs, 1.0, seed=0)
    assert bm.count_pairs(sel.counts, sel.indices, block_size=bs, seq_len=N) == 2 * bm.dense_pairs(N) == 2 * N * (N + 1) // 2
    assert bm.causal_density(sel.counts) == 1.0
    assert sel.counts.sum() == 2 * nb * (nb + 1) // 2
    assert bm.attention_flops(bm.dense_pairs(N), 128) == 4 * 128 * N * (N + 1) / 2


def test_random_selection_hits_its_density():
    sel = bm.random_selection(1, 4, 64 * 128, block_size=128, density=0.2, device="cpu", seed=1)
    assert abs(bm.causal_density(sel.counts) - 0.2) < 0.02
    # the sink and the diagonal of every row are always there
    mask = sel.to_mask()
    assert mask[..., 0].all() and torch.diagonal(mask, dim1=-2, dim2=-1).all()


def test_break_even_length():
    L = [1024, 2048, 4096, 8192]
    assert bm.break_even_length(L, [2.0, 0.9, 0.8, 0.5], [1.0, 1.0, 1.0, 1.0]) == 2048
    # a loss at a longer length moves the break-even past it
    assert bm.break_even_length(L, [0.5, 0.9, 1.2, 0.5], [1.0, 1.0, 1.0, 1.0]) == 8192
    assert bm.break_even_length(L, [0.5, 0.5, 0.5, 1.5], [1.0, 1.0, 1.0, 1.0]) is None
    assert bm.break_even_length(L, [0.5, 0.5, None, 0.5], [1.0, 1.0, 1.0, 1.0]) == 8192


def test_device_built_synthetic_equals_the_host_built_on_cpu():
    # on the CPU both ways draw the same stream: building on the device changes where, not what
    for shape in [(1, 1100, 4, 2, 64), (2, 600, 3, 3, 128)]:
        want = structured_qkv(*shape, seed=3, dtype=torch.float32)
        got = structured_qkv(*shape, seed=3, dtype=torch.float32, device="cpu", generate_on="device")
        for w, g in zip(want, got):
            assert torch.equal(w, g)
    with pytest.raises(ValueError, match="generate_on='gpu'"):
        structured_qkv(1, 64, 1, 1, 16, generate_on="gpu")


@pytest.mark.parametrize(
    "N,Hq,Hkv,bs",
    [
        pytest.param(1000, 4, 2, 64, id="N1000-H4/2-D64-bs64"),
        pytest.param(300, 4, 1, 128, id="N300-H4/1-D64-bs128"),
        pytest.param(256, 2, 2, 32, id="N256-H2/2-D64-bs32"),
    ],
)
def test_flex_attention_backend_matches_reference_eager(N, Hq, Hkv, bs):
    q, k, v = structured_qkv(1, N, Hq, Hkv, 64, dtype=torch.float32, seed=1)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.8, min_budget=0, backend="reference")
    sel = fp.select_blocks(q, k, config=cfg)
    assert bm.causal_density(sel.counts) < 1.0
    ref = fp.reference.block_sparse_attention(q, k, v, sel)
    out = flex_attention_from_selection(q, k, v, sel, compiled=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the [B, H, N, D] layout gives the same result
    out_t = flex_attention_from_selection(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sel, layout="BHND", compiled=False)
    torch.testing.assert_close(out_t.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    # dense causal attention differs: the block lists are honoured
    dense = fp.reference.dense_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-2


@pytest.mark.slow
def test_flex_attention_backend_matches_reference_compiled():
    # the compiled kernel skips unlisted blocks and masks only the diagonal (partial) blocks
    N, Hq, Hkv, bs = 1000, 4, 2, 64
    q, k, v = structured_qkv(1, N, Hq, Hkv, 64, dtype=torch.float32, seed=2)
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=bs, gamma=0.8, min_budget=0, backend="reference"))
    ref = fp.reference.block_sparse_attention(q, k, v, sel)
    out = flex_attention_from_selection(q, k, v, sel, compiled=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _fake_rows():
    stamp = dict(gpu="fake", torch="0", triton="0", commit="abc")
    return [
        dict(mode="suite", shape="s", N=8192, input="synthetic", method="cudnn", ms=2.0, density=1.0, speedup=1.0, baseline="cudnn", **stamp),
        dict(mode="suite", shape="s", N=8192, input="synthetic", method="flexprefill", ms=1.0, density=0.25, speedup=2.0,
             baseline="cudnn", selection_share=0.1, extra_mem_frac_qkv=0.05, extra_mem_bytes=3 * 2**20, note="a|b", **stamp),
        dict(mode="suite", shape="s", N=8192, input="synthetic", method="triton_kernel", error="RuntimeError: boom", **stamp),
        dict(mode="kernel_efficiency", shape="e", D=64, N=131072, density=0.1, tflops=300.0, baseline="cudnn",
             baseline_tflops=500.0, efficiency=0.6, method="triton_kernel", **stamp),
    ]


def test_writers_and_tables(tmp_path):
    rows = _fake_rows()
    payload = dict(meta=dict(gpu="fake"), rows=rows, patterns=[dict(shape="s", N=8192, input="captured", density=0.2, qa_frac=0.5,
                   js_mean=0.3, js_median=0.2, per_layer=[dict(layer="L3", density=0.1, qa_frac=0.0, js_mean=0.4)])],
                   breakeven=[dict(shape="s", input="synthetic", gamma=0.9, break_even_N=4096, lengths=[1024, 4096])], notes=["n1"])
    paths = bm.write_results(payload, tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.csv", "results.md"]
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["rows"] == rows
    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    assert got[1]["method"] == "flexprefill" and float(got[1]["ms"]) == 1.0 and got[1]["commit"] == "abc"
    assert got[2]["error"] == "RuntimeError: boom"
    md = (tmp_path / "results.md").read_text()
    assert "| shape | N | input | method |" in md
    assert "8k" in md and "25.0%" in md and "2.00x" in md and "L3" in md and "from N=4096" in md
    assert "a/b" in md  # a pipe in a cell does not break the Markdown table
    plots = bm.write_plots(payload, tmp_path)
    assert {p.name for p in plots} == {"speedup_vs_N.png", "kernel_efficiency.png"}


def test_format_table_plain_and_summary():
    rows = _fake_rows()
    text = bm.format_table(rows[:2], ["method", "ms", "density", "speedup"], markdown=False)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "ms", "density", "speedup"]
    assert lines[2].split() == ["flexprefill", "1", "25.0%", "2.00x"]
    summ = bm.summary_rows(rows)
    assert len(summ) == 1
    assert summ[0]["fp"] == 2.0 and summ[0]["kernel"] == "ERR" and summ[0]["dense_ms"] == 2.0 and summ[0]["density"] == 0.25


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        bm.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--lengths", "--shapes", "--inputs", "--methods", "--out", "--quick", "--mode"):
        assert opt in out


def test_bad_option_values_are_refused():
    with pytest.raises(SystemExit, match="unknown method"):
        bm.main(["--methods", "cudnn,warp"])
    with pytest.raises(SystemExit, match="neither a known shape"):
        bm.main(["--shapes", "llama", "--device", "cpu"])


def test_quick_cpu_dry_run(tmp_path, capsys):
    rc = bm.main(["--quick", "--device", "cpu", "--shapes", "4/2/64", "--lengths", "256", "--inputs", "synthetic,random",
                  "--rep-ms", "1", "--out", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = payload["rows"]
    by = {(r["input"], r["method"]): r for r in rows}
    # GPU-only methods are skipped with a reason; the dense baseline on a CPU is plain SDPA
    assert "CUDA" in by[("synthetic", "triton_kernel")]["skipped"]
    for kind in ("synthetic", "random"):
        for m in ("sdpa", "flex_attention", "selection", "flexprefill"):
            r = by[(kind, m)]
            assert r["ms"] > 0 and r["speedup"] > 0 and r["gpu"] == "cpu" and r["commit"], r
        assert by[(kind, "flexprefill")]["selection_share"] > 0
        assert by[(kind, "flex_attention")]["tflops"] > 0 and 0 < by[(kind, "flex_attention")]["density"] <= 1
    assert {p["input"] for p in payload["patterns"]} == {"synthetic", "random"}
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.md").exists()
    assert "summary" in capsys.readouterr().out


def test_window_mode_cpu(tmp_path, monkeypatch, capsys):
    # the windowed kernel (interpreter) against SDPA with the materialised mask; the GPU-only
    # baselines are not tried on a CPU
    monkeypatch.setattr(bm, "WINDOW_SHAPES", (("tiny", 2, 1, 64, 100),))
    rc = bm.main(["--mode", "window", "--device", "cpu", "--window-lengths", "300", "--dtype", "fp32", "--rep-ms", "1",
                  "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {r["method"]: r for r in rows if r.get("mode") == "window"}
    assert set(by) == {"window_kernel", "sdpa_masked"}
    k = by["window_kernel"]
    assert k["ms"] > 0 and k["speedup_vs_sdpa_masked"] > 0 and k["max_abs_err"] < 1e-4 and k["window"] == 100
    assert "Sliding-window layers" in (tmp_path / "results.md").read_text()
    assert "sliding-window layers" in capsys.readouterr().out


def test_plot_hopper_kernels_picks_the_kernels_and_draws(tmp_path):
    # benchmarks/plot_hopper_kernels.py on two small result files: per head dim the later file
    # wins, the longest N is drawn, the warp-specialised series is the default config only
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_hopper_kernels.py"
    spec = importlib.util.spec_from_file_location("plot_hopper_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(D, N, d, commit, **eff):
        return dict(D=D, N=N, density=d, commit=commit, gpu="GPU", **{f"efficiency_{k}": v for k, v in eff.items()})

    old = [row(64, 131072, 0.1, "a", triton=0.8, gluon_tuned=0.9, ws_n128_s3_q2=0.7),
           row(128, 131072, 0.1, "a", triton=0.5)]
    new = [row(128, 131072, 0.05, "b", triton=0.77, gluon_tuned=0.78, ws_n128_s2_q2=0.87, ws_n128_s2_q2_pingpong=0.88),
           row(128, 131072, 0.6, "b", triton=0.9, gluon_tuned=0.87, ws_n128_s2_q2=0.95, ws_n128_s2_q2_stride=0.91),
           row(128, 32768, 0.82, "b", triton=0.84, ws_n128_s2_q2=0.94)]
    files = []
    for i, rows in enumerate((old, new)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(rows))
    by_dim = mod.panels([str(f) for f in files])
    assert sorted(by_dim) == [64, 128]
    assert [r["commit"] for r in by_dim[128]] == ["b", "b"] and [r["N"] for r in by_dim[128]] == [131072] * 2
    s = mod.series(by_dim[128])
    assert s["warp-specialised Gluon kernel"] == ([0.05, 0.6], [0.87, 0.95])
    assert s["Triton kernel"] == ([0.05, 0.6], [0.77, 0.9]) and s["tiled Gluon kernel"][1] == [0.78, 0.87]
    assert mod.series(by_dim[64])["warp-specialised Gluon kernel"] == ([0.1], [0.7])
    out = tmp_path / "eff.png"
    assert mod.main([str(out)] + [str(f) for f in files]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mod.main([str(out)]) == 2
