"""benchmarks/gpu_pass_real_model.py: every part end to end on the CPU (``--smoke``), on a tiny
random Llama with SmolLM2's tokenizer, then the plots and the min_seq_len table from its files."""

import json

import pytest
import torch

import gpu_pass_real_model as G
import min_seq_len_table
import plot_real_model


def test_timed_layers_spread_from_first_to_last():
    assert G._timed_layers(24, 0) == list(range(24))
    assert G._timed_layers(24, 3) == [0, 12, 23]
    assert G._timed_layers(24, 2) == [0, 23]
    assert G._timed_layers(4, 9) == [0, 1, 2, 3]


def test_eval_summary_means_per_cell_and_per_method():
    recs = [dict(task="vt", length=8192, method="full", score=s, density=1.0, prefill_s=0.1) for s in (1.0, 0.0)]
    recs.append(dict(task="cwe", length=8192, method="full", score=0.5, density=None, prefill_s=0.3))
    by = {(d["task"], d["length"]): d for d in G._eval_summary(recs)}
    assert by[("vt", 8192)]["score"] == 0.5 and by[("vt", 8192)]["n"] == 2
    assert by[("all", "all")]["n"] == 3 and by[("all", "all")]["density"] == 1.0
    assert by[("cwe", 8192)]["density"] is None


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown part 'layer'"):
        G.main(["--parts", "layer", "--out", str(tmp_path)])


@pytest.fixture(scope="module")
def tiny_model(smollm2, tmp_path_factory):
    import transformers

    _, tok = smollm2
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=len(tok), max_position_embeddings=8192)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_smoke_runs_every_part_and_the_plots_read_it(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert G.main(["--smoke", "--model", str(tiny_model), "--out", str(out), "--eval-minutes", "30", "--sweep-minutes", "30"]) == 0
    payload = json.loads((out / "real_model.json").read_text())
    assert payload["errors"] == [] and payload["skipped"] == []
    assert [p for p in payload["meta"]["parts"]] == list(G.PARTS)
    layer_rows = [r for r in payload["rows"] if r.get("mode") == "real_layer"]
    for rope in ("default", "yarn4"):
        rows = [r for r in layer_rows if r["rope"] == rope]
        assert {r["layer"] for r in rows} == {0, 2}  # --max-layers 2 of 3: the first and the last
        by = {r["method"]: r for r in rows if r["layer"] == 2}
        assert by["triton_kernel"]["skipped"] and all(by[m]["ms"] > 0 for m in ("sdpa", "selection", "flexprefill"))
        assert 0 < by["flexprefill"]["density"] <= 1
    summed = {(r["rope"], r["method"]) for r in payload["rows"] if r.get("mode") == "real_model"}
    assert {("default", "sdpa"), ("default", "flexprefill"), ("yarn4", "selection")} <= summed
    assert [b["rope"] for b in payload["breakeven"]] == ["default", "yarn4"]
    assert payload["breakeven"][0]["device_kind"] == "cpu" and payload["breakeven"][0]["current_default"] == 32768
    model_rows = {(r["rope"], r["method"]): r for r in payload["rows"] if r.get("mode") == "model"}
    for rope in ("default", "yarn4"):
        for m in ("sdpa", "flexprefill", "flexprefill_default", "no_attention"):
            assert model_rows[(rope, m)]["ms"] > 0, (rope, m)
        assert model_rows[(rope, "flexprefill")]["sparse_layers"] == 3
        assert model_rows[(rope, "flexprefill_default")]["sparse_layers"] == 0  # 640 tokens < the default
    assert {"attention_share_by_removal", "attention_share_from_layers"} <= set(payload["model_summary"][0])
    methods = {d["method"] for d in payload["evals"]["summary"]}
    assert set(G.EVAL_METHODS) | {"flexprefill-g0.8-t0.1", "flexprefill-g0.9-t0.0"} <= methods
    assert (out / "evals_summary.md").read_text().count("|") > 10
    assert len((out / "evals" / "results.jsonl").read_text().splitlines()) == 2 * 5 + 2
    # the files a GPU run brings back: few enough for the device's file limit
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 7
    plots = tmp_path / "plots"
    assert plot_real_model.main([str(out), str(plots)]) == 0
    for name in ("layer_speedup.png", "layer_times.png", "prefill.png", "accuracy_vs_density.png", "sweep.png", "summary.md"):
        assert (plots / name).stat().st_size > 0, name
    entries, evidence = min_seq_len_table.table([payload])
    assert {(e["D"], e["G"]) for e in evidence} == {(64, 2)} and (64, 2) in entries


def test_smoke_settings_yield_to_given_options(tmp_path):
    parser = G.build_parser()
    args = parser.parse_args(["--smoke", "--out", str(tmp_path), "--layer-lengths", "512", "--max-layers", "1"])
    G._smoke(args, parser)
    assert (args.layer_lengths, args.max_layers) == ("512", 1)
    assert (args.lengths, args.block_size, args.max_minutes) == ("640", 64, 0)
