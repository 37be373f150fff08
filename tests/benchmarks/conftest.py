"""The benchmark harness is not installed: import it from the repository's benchmarks/ folder."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="session")
def smollm2():
    from flexprefill_tools import models

    return models.load("smollm2-135m-instruct")
