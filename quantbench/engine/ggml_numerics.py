"""Bit-exact emulations of the ggml-cpu ops (x86, AVX2 + FMA build) a llama.cpp forward runs.

Why bits: with llama.cpp's 8-bit activation quantization every layer input is rounded to one of
255 levels per block, and a one-ulp difference upstream flips a level now and then; layer 0's
attention amplifies such flips enough that float-accurate but not bit-exact emulation leaves a
KL of several 1e-3 against llama.cpp. So each op here reproduces the order and the rounding of
ggml's kernels: per-lane SIMD accumulators with FMA (one rounding: emulated by an exact float64
product-plus-sum, then one cast to float32), ggml's horizontal sums, and its ``expf``/``silu``
polynomials.

The quantized dot products all share one shape on AVX2: the integer products of a block are
summed into 8 int32 lanes, lane ``l`` holding the elements ``k`` with ``(k % 32) // 4 == l``
(``maddubs`` + ``madd``), each lane is converted to float and FMA-accumulated with the block's
scale, and the 8 lanes are reduced by ``hsum_float_8``. What differs per weight type is the block
(32 for Q8_0/Q5_0/Q4_0, 256 for K-quants), which scale multiplies the lane, and the mins/offset
terms of Q4_K and Q6_K (see :func:`ggml_quant_matmul`). From 8 input rows on, K-quant weights
take ggml's tiled kernel instead, which sums each 256-block's integer dot exactly and
FMA-accumulates one float per block (:func:`_tiled_chunk`).

Transcendentals: ``expf`` is ggml's own polynomial (:func:`v_expf`); rope's ``cosf``/``sinf``/
``powf`` are the C library's, called through ctypes once per angle and cached
(:class:`RopeTable`), since no torch function reproduces their last bit.
Cost: the per-lane FMA chains are elementwise float64 work proportional to
``tokens x weights / 4`` for 32-block types, several times a float matmul.
"""

from __future__ import annotations

import torch

from quantbench.errors import ShapeError
from quantbench.quant import QTensor
from quantbench.quant.ggml.common import cdiv, first_absmax, fp16_from_bytes, fp16_round, u32_le_to_bits

# Weight types whose ggml-cpu dot product this module reproduces bit for bit.
EXACT_MATMUL_TYPES = ("Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q6_K")

TILED_MIN_ROWS = 8  # ggml_tiled_min_batch: K-quant mul_mat switches to the tiled kernel
_LANE_ELEMS = 4  # int32 lane = 4 consecutive int8 products (maddubs pairs, madd pairs)
_ELEMS_PER_TEMP = 1 << 21  # bound on [lanes, tokens, out] temporaries (elements)


def hsum_float_8(v: torch.Tensor) -> torch.Tensor:
    """``hsum_float_8`` over the leading dimension of 8 lanes: (hi + lo), then pairs 0+2, 1+3,
    then the two (float32 at each step)."""
    s = v[4:8] + v[0:4]
    s = s[0:2] + s[2:4]
    return s[0] + s[1]


def hsum_float_4(v: torch.Tensor) -> torch.Tensor:
    """The SSE reduction of 4 lanes (``movehl`` add, then ``movehdup`` add)."""
    s = v[0:2] + v[2:4]
    return s[0] + s[1]


# --------------------------------------------------------------------------------------------
# activations: the x86 quantizers, returning integer levels and scales
# --------------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, size: int, weight_type: str) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ShapeError(f"a {weight_type} layer's input has {x.shape[-1]} features, not a multiple of "
                         f"{size} (the block of the activation type llama.cpp pairs it with)")
    return x.reshape(-1, x.shape[-1] // size, size).float()


def q8_0_levels(x: torch.Tensor, weight_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """AVX2 ``quantize_row_q8_0``: levels [T, nb, 32] (float, integer-valued) and the stored
    fp16 scale as float32 [T, nb]. ``x * (127/amax)`` rounded half to even."""
    xb = _blocks(x, 32, weight_type)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax != 0, cdiv(127.0, amax), torch.zeros_like(amax))
    return (xb * inv).round_(), fp16_round(cdiv(amax, 127.0)).squeeze(-1)


def q8_k_levels(x: torch.Tensor, weight_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_row_q8_K`` (the reference one on x86): levels [T, nb, 256], float32 d [T, nb]."""
    xb = _blocks(x, 256, weight_type)
    mx = first_absmax(xb, -1).unsqueeze(-1)
    iscale = cdiv(-127.0, mx)
    q = (iscale * xb).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).round_().clamp_(max=127.0)
    empty = mx == 0
    q = torch.where(empty, torch.zeros_like(q), q)
    d = torch.where(empty, torch.zeros_like(mx), cdiv(1.0, iscale))
    return q, d.squeeze(-1)


# --------------------------------------------------------------------------------------------
# weights: integer lane operands and block scales
# --------------------------------------------------------------------------------------------


class GGMLWeightParts:
    """A packed weight split into what the AVX2 dot products multiply.

    ``lanes`` [nb, 8, n, O]: per block and SIMD lane, the integer factor of each weight element
    in the lane sums (Q8_0/Q5_0/Q4_0: the signed level; Q4_K: sub-block scale x 4-bit level;
    Q6_K: group scale x unsigned 6-bit level). ``d`` [O, nb]: the fp16 block scale as float32.
    Q4_K adds ``mins`` [O, K/32] and ``dmin`` [O, nb]; Q6_K adds ``group_scales`` [O, K/16].
    K-quants also keep ``blocks`` [nb, 256, O] (float64): the whole-super-block integer factor
    of ggml's tiled kernel (Q4_K: scale x level; Q6_K: scale x (level - 32)).
    """

    def __init__(self, w: QTensor) -> None:
        self.qtype = w.qtype
        rows = w.shape[0]
        data = w.tensors["data"]
        self.mins = self.dmin = self.group_scales = None
        if w.qtype == "Q8_0":
            b = data.reshape(-1, 34)
            self.d = fp16_from_bytes(b[:, 0:2])
            self.ints = b[:, 2:34].contiguous().view(torch.int8).float()
        elif w.qtype in ("Q4_0", "Q5_0"):
            b = data.reshape(-1, 18 if w.qtype == "Q4_0" else 22)
            self.d = fp16_from_bytes(b[:, 0:2])
            nib = b[:, -16:].to(torch.int32)
            q = torch.cat([nib & 0xF, nib >> 4], dim=1)
            if w.qtype == "Q5_0":
                q = q | (u32_le_to_bits(b[:, 2:6]) << 4)
                self.ints = (q - 16).float()
            else:
                self.ints = (q - 8).float()
        elif w.qtype == "Q4_K":
            from quantbench.quant.ggml.q4_k import unpack_scale_min_k4

            b = data.reshape(-1, 144)
            self.d = fp16_from_bytes(b[:, 0:2])
            self.dmin = fp16_from_bytes(b[:, 2:4]).reshape(rows, -1)
            sc, m = unpack_scale_min_k4(b[:, 4:16])  # [B, 8]
            qs = b[:, 16:144].to(torch.int32).reshape(-1, 4, 1, 32)
            q = (qs >> torch.tensor([0, 4], dtype=torch.int32, device=b.device).view(1, 1, 2, 1)) & 0xF
            self.ints = (q.reshape(-1, 8, 32) * sc.unsqueeze(-1)).float()
            self.mins = m.float().reshape(rows, -1)
        elif w.qtype == "Q6_K":
            b = data.reshape(-1, 210)
            ql = b[:, :128].to(torch.int32).reshape(-1, 2, 2, 32)
            qh = b[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
            sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int32)  # [B, 16]
            self.d = fp16_from_bytes(b[:, 208:210])
            lo = torch.cat([ql & 0xF, ql >> 4], dim=2)
            hi = (qh >> torch.arange(0, 8, 2, device=b.device, dtype=torch.int32).view(1, 1, 4, 1)) & 3
            q = (lo | (hi << 4)).reshape(-1, 16, 16)  # unsigned levels 0..63
            self.ints = (q * sc.unsqueeze(-1)).float()
            self.signed = ((q - 32) * sc.unsqueeze(-1)).double()
            self.group_scales = sc.float().reshape(rows, -1)
        else:
            raise ShapeError(f"no exact ggml dot product for weight type {w.qtype}")
        ints = self.ints.reshape(rows, -1)
        self.shape = tuple(ints.shape)
        self.d = self.d.reshape(rows, -1)
        # [nb, 8, lane elements, O]: the right operand of each block's lane-sum bmm
        self.lanes = _lane_operands(ints, self.d.shape[1]).transpose(2, 3).contiguous()
        self.blocks = None
        if w.qtype in ("Q4_K", "Q6_K"):
            whole = self.signed.reshape(rows, -1) if w.qtype == "Q6_K" else ints.double()
            self.blocks = whole.reshape(rows, -1, 256).permute(1, 2, 0).contiguous()
            self.signed = None
        del self.ints


# --------------------------------------------------------------------------------------------
# the dot products
# --------------------------------------------------------------------------------------------


def _fma_into(acc: torch.Tensor, a: torch.Tensor, b64: torch.Tensor) -> None:
    """``acc = fmaf(a, b, acc)`` in place: float32 ``acc``/``a``, ``b`` passed as float64 so the
    kernel computes in float64 (where ``a*b`` of two float32 values is exact) and rounds once
    into float32 on the store."""
    torch.addcmul(acc, a, b64, out=acc)


def _lane_operands(t: torch.Tensor, nb: int) -> torch.Tensor:
    """[R, K] → [nb, 8, R, K/nb/8]: per block and lane, the elements ``(k % 32) // 4 == lane``."""
    R, K = t.shape
    g = K // nb // 32
    return t.reshape(R, nb, g, 8, _LANE_ELEMS).permute(1, 3, 0, 2, 4).reshape(nb, 8, R, g * _LANE_ELEMS)


def _chain(xl: torch.Tensor, wl: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor, bmm_dtype: torch.dtype,
           sub: torch.Tensor | None = None) -> torch.Tensor:
    """Lane accumulators [8, T, O] after ``acc = fma(d_b, S_b, acc)`` over blocks ``b``, where
    ``S_b`` [8, T, O] are the block's integer lane sums ``xl[b] @ wl[b]`` (exact: float32 sums of
    integers below 2^24, float64 where a lane could exceed that) minus ``sub[b]`` if given, and
    ``d_b`` [T, O] is the float32 product of the activation scale ``dx[:, b]`` and the weight
    scale ``dw[:, b]``."""
    nb, _, T, G = xl.shape
    O = wl.shape[-1]
    # every block's lane sums in one batched product, then the sequential FMA chain over blocks
    if bmm_dtype == torch.float32:
        S = torch.bmm(xl.reshape(nb * 8, T, G), wl.reshape(nb * 8, G, O)).reshape(nb, 8, T, O)
    else:
        S64 = torch.bmm(xl.reshape(nb * 8, T, G).double(), wl.reshape(nb * 8, G, O).double()).reshape(nb, 8, T, O)
        if sub is not None:
            S64 -= sub
        S = S64.float()  # _mm256_cvtepi32_ps: round to nearest float32
        del S64
    d64 = (dx.t().unsqueeze(-1) * dw.t().unsqueeze(1)).double()  # [nb, T, O]: float32 products
    acc = torch.zeros(8, T, O, dtype=torch.float32, device=xl.device)
    for b in range(nb):
        _fma_into(acc, S[b], d64[b])
    return acc


def _tiled_chunk(xq: torch.Tensor, dx: torch.Tensor, p: "GGMLWeightParts") -> torch.Tensor:
    """ggml-cpu's tiled K-quant matmul (``tiled/tiled-kernel.cpp``, AVX2), which ``mul_mat``
    takes for Q4_K/Q6_K weights from 8 input rows on: per super-block the exact integer dot
    ``s1`` (Q6_K with its -32 offset folded in), ``res = d_w * (float)s1``, for Q4_K
    ``res = fma(-dmin_w, (float)s2, res)`` with ``s2`` the mins times the 32-sub-block sums,
    then ``acc = fma(res, d_x, acc)`` over super-blocks."""
    T = xq.shape[0]
    nb = p.d.shape[1]
    O = p.blocks.shape[-1]
    xb = xq.reshape(T, nb, 256).transpose(0, 1).double()  # [nb, T, 256]
    s1 = torch.bmm(xb, p.blocks).float()  # exact integers in float64; cvtepi32_ps rounding
    res = s1 * p.d.t().unsqueeze(1)  # [nb, T, O] float32 product
    if p.qtype == "Q4_K":
        q8s = xq.reshape(T, nb, 8, 32).sum(-1).transpose(0, 1)  # [nb, T, 8]
        s2 = torch.bmm(q8s, p.mins.reshape(O, nb, 8).permute(1, 2, 0))  # exact: small integers
        res = (res.double() - p.dmin.t().unsqueeze(1).double() * s2.double()).float()
    acc = torch.zeros(T, O, dtype=torch.float32, device=xq.device)
    dx64 = dx.double()
    for b in range(nb):
        _fma_into(acc, res[b], dx64[:, b:b + 1])
    return acc


def _matmul_chunk(xq: torch.Tensor, dx: torch.Tensor, p: "GGMLWeightParts", tiled: bool) -> torch.Tensor:
    if tiled:
        return _tiled_chunk(xq, dx, p)
    T = xq.shape[0]
    nb = p.d.shape[1]
    xl = _lane_operands(xq, nb)
    if p.qtype in ("Q8_0", "Q5_0", "Q4_0", "Q4_K"):
        y = hsum_float_8(_chain(xl, p.lanes, dx, p.d, torch.float32))
        if p.qtype == "Q4_K":
            # acc_m lane m (4 lanes): min[2m]*q8s[2m] + min[2m+1]*q8s[2m+1] with q8s the sums of
            # 32-sub-blocks, FMA-accumulated with dmin = -(y.d * x.dmin); hsum of 4 lanes added
            O = p.mins.shape[0]
            q8s = xq.reshape(T, nb, 4, 2, 32).sum(-1).permute(1, 2, 0, 3)  # [nb, 4, T, 2] exact
            mins = p.mins.reshape(O, nb, 4, 2).permute(1, 2, 3, 0)  # [nb, 4, 2, O]
            dm = (-(dx.t().unsqueeze(-1) * p.dmin.t().unsqueeze(1))).double().contiguous()
            acc_m = torch.zeros(4, T, O, dtype=torch.float32, device=xq.device)
            for b in range(nb):
                _fma_into(acc_m, torch.bmm(q8s[b], mins[b]), dm[b].unsqueeze(0))
            y = y + hsum_float_4(acc_m)
        return y
    if p.qtype == "Q6_K":
        # lane l subtracts 32 * (scale-weighted q8 sum of 32-sub-block l): q8sclsub
        O = p.group_scales.shape[0]
        gsum = xq.reshape(T, nb, 8, 2, 16).sum(-1).permute(1, 2, 0, 3).double()  # [nb, 8, T, 2]
        gsc = p.group_scales.reshape(O, nb, 8, 2).permute(1, 2, 3, 0).double()  # [nb, 8, 2, O]
        sub = 32 * torch.matmul(gsum, gsc)  # [nb, 8, T, O]
        return hsum_float_8(_chain(xl, p.lanes, dx, p.d, torch.float64, sub))
    raise ShapeError(f"no exact ggml dot product for weight type {p.qtype}")


def ggml_quant_matmul(x: torch.Tensor, parts: "GGMLWeightParts") -> torch.Tensor:
    """``x @ W.T`` as ggml-cpu's AVX2 ``mul_mat`` computes it for a packed weight: ``x``
    quantized to Q8_0 (32-blocks) or Q8_K (K-quants), then the per-type SIMD dot product
    (``ggml_vec_dot_*`` for one token, llamafile's ``tinyBLAS_Q0_AVX`` for more: both accumulate
    the same lanes in the same order). Returns float32 [..., O]."""
    lead = x.shape[:-1]
    if parts.qtype in ("Q4_K", "Q6_K"):
        xq, dx = q8_k_levels(x, parts.qtype)
    else:
        xq, dx = q8_0_levels(x, parts.qtype)
    T = xq.shape[0]
    xq = xq.reshape(T, -1)
    O, K = parts.shape
    if xq.shape[1] != K:
        raise ShapeError(f"input has {xq.shape[1]} features, the {parts.qtype} weight {K}")
    # ggml-cpu takes its tiled kernel for K-quant weights from 8 input rows on
    tiled = parts.blocks is not None and T >= TILED_MIN_ROWS
    nb = parts.d.shape[1]
    step = max(1, _ELEMS_PER_TEMP // (8 * O * (1 if tiled else nb)))  # the lane sums of every block
    outs = [_matmul_chunk(xq[i:i + step], dx[i:i + step], parts, tiled) for i in range(0, T, step)]
    return torch.cat(outs, 0).reshape(*lead, O)


# --------------------------------------------------------------------------------------------
# float ops: RMSNorm, rope, softmax attention, SwiGLU
# --------------------------------------------------------------------------------------------


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf`` (torch's CPU float32 ``sqrt`` is off by an ulp at
    times; the float64 root rounded to float32 is the correctly rounded float32 root)."""
    return torch.sqrt(x.double()).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``ggml_rms_norm`` then ``ggml_mul`` by ``weight``: the squares are float32 products summed
    in double, ``mean = (float)(sum/n)``, ``scale = 1.0f/sqrtf(mean + eps)``, ``(x*scale)*w``."""
    h = x.float()
    s = (h * h).double().sum(-1, keepdim=True)
    mean = (s / h.shape[-1]).float()
    scale = cdiv(1.0, sqrt32(mean + torch.tensor(eps, dtype=torch.float32, device=h.device)))
    return (h * scale) * weight.float()


def fma_f32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """Elementwise float32 ``fmaf`` of tensors or float32 constants: the float64 product of two
    float32 values is exact and the float64 sum rounds once more before the cast (a double
    rounding that differs from one rounding only when that sum lands exactly halfway between
    two float32 neighbours)."""
    a64 = a.double()
    b64 = b.double() if isinstance(b, torch.Tensor) else float(torch.tensor(b, dtype=torch.float32))
    c64 = c.double() if isinstance(c, torch.Tensor) else float(torch.tensor(c, dtype=torch.float32))
    return (a64 * b64 + c64).float()


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64)


def _from_bits(i: torch.Tensor) -> torch.Tensor:
    i = i & 0xFFFFFFFF
    i = torch.where(i >= 1 << 31, i - (1 << 32), i)
    return i.to(torch.int32).view(torch.float32)


_H = float.fromhex


def v_expf(x: torch.Tensor) -> torch.Tensor:
    """ggml's AVX2 ``ggml_v_expf`` (arm optimized-routines' expf, 1.5 ulp) on float32 ``x``,
    including its overflow/underflow branches."""
    x = x.float()
    r = _H("0x1.8p23")
    z = fma_f32(x, _H("0x1.715476p+0"), r)
    n = z - r
    b = fma_f32(-n, _H("0x1.7f7d1cp-20"), fma_f32(-n, _H("0x1.62e4p-1"), x))
    e = _bits(z) << 23
    k = _from_bits(e + 0x3F800000)
    c = n.abs() > 126
    u = b * b
    j = fma_f32(fma_f32(fma_f32(b, _H("0x1.0e4020p-7"), _H("0x1.573e2ep-5")), u,
                        fma_f32(b, _H("0x1.555e66p-3"), _H("0x1.fffdb6p-2"))),
                u, b * _H("0x1.ffffecp-1"))
    normal = fma_f32(k, j, k)
    if not bool(c.any()):
        return normal
    g = torch.where(n <= 0, torch.full_like(e, 0x82000000), torch.zeros_like(e))
    s1 = _from_bits(g + 0x7F000000)
    s2 = _from_bits(e - g)
    big = fma_f32(s2, j, s2) * s1
    d = n.abs() > 192
    return torch.where(d, s1 * s1, torch.where(c, big, normal))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``ggml_vec_swiglu_f32``: ``gate / (1 + v_expf(0 - gate)) * up`` per 8-wide vector. Rows
    whose length is not a multiple of 8 end with ggml's scalar ``expf`` (libm), emulated here by
    a float64 ``exp`` rounded to float32."""
    g = gate.float()
    n = g.shape[-1]
    main = n - n % 8
    e = torch.empty_like(g)
    e[..., :main] = v_expf(-g[..., :main])
    if main < n:
        e[..., main:] = torch.exp(-g[..., main:].double()).float()
    return (g / (1.0 + e)) * up.float()


class _Libm:
    """The C library's ``cosf``/``sinf``/``powf``: ggml's rope calls them per angle, and their
    results are not always the correctly rounded ones, so the exact rope table asks them too
    (once per angle: the table is built incrementally and cached)."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        self.lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for name in ("cosf", "sinf"):
            f = getattr(self.lib, name)
            f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        self.lib.powf.restype, self.lib.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]


_LIBM: _Libm | None = None


def _libm() -> _Libm:
    global _LIBM
    if _LIBM is None:
        _LIBM = _Libm()
    return _LIBM


class RopeTable:
    """ggml's rope cache (``ggml_rope_cache_init``, no YaRN): for position ``p`` the angle of
    pair ``i`` is ``theta_i = fl(theta_{i-1} * theta_scale)`` from ``theta_0 = p`` with
    ``theta_scale = powf(base, -2.0f/n_dims)``, divided by the frequency factor, times
    ``freq_scale``; cos/sin are libm's ``cosf``/``sinf`` times ``attn_factor``."""

    def __init__(self, base: float, n_dims: int, freq_scale: float = 1.0,
                 freq_factors: torch.Tensor | None = None, attn_factor: float = 1.0) -> None:
        L = _libm().lib
        self.n_dims = n_dims
        self.theta_scale = float(L.powf(float(torch.tensor(base, dtype=torch.float32)),
                                        float(torch.tensor(-2.0, dtype=torch.float32) / n_dims)))
        self.freq_scale = float(torch.tensor(freq_scale, dtype=torch.float32))
        self.freq_factors = None if freq_factors is None else freq_factors.detach().float().cpu()
        self.attn_factor = float(torch.tensor(attn_factor, dtype=torch.float32))
        self.cos = torch.empty(0, n_dims // 2)
        self.sin = torch.empty(0, n_dims // 2)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        theta = positions.to(torch.float32).cpu()
        ts = torch.tensor(self.theta_scale, dtype=torch.float32)
        cols = []
        for i in range(self.n_dims // 2):
            t = theta if self.freq_factors is None else theta / self.freq_factors[i]
            cols.append(t * self.freq_scale)
            theta = theta * ts
        return torch.stack(cols, dim=1)

    def _grow(self, n: int) -> None:
        have = self.cos.shape[0]
        if n <= have:
            return
        n = max(n, 2 * have, 64)
        ang = self.angles(torch.arange(have, n))
        L = _libm().lib
        flat = ang.flatten().tolist()
        c = torch.tensor([L.cosf(a) for a in flat], dtype=torch.float32).view_as(ang)
        s = torch.tensor([L.sinf(a) for a in flat], dtype=torch.float32).view_as(ang)
        self.cos = torch.cat([self.cos, c * self.attn_factor])
        self.sin = torch.cat([self.sin, s * self.attn_factor])

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, n_dims/2] for positions ``start..start+length-1``."""
        self._grow(start + length)
        return self.cos[start:start + length].to(device), self.sin[start:start + length].to(device)


def rope_neox_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ggml's rotation ``x0*cos - x1*sin``, ``x0*sin + x1*cos`` as GCC compiles it with FMA
    contraction: ``fma(x0, cos, -(x1*sin))`` and ``fma(x0, sin, x1*cos)``. ``x`` [..., T, D] is
    in HF's rotate-half layout (pair ``i`` is ``(i, i + D/2)``, the GGUF-permuted adjacent pair
    of llama.cpp's NORM rope and the NEOX pair alike); cos/sin [T, D/2]."""
    h = x.shape[-1] // 2
    x0, x1 = x[..., :h].float(), x[..., h:].float()
    out0 = fma_f32(x0, cos, -(x1 * sin))
    out1 = fma_f32(x0, sin, x1 * cos)
    return torch.cat([out0, out1], dim=-1)


def vec_dot_f32_reduce(acc: torch.Tensor) -> torch.Tensor:
    """``GGML_F32x8_REDUCE`` of the four 8-lane accumulators of ``ggml_vec_dot_f32`` held in the
    last dimension (32 = accumulator*8 + lane): acc0+acc2, acc1+acc3, then those two; then the
    128-bit halves, and two ``hadd``s."""
    a = [acc[..., 8 * j:8 * j + 8] for j in range(4)]
    x0 = (a[0] + a[2]) + (a[1] + a[3])
    t0 = x0[..., 0:4] + x0[..., 4:8]
    return (t0[..., 0] + t0[..., 1]) + (t0[..., 2] + t0[..., 3])


def vec_dot_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``ggml_vec_dot_f32`` (AVX2) of x [..., n] and y [..., n] broadcast against each other:
    four 8-lane FMA accumulators over 32-element steps, the reduction above, then the tail
    elements (``n % 32``) added one by one, each ``sumf += x*y`` contracted to an FMA."""
    n = x.shape[-1]
    np_ = n - n % 32
    x, y = x.float(), y.float()
    if np_:
        acc = x[..., 0:32] * y[..., 0:32]  # fma into zero: the rounded product
        for i in range(32, np_, 32):
            _fma_into(acc, x[..., i:i + 32], y[..., i:i + 32].double())
        s = vec_dot_f32_reduce(acc)
    else:
        s = torch.zeros(torch.broadcast_shapes(x.shape[:-1], y.shape[:-1]), dtype=torch.float32, device=x.device)
    for i in range(np_, n):
        s = fma_f32(x[..., i], y[..., i], s)
    return s


def _pad_last(x: torch.Tensor, mult: int, value: float) -> torch.Tensor:
    extra = (-x.shape[-1]) % mult
    if not extra:
        return x
    return torch.nn.functional.pad(x, (0, extra), value=value)


def soft_max(w: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """``ggml_soft_max_ext`` (mask of 0/-inf, no ALiBi) over the last dimension: ``w*scale``,
    masked, minus the row max, ``v_expf`` per 8-wide vector, the vector's ``hsum`` added to a
    double sum, and the row multiplied by ``(float)(1.0/sum)``. Rows are padded with -inf to a
    multiple of 8 (llama.cpp's padded KV length adds exact zeros the same way)."""
    S = w.shape[-1]
    x = w.float() * torch.tensor(scale, dtype=torch.float32)
    x = x.masked_fill(~allowed, float("-inf"))
    x = _pad_last(x, 8, float("-inf"))
    mx = x.amax(-1, keepdim=True)
    e = v_expf(x - mx)
    vec = e.unflatten(-1, (-1, 8))  # [..., groups, 8]
    gs = hsum_float_8(vec.movedim(-1, 0))  # [..., groups] float32
    total = gs.double().cumsum(-1)[..., -1:]  # sequential double sum
    inv = (1.0 / total).float()
    return (e * inv)[..., :S]


def interleave_halves(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half layout of the last dimension → llama.cpp's for Llama-family GGUFs, whose
    converter permuted Q/K rows so each rope pair is adjacent: ``(i, i + D/2)`` → ``(2i, 2i+1)``.
    The order matters to the bits of ``q·k``, which ggml sums in that order."""
    D = x.shape[-1]
    return x.unflatten(-1, (2, D // 2)).transpose(-1, -2).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
              interleaved_qk: bool = False, start: int = 0) -> torch.Tensor:
    """llama.cpp's non-flash attention on the CPU for q [B,H,T,D], k/v [B,H,S,D] (heads already
    repeated for GQA), ``allowed`` [T,S], queries at positions ``start...``; ``interleaved_qk``:
    llama.cpp holds q/k in the GGUF's permuted order (:func:`interleave_halves`).

    ``kq = mul_mat(k, q)``: q is a permuted view, so ggml takes ``ggml_vec_dot_f32`` per pair;
    then :func:`soft_max`; then ``kqv = mul_mat(v, kq)`` over the (padded) KV positions: for 2+
    query tokens llamafile's ``tinyBLAS`` (one 8-lane FMA accumulator, ``hsum``), for one token
    ``ggml_vec_dot_f32``. Returns float32 [B,H,T,D]."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if interleaved_qk:
        q, k = interleave_halves(q), interleave_halves(k)
    q, k, v = q.float(), k.float(), v.float()
    kq = torch.empty(B, H, T, S, dtype=torch.float32, device=q.device)
    rows = max(1, (1 << 22) // max(1, S * D))  # bounds the [rows, S, 32] temporaries
    for i in range(0, T, rows):
        kq[:, :, i:i + rows] = vec_dot_f32(k.unsqueeze(2), q[:, :, i:i + rows].unsqueeze(3))
    p = soft_max(kq, allowed, scale)  # [B, H, T, S]
    if T == 1:
        p32 = _pad_last(p, 32, 0.0)
        vt = _pad_last(v.transpose(2, 3), 32, 0.0)  # [B, H, D, S']
        return vec_dot_f32(vt.unsqueeze(2), p32.unsqueeze(3))
    p8 = _pad_last(p, 8, 0.0).unflatten(-1, (-1, 8))  # [B, H, T, C, 8]
    vt = _pad_last(v.transpose(2, 3), 8, 0.0).unflatten(-1, (-1, 8)).double()  # [B, H, D, C, 8]
    acc = torch.zeros(B, H, T, D, 8, dtype=torch.float32, device=q.device)
    first = torch.arange(T, device=q.device) + start  # queries before a chunk see only zeros there
    for c in range(p8.shape[3]):
        t0 = int((first < 8 * c).sum()) if S == T + start else 0
        if t0 >= T:
            break
        a = acc[:, :, t0:]
        _fma_into(a, p8[:, :, t0:, c].unsqueeze(3), vt[:, :, :, c].unsqueeze(2))
    return hsum_float_8(acc.movedim(-1, 0))
