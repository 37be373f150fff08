"""benchmarks/cp_prefill.py runs end to end (CPU, gloo, two ranks, tiny sizes): every layer method,
PyTorch's context_parallel included, and the whole model against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cp_prefill.py"


@pytest.mark.slow
def test_cp_prefill_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--smoke", "--out", str(tmp_path), "--parts", "layer,model", "--lengths", "512", "--model-lengths", "512",
           "--reps", "1", "--gamma", "1.0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "cp_prefill.json").read_text())["rows"]
    layer = {row["method"]: row for row in rows if row["part"] == "layer"}
    assert set(layer) == {"flexprefill", "flexprefill_a2a", "dense", "torch_cp"}
    for row in rows:
        assert "error" not in row, row
    for row in (r for r in rows if r["part"] == "model"):
        assert row["finite"] and row["max_diff_vs_one_process"] < 1e-4
    assert layer["flexprefill"]["kv_bytes_received"] <= layer["flexprefill"]["dense_ring_bytes"]
