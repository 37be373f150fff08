"""One load of each packaged model per test session (the first run converts the GGUFs: ~1.5 min)."""

import pytest

from flexprefill_tools import models


@pytest.fixture(scope="session")
def smollm2():
    return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    return models.load("gemma3-270m")


@pytest.fixture(scope="session")
def qwen():
    return models.load("qwen2.5-coder-0.5b-instruct")
