"""Inputs that stress GGML quantizers: the shapes of trouble seen in real weights."""

from __future__ import annotations

import numpy as np
import pytest


def make_cases(n_per_row: int, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, n_per_row)
    cases = {
        "normal": rng.standard_normal(shape).astype(np.float32),
        "heavy_tailed": rng.standard_t(2.0, shape).astype(np.float32),
        "scaled_weights": (rng.standard_normal(shape) * 0.02).astype(np.float32),
        "tiny": (rng.standard_normal(shape) * 1e-30).astype(np.float32),
        "huge": (rng.standard_normal(shape) * 1e4).astype(np.float32),
        "positive": np.abs(rng.standard_normal(shape)).astype(np.float32),
        "negative": -np.abs(rng.standard_normal(shape)).astype(np.float32),
    }
    mixed = rng.standard_normal(shape).astype(np.float32)
    blk = 32
    mixed[0, :blk] = 0.0                         # all-zero block
    mixed[1, :blk] = 0.5                         # constant block
    mixed[2, :blk] = -3.0                        # constant negative block
    mixed[3, :blk] = 0.0
    mixed[3, 5] = 7.0                            # single spike
    mixed[4, :blk] = rng.standard_normal(blk) * 1e-8
    mixed[5, :blk] = np.linspace(-1, 1, blk)     # exact grid points, ties in rounding
    mixed[6, :] = np.round(mixed[6, :] * 4) / 4  # many exact ties
    if n_per_row >= 256:
        mixed[7, :256] = 0.0                     # all-zero super-block
    cases["mixed_extremes"] = mixed
    zero = np.zeros(shape, np.float32)
    cases["all_zero"] = zero
    return cases


def make_imatrix(n_per_row: int, seed: int = 1, zero_columns: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = (rng.standard_normal(n_per_row) ** 2 * rng.uniform(0.1, 10.0)).astype(np.float32)
    if zero_columns:
        im[:40] = 0.0   # zero columns: a whole 32-block and part of the next
    return im


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Fail with the first differing row and byte, so a mismatch is easy to chase."""
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    if not np.array_equal(ours, ref):
        bad = np.nonzero((ours != ref).any(axis=1))[0]
        r = bad[0]
        col = np.nonzero(ours[r] != ref[r])[0][0]
        pytest.fail(f"{what}: {len(bad)} of {len(ref)} rows differ; row {r} first diff at byte {col}")


def check_against_oracle(qtype: str, x: np.ndarray, im: np.ndarray | None, oracle, what: str = "") -> None:
    """Quantize ``x`` with quantbench and with llama.cpp, and require identical bytes."""
    import torch

    from quantbench.quant import get_type, quantize

    t = get_type(qtype)
    ours = quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).data.numpy()
    assert_same_bytes(ours, oracle.quantize(t.ggml_id, x, im), what or qtype)
