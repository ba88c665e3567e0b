from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"



@pytest.fixture(scope="session")
def ggml_oracle():
    from tests.oracles import ggml_lib

    if ggml_lib.lib() is None:
        pytest.fail("llama.cpp oracle library missing: run tests/oracles/build_llama_cpp.sh (.ci/run does)")
    return ggml_lib
