"""``flexprefill tp-check`` under torchrun with two CPU processes (gloo): the model sharded by
transformers' own plan, FlexPrefill per rank, logits and answers against one process."""

import json
import os
import subprocess
import sys

import pytest


def _torchrun(args, tmp_path, timeout=240):
    env = dict(os.environ, FLEXPREFILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "flexprefill_tools", "tp-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_tp_check_under_torchrun_matches_one_process(arch, tmp_path):
    out = tmp_path / "out"
    r = _torchrun(["--model", f"random:{arch}", "--length", "256", "--block-size", "32", "--repeats", "1",
                   "--max-new-tokens", "4", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "tp_prefill.json").read_text())
    assert rep["environment"]["world_size"] == 2
    # each rank held half of the query heads and half of the (repeated) K/V heads
    heads = rep["heads"]
    assert heads["per_rank"] == {"query": 2, "key_value": 1}
    assert heads["q_proj_local_rows"] == 2 * heads["head_dim"] and heads["k_proj_local_rows"] == heads["head_dim"]
    assert rep["all_checks_pass"] is True
    assert rep["checks"]["gamma1_logits_match_single"]["max_abs_diff"] < 1e-4
    cases = rep["sharded"]["cases"]
    assert set(cases) == {"sdpa", "flexprefill_gamma1", "flexprefill_gamma0.9"}
    assert cases["flexprefill_gamma1"]["density"] == 1.0
    assert 0.0 < cases["flexprefill_gamma0.9"]["density"] < 1.0
    assert cases["flexprefill_gamma0.9"]["answer"] == rep["single"]["cases"]["flexprefill_gamma0.9"]["answer"]
    assert rep["answers"]["tokens_agreeing"] == rep["answers"]["tokens"] == 4  # fp32: no near-tie flips
    assert set(rep["checks"]) == {"gamma1_logits_match_single"}  # no needle in a random model
    assert (out / "tp_prefill.png").stat().st_size > 1000
    assert "gamma1_logits_match_single: pass" in r.stdout


@pytest.mark.slow
def test_tp_check_rejects_heads_that_do_not_split(tmp_path):
    # 4 query heads over 3 ranks: a clear error before any model is sharded
    env = dict(os.environ, FLEXPREFILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "flexprefill_tools", "tp-check", "--model", "random:tiny-llama", "--length", "128", "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode != 0
    assert "4 query heads do not split over tp_size=3" in r.stdout + r.stderr


def test_tp_check_help_and_bad_arguments():
    from flexprefill_tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tp-check", "--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit, match="--repeats 0"):
        main(["tp-check", "--repeats", "0"])
    with pytest.raises(SystemExit):
        main(["tp-check", "--length", "abc"])
    with pytest.raises(SystemExit, match="--depth 1.5"):
        main(["tp-check", "--depth", "1.5"])
