"""benchmarks/min_seq_len_table.py: break-even entries from result rows of each format."""

import json

import min_seq_len_table as T


def _suite_rows(D, Hq, Hkv, kind, speedups, mode="suite"):
    rows = []
    for n, s in speedups.items():
        base = dict(mode=mode, shape="x", Hq=Hq, Hkv=Hkv, D=D, N=n, input=kind)
        rows += [dict(base, method="cudnn", ms=1.0), dict(base, method="flexprefill", ms=1.0 / s),
                 dict(base, method="triton_kernel", ms=0.1)]
    return rows


def test_entry_is_the_largest_break_even_over_input_kinds(tmp_path, capsys):
    rows = (_suite_rows(128, 32, 8, "synthetic", {8192: 1.3, 16384: 2.0, 32768: 2.0})
            + _suite_rows(128, 32, 8, "random", {8192: 0.9, 16384: 1.1, 32768: 1.1})
            # a loss at the longest length of one input kind: no entry for that shape
            + _suite_rows(64, 9, 3, "synthetic", {8192: 0.5, 16384: 1.2, 32768: 0.9})
            # rows of other modes and per-layer rows do not count
            + [dict(r, mode="kernel_efficiency") for r in _suite_rows(256, 4, 1, "random", {8192: 3.0})]
            + [dict(r, layer="L3") for r in _suite_rows(256, 4, 1, "captured", {8192: 3.0})])
    entries, evidence = T.table([{"rows": rows}])
    assert entries == {(128, 4): 16384, (64, 3): None}
    assert {(e["D"], e["input"]): e["break_even"] for e in evidence} == {
        (128, "random"): 16384, (128, "synthetic"): 8192, (64, "synthetic"): None}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": rows}))
    assert T.main(["--kind", "sm90", str(path)]) == 0
    out = capsys.readouterr().out
    assert "    ('sm90', 128, 4): 16384," in out and "('sm90', 64, 3): never faster" in out


def test_later_rows_replace_earlier_ones_and_flash_is_the_fallback_baseline():
    old = _suite_rows(64, 14, 2, "needle", {8192: 0.5, 16384: 0.8}, mode="real_model")
    new = [dict(r, method="flash") if r["method"] == "cudnn" else r
           for r in _suite_rows(64, 14, 2, "needle", {8192: 1.1, 16384: 1.5}, mode="real_model")]
    entries, _ = T.table([{"rows": old}, {"rows": new}])
    assert entries == {(64, 7): 8192}


def test_cpu_attention_rows():
    rows = [dict(Hq=9, Hkv=3, D=64, N=n, dtype=dt, inputs="structured", sdpa_ms=1.0, total_ms=1.0 / s)
            for n, s, dt in ((4096, 0.8, "float32"), (8192, 1.1, "float32"), (4096, 2.0, "bfloat16"))]
    rows.append(dict(Hq=9, Hkv=3, D=64, N=8192, dtype="float32", inputs="random table", sdpa_ms=1.0, attention_ms=0.1))
    assert T.table([rows])[0] == {(64, 3): 8192}


def test_no_rows_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"rows": []}))
    assert T.main(["--kind", "cpu", str(path)]) == 1
