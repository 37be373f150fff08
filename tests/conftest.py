"""Shared test setup: run Triton kernels in the CPU interpreter when there is no GPU."""

import os

import torch

# triton reads this when a kernel module is imported, so set it before any test imports one
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_options():
    """Each test starts with the options in force at import and leaves them so."""
    import importlib

    O = importlib.import_module("flexprefill.options")

    before = O._current
    yield
    O._current = before
