"""The stamp every result file carries: device name, library versions and the git commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

__all__ = ["env_stamp", "git_commit"]


def env_stamp() -> dict:
    """GPU name, versions and git commit stamped on every row (missing pieces -> 'unknown')."""
    stamp = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    try:
        import triton

        stamp["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - a stamp never stops a run
        stamp["triton"] = "none"
    try:
        import transformers

        stamp["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        stamp["transformers"] = "none"
    stamp["commit"] = git_commit()
    return stamp


def git_commit() -> str:
    """``$FLEXPREFILL_COMMIT`` (machines without the git history), else the checkout's short
    commit with ``-dirty`` when tracked files changed, else ``"unknown"``."""
    if os.environ.get("FLEXPREFILL_COMMIT"):
        return os.environ["FLEXPREFILL_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001 - no git on the machine, or not a checkout
        return "unknown"
