from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def pytest_configure(config) -> None:
    """Under pytest-xdist (pyproject's addopts), share the cores between the workers instead of
    letting each worker's torch take them all."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def ggml_oracle():
    from tests.oracles import ggml_lib

    if ggml_lib.lib() is None:
        pytest.fail("llama.cpp oracle library missing: run tests/oracles/build_llama_cpp.sh (.ci/run does)")
    return ggml_lib
