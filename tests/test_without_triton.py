"""Without triton installed (CPU torch wheels do not bring it) the library still imports and
its torch and reference paths work; asking for the Triton backend says how to install it."""

import subprocess
import sys

CODE = r'''
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
for m in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
    del sys.modules[m]

import torch
import flexprefill as fp
from flexprefill import FlexPrefillConfig, reference
import flexprefill.integrations.transformers  # noqa: F401

q, k, v = (torch.randn(1, 96, 2, 64) for _ in range(3))
cfg = FlexPrefillConfig(block_size=32, min_seq_len=0)
out = fp.flex_prefill_attention(q, k, v, config=cfg)
# auto on the CPU is the vectorised torch path: equal to the oracle within fp32 rounding
assert torch.allclose(out, reference.flex_prefill_attention(q, k, v, config=cfg), atol=1e-5, rtol=1e-5)
sel = fp.select_blocks(q, k, config=cfg.replace(backend="reference"))
fp.block_sparse_attention(q, k, v, sel, backend="reference")
try:
    fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend="triton"))
except ImportError as e:
    assert 'pip install "flexprefill[triton]"' in str(e), e
else:
    raise AssertionError("backend='triton' without triton did not raise")
# context parallelism on one rank (no process group): the torch path
from flexprefill.distributed import flex_prefill_attention_cp
q2, k2, v2 = (torch.randn(1, 128, 2, 64) for _ in range(3))
with torch.no_grad():
    assert torch.equal(flex_prefill_attention_cp(q2, k2, v2, config=cfg), fp.flex_prefill_attention(q2, k2, v2, config=cfg))
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
print("ok")
'''


def test_library_works_without_triton():
    # TRITON_INTERPRET=1 (set by conftest) lets backend="triton" pass the device check on the CPU
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
