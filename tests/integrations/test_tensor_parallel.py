"""Tensor parallelism: K/V head repetition is exact, head-count checks, checkpoints, and a
sharded model under torchrun with two CPU processes (gloo) against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import transformers  # the test extra brings it

from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.integrations import tensor_parallel as tp  # noqa: E402
from flexprefill.integrations import transformers as tf  # noqa: E402


@pytest.mark.parametrize(
    "hq,hkv,world,factor",
    [(32, 8, 2, 1), (4, 1, 2, 2), (4, 1, 4, 4), (8, 2, 4, 2), (12, 3, 2, 2), (6, 3, 2, 2), (8, 4, 8, 2), (4, 4, 1, 1)],
)
def test_kv_repeat_factor(hq, hkv, world, factor):
    f = tp.kv_repeat_factor(hq, hkv, world)
    assert f == factor
    assert (hkv * f) % world == 0 and hq % (hkv * f) == 0


def test_kv_repeat_factor_rejects_query_heads_that_do_not_split():
    # SmolLM2-135M: 9 query heads cannot be split over 2 ranks; the message lists what can
    with pytest.raises(ValueError, match=r"9 query heads do not split over tp_size=2.*\[1, 3, 9\]"):
        tp.kv_repeat_factor(9, 3, 2)
    with pytest.raises(ValueError, match="tp_size=0"):
        tp.kv_repeat_factor(4, 1, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        tp.kv_repeat_factor(6, 4, 2)


def test_check_tp_heads_names_the_fix():
    cfg = transformers.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size=64)
    with pytest.raises(ValueError, match=r"1 key/value heads do not split over tp_size=2.*repeat_kv_heads\(model, 2\)"):
        tp.check_tp_heads(cfg, 2)
    tp.check_tp_heads(cfg, 1)
    cfg.num_key_value_heads = 2
    tp.check_tp_heads(cfg, 2)


def _scaled(model):
    # random weights give near-uniform attention: scale q/k up so a wrong K/V head would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
            if name.endswith(("k_proj.bias", "v_proj.bias")):
                p.normal_()
    return model


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3", "qwen2"])
def test_repeat_kv_heads_is_exact(arch):
    if arch == "qwen2":  # k/v projections with biases
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=64, vocab_size=128, max_position_embeddings=1024)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        model = tp.random_model(arch, dtype=torch.float32)
    model = _scaled(model)
    hkv = model.config.num_key_value_heads
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
    sparse = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=0.9, min_budget=32)
    with torch.no_grad():
        before = model(ids).logits
        with tf.patched(model, sparse, collect_stats=True):
            before_fp = model(ids).logits
            blocks_before = [s.num_blocks.clone() for s in tf.last_stats(model).values()]
        factor = model.config.num_attention_heads // hkv
        tp.repeat_kv_heads(model, factor)
        assert model.config.num_key_value_heads == hkv * factor
        k = model.model.layers[0].self_attn.k_proj
        assert k.weight.shape[0] == k.out_features == hkv * factor * 64
        after = model(ids).logits
        with tf.patched(model, sparse, collect_stats=True):
            after_fp = model(ids).logits
            blocks_after = [s.num_blocks for s in tf.last_stats(model).values()]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # FlexPrefill reads K/V head h // group for query head h: the same selection, the same output
    torch.testing.assert_close(after_fp, before_fp, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(blocks_after, blocks_before))
    assert (before_fp - before).abs().max() > 1e-4  # the sparse run is not dense in disguise


def test_repeat_kv_heads_rejects_a_factor_that_breaks_the_groups():
    model = tp.random_model("tiny-llama", dtype=torch.float32)  # 4 query / 2 kv heads
    with pytest.raises(ValueError, match="factor=3 does not divide the 2 query heads per key/value head"):
        tp.repeat_kv_heads(model, 3)
    with pytest.raises(ValueError, match="factor=0"):
        tp.repeat_kv_heads(model, 0)
    assert tp.repeat_kv_heads(model, 1) is model and model.config.num_key_value_heads == 2


def test_random_model_and_prepare_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="arch='nope' is not known"):
        tp.random_model("nope")
    m = tp.random_model("llama3.1-8b", layers=2, device="meta")
    assert (m.config.num_hidden_layers, m.config.num_attention_heads, m.config.num_key_value_heads) == (2, 32, 8)
    assert m.config.rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="unknown architecture"):
        tp.prepare_checkpoint("random:nope", tp_size=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="layers=2 applies to random"):
        tp.prepare_checkpoint("gemma3-270m", tp_size=2, layers=2, cache_dir=tmp_path)
    # a packaged name needs the tools' loader: the library reads only random models and HF folders
    with pytest.raises(ValueError, match="loader="):
        tp.prepare_checkpoint("gemma3-270m", tp_size=2, cache_dir=tmp_path)
    folder = tp.prepare_checkpoint("random:tiny-gemma3", tp_size=2, dtype=torch.float32, cache_dir=tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert cfg.num_key_value_heads == 2  # 1 repeated to split over 2 ranks
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert tp.prepare_checkpoint("random:tiny-gemma3", tp_size=2, dtype=torch.float32, cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = tp.prepare_checkpoint("random:tiny-gemma3", tp_size=2, dtype=torch.float32, seed=1, cache_dir=tmp_path)
    assert other != folder


def test_example_script_runs_under_torchrun(tmp_path):
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / "tp_prefill.py"
    env = dict(os.environ, FLEXPREFILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "--model", "random:tiny-gemma3", "--length", "256"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "random:tiny-gemma3: 256 tokens on 2 rank(s)" in r.stdout


def test_padded_batch_and_cached_prefix_under_torchrun(tmp_path):
    """Serving-grade inputs in a sharded model: a left-padded batch and a chunk over a cached
    prefix take FlexPrefill's varlen path on each rank's heads and equal one process."""
    import pathlib

    worker = pathlib.Path(__file__).with_name("tp_padded_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
           str(tmp_path / "res.json"), str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["local_q_rows"] == 2 * 64  # 2 of the 4 query heads on each rank
    # the global layer ran the varlen operator for both inputs (the sliding layer is SDPA on CPU)
    assert res["paths_padded"]["1"] == ["flexprefill", True]
    assert res["paths_chunk"]["1"] == ["flexprefill", True]
    assert res["padded_max_diff"] < 1e-4 and res["chunk_max_diff"] < 1e-4
    assert res["padded_vs_sdpa_max_diff"] < 1e-4
