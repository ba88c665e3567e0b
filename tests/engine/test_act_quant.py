"""``act_quant="ggml"``: a packed layer must compute what llama.cpp's CPU ``mul_mat`` computes.

The oracle is ggml-cpu itself: one ``ggml_mul_mat`` of a packed weight and a float32 input, run
through ``libggml-base``/``libggml-cpu`` of the llama.cpp build (x86, AVX2, llamafile sgemm on,
as ``tests/oracles/build_llama_cpp.sh`` configures it). The inputs are rich in exact rounding
ties (``x * 127/amax == k + 0.5``), where the x86 activation quantizer (round half to even) and
``quantize_row_q8_0_ref`` (half away from zero) disagree; real activations hit such ties often
enough that the reference rounding decorrelated our SmolLM2 logits from llama.cpp's.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np
import pytest
import torch

from quantbench.engine import ggml_numerics as gn
from quantbench.engine.linear import QLinear, ggml_activation_round_trip, ggml_block_mins
from quantbench.errors import ShapeError
from quantbench.quant import dequantize, quantize
from quantbench.quant.registry import get_type

# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def tie_rich_input(rows: int, n: int, seed: int) -> torch.Tensor:
    """Activations whose 32-blocks have ``amax = 127/128`` and every other value on a half level.

    With ``amax = 127 * 2^-7`` both ``127/amax`` and ``1/(amax/127)`` are exactly 128, so
    ``x * 128 = k + 0.5`` is an exact tie for every non-maximal element. A few blocks get a
    large outlier channel instead, as real residual streams have.
    """
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-126, 126, (rows, n), generator=g).float()
    x = (k + 0.5) / 128
    blocks = x.view(rows, n // 32, 32)
    pos = torch.randint(0, 32, (rows, n // 32), generator=g)
    sign = torch.where(torch.rand(rows, n // 32, generator=g) < 0.5, -1.0, 1.0)
    blocks.scatter_(2, pos.unsqueeze(2), (sign * 127 / 128).unsqueeze(2))
    x[:, 3] = 40.0 * torch.randn(rows, generator=g)  # an outlier channel
    return x


# --------------------------------------------------------------------------------------------
# the ggml-cpu oracle: one mul_mat through ctypes
# --------------------------------------------------------------------------------------------


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` of the oracle build (ggml.h), up to the fields we read."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@lru_cache(maxsize=1)
def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    from tests.oracles import llama_cpp_py

    try:
        d = llama_cpp_py.lib_dir()
    except llama_cpp_py.OracleError as e:
        pytest.fail(f"llama.cpp oracle build unavailable: {e}")
    base = ctypes.CDLL(str(d / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(d / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    base.ggml_init.restype, base.ggml_init.argtypes = vp, [_InitParams]
    base.ggml_new_tensor_2d.restype = vp
    base.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
    base.ggml_build_forward_expand.argtypes = [vp, vp]
    base.ggml_free.argtypes = [vp]
    base.ggml_new_tensor_1d.restype = vp
    base.ggml_new_tensor_1d.argtypes = [vp, ctypes.c_int, ctypes.c_int64]
    base.ggml_new_tensor_3d.restype = vp
    base.ggml_new_tensor_3d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    base.ggml_rms_norm.restype, base.ggml_rms_norm.argtypes = vp, [vp, vp, ctypes.c_float]
    base.ggml_mul.restype, base.ggml_mul.argtypes = vp, [vp, vp, vp]
    base.ggml_swiglu_split.restype, base.ggml_swiglu_split.argtypes = vp, [vp, vp, vp]
    base.ggml_soft_max_ext.restype = vp
    base.ggml_soft_max_ext.argtypes = [vp, vp, vp, ctypes.c_float, ctypes.c_float]
    base.ggml_rope_ext.restype = vp
    base.ggml_rope_ext.argtypes = [vp, vp, vp, vp, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 6
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


def ggml_mul_mat(weight_bytes: np.ndarray, ggml_id: int, n_out: int, n_in: int, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` as ggml-cpu computes it (2 threads, like the logits oracle): float32 [T, n_out]."""
    base, cpu = _ggml()
    x = np.ascontiguousarray(x, np.float32)
    w_bytes = np.ascontiguousarray(weight_bytes)
    ctx = base.ggml_init(_InitParams(w_bytes.nbytes + 4 * x.nbytes + 4 * n_out * len(x) + (16 << 20), None, False))
    assert ctx, "ggml_init failed"
    try:
        w = base.ggml_new_tensor_2d(ctx, ggml_id, n_in, n_out)
        b = base.ggml_new_tensor_2d(ctx, 0, n_in, len(x))
        ctypes.memmove(_Tensor.from_address(w).data, w_bytes.ctypes.data, w_bytes.nbytes)
        ctypes.memmove(_Tensor.from_address(b).data, x.ctypes.data, x.nbytes)
        y = base.ggml_mul_mat(ctx, w, b)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        buf = (ctypes.c_float * (n_out * len(x))).from_address(_Tensor.from_address(y).data)
        return np.ctypeslib.as_array(buf).reshape(len(x), n_out).copy()
    finally:
        base.ggml_free(ctx)


def ggml_float_op(build, inputs: list[np.ndarray]) -> np.ndarray:
    """Run ``build(base, ctx, tensors) -> result`` on ggml-cpu (2 threads) with ``inputs`` as
    tensors (float32, or int32 for integer arrays; shapes in numpy order, at most 3-D)."""
    base, cpu = _ggml()
    size = sum(a.nbytes for a in inputs)
    ctx = base.ggml_init(_InitParams(8 * size + (16 << 20), None, False))
    assert ctx, "ggml_init failed"
    try:
        tensors = []
        for a in inputs:
            a = np.ascontiguousarray(a)
            gtype = 26 if a.dtype == np.int32 else 0  # GGML_TYPE_I32 / F32
            a = a if gtype == 26 else a.astype(np.float32)
            ne = list(reversed(a.shape))
            if len(ne) == 1:
                t = base.ggml_new_tensor_1d(ctx, gtype, *ne)
            elif len(ne) == 2:
                t = base.ggml_new_tensor_2d(ctx, gtype, *ne)
            else:
                t = base.ggml_new_tensor_3d(ctx, gtype, *ne)
            ctypes.memmove(_Tensor.from_address(t).data, a.ctypes.data, a.nbytes)
            tensors.append(t)
        y = build(base, ctx, tensors)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        yt = _Tensor.from_address(y)
        shape = tuple(reversed([n for n in yt.ne]))[4 - inputs[0].ndim:]  # ggml pads to 4 dims
        n = int(np.prod(shape))
        return np.ctypeslib.as_array((ctypes.c_float * n).from_address(yt.data)).reshape(shape).copy()
    finally:
        base.ggml_free(ctx)


# --------------------------------------------------------------------------------------------
# against ggml-cpu
# --------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("wtype", gn.EXACT_MATMUL_TYPES)
@pytest.mark.parametrize("tokens", [1, 6, 8, 40])  # vec_dot / tinyBLAS / K-quant tiled kernel (8+ rows)
def test_exact_types_match_ggml_cpu_bit_for_bit(wtype, tokens):
    n_in, n_out = 512, 96
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1)) * 0.05
    q = quantize(w, wtype)
    x = tie_rich_input(tokens, n_in, seed=tokens)
    x[0] += torch.randn(n_in, generator=torch.Generator().manual_seed(2))  # a row without ties
    ref = torch.from_numpy(ggml_mul_mat(q.tensors["data"].numpy(), get_type(wtype).ggml_id, n_out, n_in, x.numpy()))
    layer = QLinear(n_in, n_out, False, "probe")
    layer.set_weight(q)
    layer.act_quant = "ggml"
    with torch.inference_mode():
        assert torch.equal(layer(x), ref)


def _activations(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    x[:, 7] *= 40  # an outlier channel, as residual streams have
    return x


@pytest.mark.oracle
def test_rms_norm_matches_ggml_bit_for_bit():
    x = _activations(64, 576, 11)
    w = torch.rand(576, generator=torch.Generator().manual_seed(12)) + 0.5
    eps = 1e-5
    ref = ggml_float_op(lambda b, c, t: b.ggml_mul(c, b.ggml_rms_norm(c, t[0], eps), t[1]), [x.numpy(), w.numpy()])
    assert torch.equal(gn.rms_norm(x, w, eps), torch.from_numpy(ref))


@pytest.mark.oracle
def test_swiglu_matches_ggml_bit_for_bit():
    g = _activations(16, 1541, 13) * 4  # 1541: a scalar tail after the 8-wide vectors
    g[0, :16] = torch.tensor([-120.0, -100.0, -90.0, -88.0, -50.0, 0.0, -0.0, 1e-30,
                              50.0, 88.0, 89.0, 100.0, 120.0, -1e-30, 3.0, -3.0])  # expf's edge branches
    u = _activations(16, 1541, 14)
    ref = ggml_float_op(lambda b, c, t: b.ggml_swiglu_split(c, t[0], t[1]), [g.numpy(), u.numpy()])
    ours = gn.swiglu(g, u)
    main = 1541 - 1541 % 8
    assert torch.equal(ours[:, :main], torch.from_numpy(ref)[:, :main])  # ggml_v_expf path: exact
    assert torch.allclose(ours, torch.from_numpy(ref), rtol=1e-6, atol=0)


@pytest.mark.oracle
def test_soft_max_matches_ggml_bit_for_bit():
    heads, T, S = 3, 24, 64
    w = _activations(heads * T, S, 15).reshape(heads, T, S)
    allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    mask = torch.zeros(T, S).masked_fill(~allowed, float("-inf"))
    scale = 0.125
    ref = ggml_float_op(lambda b, c, t: b.ggml_soft_max_ext(c, t[0], t[1], scale, 0.0), [w.numpy(), mask.numpy()])
    assert torch.equal(gn.soft_max(w, allowed, scale), torch.from_numpy(ref))


@pytest.mark.oracle
def test_rope_matches_ggml_bit_for_bit():
    T, H, D, base_freq = 300, 3, 64, 100000.0
    x = _activations(T * H, D, 16).reshape(T, H, D)
    pos = np.arange(T, dtype=np.int32)
    # NEOX mode (2) rotates (i, i + D/2) pairs: our rotate-half layout as is
    ref = ggml_float_op(lambda b, c, t: b.ggml_rope_ext(c, t[0], t[1], None, D, 2, 0, base_freq, 1.0, 0.0, 1.0, 0.0, 0.0),
                        [x.numpy(), pos])
    cos, sin = gn.RopeTable(base_freq, D).cos_sin(0, T, x.device)
    ours = gn.rope_neox_halves(x.transpose(0, 1), cos, sin).transpose(0, 1)
    assert torch.equal(ours, torch.from_numpy(ref))

WEIGHT_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ4_NL", "IQ4_XS", "MXFP4", "F16", "BF16"]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.oracle
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
@pytest.mark.parametrize("tokens", [1, 6])  # 1: ggml's vec_dot loop; 6: llamafile sgemm where it applies
def test_packed_layer_matches_ggml_cpu_mul_mat(wtype, tokens):
    n_in, n_out = 512, 96
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1)) * 0.05
    q = quantize(w, wtype)
    x = tie_rich_input(tokens, n_in, seed=tokens)
    ref = torch.from_numpy(ggml_mul_mat(q.tensors["data"].numpy(), get_type(wtype).ggml_id, n_out, n_in, x.numpy()))

    layer = QLinear(n_in, n_out, False, "probe")
    layer.set_weight(q)
    with torch.inference_mode():
        layer.act_quant = "ggml"
        ours = layer(x)
        layer.act_quant = "none"
        float_input = layer(x)
    # only float summation order remains: a few float32 ulps of the largest partial sums
    assert _rel(ours, ref) < 2e-6, (wtype, _rel(ours, ref))
    # and the probe discriminates: float activations are far off ggml's numbers
    assert _rel(float_input, ref) > 50 * _rel(ours, ref)


# --------------------------------------------------------------------------------------------
# the rounding rules themselves (no oracle)
# --------------------------------------------------------------------------------------------


def test_q8_0_ties_round_half_to_even():
    x = torch.full((1, 32), 0.0)
    x[0, 0] = 127 / 128  # amax: scale 1/128 both ways
    x[0, 1:6] = torch.tensor([0.5, 1.5, 2.5, -2.5, -3.5]) / 128
    d = torch.tensor(127 / 128 / 127).half().float()  # the stored fp16 scale
    got = ggml_activation_round_trip(x, "Q8_0")[0, :6]
    want = torch.tensor([127.0, 0.0, 2.0, 2.0, -2.0, -4.0]) * d
    assert torch.equal(got, want)


def test_q8_0_scale_is_127_over_amax():
    """Find blocks where ``x*(127/amax)`` and ``x*(1/(amax/127))`` round apart; ours takes the first."""
    g = torch.Generator().manual_seed(3)
    amax = torch.rand(4096, 1, generator=g) + 0.1
    id_simd = torch.full_like(amax, 127.0) / amax
    id_ref = 1.0 / (amax / torch.full_like(amax, 127.0))
    differ = (id_simd != id_ref).squeeze(1)
    assert differ.any()
    amax, id_simd, id_ref = amax[differ], id_simd[differ], id_ref[differ]
    # an element just at the half-level boundary of the SIMD scale
    k = torch.randint(0, 120, amax.shape, generator=g).float() + 0.5
    xv = (k / id_simd)
    split = (torch.round(xv * id_simd) != torch.round(xv * id_ref)).squeeze(1)
    assert split.any()
    xb = torch.zeros(int(split.sum()), 32)
    xb[:, 0] = amax[split, 0]
    xb[:, 1] = xv[split, 0]
    got = ggml_activation_round_trip(xb, "Q8_0")[:, 1]
    d16 = (amax[split, 0] / 127).half().float()
    assert torch.equal(got, torch.round(xv[split, 0] * id_simd[split, 0]) * d16)


def test_q8_k_is_the_reference_quantizer():
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(5))
    x[1, 256:512] = 0.0  # an empty block
    x[2, :256] *= 1e-40  # subnormal maximum
    for wtype in ("Q4_K", "Q6_K", "IQ4_XS"):  # weight types whose vec_dot_type is Q8_K
        assert torch.equal(ggml_activation_round_trip(x, wtype), dequantize(quantize(x, "Q8_K")))


def test_q8_1_block_sums_enter_q4_1_dot_products():
    """``min_w * s_x`` uses the stored fp16 ``s = fp16(d * sum q)`` (not ``fp16(d) * sum q``)."""
    n_in, n_out = 256, 8
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(7))
    q = quantize(w, "Q4_1")
    x = torch.randn(2, n_in, generator=torch.Generator().manual_seed(8)) * 3
    layer = QLinear(n_in, n_out, False, "probe")
    layer.set_weight(q)
    layer.act_quant = "ggml"
    with torch.inference_mode():
        ours = layer(x).double()
    # the dot product written out per block, in float64
    xb = x.reshape(2, -1, 32)  # the quantizer's float32 arithmetic, then exact float64 sums
    amax = xb.abs().amax(-1, keepdim=True)
    lv = torch.round(xb * (torch.full_like(amax, 127.0) / amax)).double()
    d32 = (amax / torch.full_like(amax, 127.0)).double()
    d16 = d32.half().double()
    s = (d32.squeeze(-1) * lv.sum(-1)).half().double()  # [2, blocks]
    blocks = q.tensors["data"].reshape(n_out, -1, 20)
    dw = blocks[:, :, 0:2].contiguous().view(torch.float16).double().squeeze(-1)
    mw = ggml_block_mins(q).double()
    nib = blocks[:, :, 4:].long()
    qw = torch.cat([nib & 15, nib >> 4], dim=-1).double()  # [out, blocks, 32]
    want = torch.einsum("ob,tb,obk,tbk->to", dw, d16.squeeze(-1), qw, lv) + torch.einsum("ob,tb->to", mw, s)
    assert float((ours - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_input_width_not_a_block_multiple_is_a_shape_error():
    with pytest.raises(ShapeError, match="Q4_K"):
        ggml_activation_round_trip(torch.randn(2, 300), "Q4_K")
