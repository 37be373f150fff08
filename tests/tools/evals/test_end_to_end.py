"""A tiny random-weight Llama (2 layers, head dim 64) with the test tokenizer, run through the CLI entry."""

import json

import pytest
import torch

from flexprefill_tools.evals import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _args(model_dir, out, methods, extra=()):
    return [
        "--model-path", model_dir, "--out", str(out), "--methods", methods,
        "--tasks", "niah_sweep,vt", "--lengths", "512,640", "--depths", "0,0.5,1",
        "--max-new-tokens", "6", "--no-progress", *extra,
    ]


def _check_outputs(out, methods, n_cases):
    recs = _lines(out / "results.jsonl")
    assert len(recs) == n_cases * len(methods)
    assert {r["method"] for r in recs} == set(methods)
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0 and r["prefill_s"] > 0
        assert r["length"] - 6 - 8 <= r["prompt_tokens"] <= r["length"] - 6
        assert set(r) >= {"task", "length", "depth", "method", "settings", "score", "density", "prefill_s", "prediction"}
    summary = (out / "summary.md").read_text()
    for m in methods:
        assert f"| {m} |" in summary
    pngs = sorted(p.name for p in out.glob("niah_*.png"))
    assert len(pngs) == len(methods)
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    assert (out / "accuracy_vs_density.png").exists()
    return recs


def test_full_only_run_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, out, "full")) == 0
    # 2 lengths x (3 depths + 1 vt sample)
    recs = _check_outputs(out, ["full"], 8)
    assert all(r["density"] == 1.0 for r in recs)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, out, "full")) == 0
    assert "0 (case, method) runs to do, 8 already" in capsys.readouterr().out
    assert _lines(out / "results.jsonl") == recs


def test_sparse_methods_run_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    methods = ["full", "flexprefill-g0.9", "streaming-w128-k64"]
    assert main(_args(tiny_model_dir, out, ",".join(methods))) == 0
    recs = _check_outputs(out, methods, 8)
    dens = {m: [r["density"] for r in recs if r["method"] == m] for m in methods}
    assert all(d == 1.0 for d in dens["full"])
    assert all(d is not None and 0 < d < 1 for d in dens["streaming-w128-k64"]), dens
    assert all(d is not None and 0 < d <= 1 for d in dens["flexprefill-g0.9"]), dens
    # the CLI's default block size and min_budget leave the search room to drop blocks
    assert sum(dens["flexprefill-g0.9"]) / len(dens["flexprefill-g0.9"]) < 0.95, dens
    # adding a method later only runs that method
    capsys.readouterr()
    assert main(_args(tiny_model_dir, out, ",".join(methods + ["vertical_slash_fixed-v64-s64"]))) == 0
    assert "8 (case, method) runs to do, 24 already" in capsys.readouterr().out
    assert len(_lines(out / "results.jsonl")) == 32
