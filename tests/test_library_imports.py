"""The library never imports the programs around it (flexprefill_tools) or their dependencies.

Measured against what torch (and transformers) import on their own: torch.hub imports tqdm
when it is installed, so tqdm counts only when the library is what brought it in."""

import subprocess
import sys

TOOLS = ("flexprefill_tools", "matplotlib", "tqdm", "gguf")


def _modules_after(code: str) -> set[str]:
    src = code + "\nimport sys\nprint(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return set(r.stdout.split())


def test_import_and_a_cpu_call_import_no_tools_and_no_transformers():
    baseline = _modules_after("import torch")
    mods = _modules_after(
        "import torch, flexprefill\n"
        "q, k, v = (torch.randn(1, 256, 2, 64) for _ in range(3))\n"
        "cfg = flexprefill.FlexPrefillConfig(block_size=32, min_budget=32, min_seq_len=0)\n"
        "out = flexprefill.flex_prefill_attention(q, k, v, config=cfg)\n"
        "assert out.shape == q.shape and bool(out.isfinite().all())\n"
    )
    assert "flexprefill" in mods
    leaked = [m for m in (*TOOLS, "transformers") if m in mods and m not in baseline]
    assert not leaked, f"import flexprefill and a CPU call pulled in {leaked}"


def test_transformers_integration_imports_no_tools():
    baseline = _modules_after("import torch, transformers.modeling_utils")
    mods = _modules_after("import flexprefill, flexprefill.integrations.transformers\n")
    assert "transformers" in mods
    leaked = [m for m in TOOLS if m in mods and m not in baseline]
    assert not leaked, f"flexprefill.integrations.transformers pulled in {leaked}"
