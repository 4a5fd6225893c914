"""The "triton" stage: gather -> expert MLP -> weighted scatter-add as Triton kernels, for a flat
list of (token, expert) pairs sorted by expert, so each token may have its own number of experts
(XMoE's threshold router, Sec. 3 of the paper). Nothing is padded to a fixed k.

In the style of ScatterMoE (Tan et al. 2024), written for a variable k: the GEMMs read their
rows through the pairs' token indices (no [N, D] gathered copy), bias and activation run in the
epilogue, and the combine weight is applied in fp32 before the scatter-add. Per pair
(token t, expert e, weight w):

    up = x_t W1_e + b1_e        h = act(up)   (SwiGLU: silu(up) * (x_t W3_e + b3_e))
    out[t] += w (h W2_e + b2_e)

Forward, two kernels over row tiles (a tile is BLOCK_M consecutive pairs of one expert):
  _up_kernel    h = act(x[tokens] W1 + b1)                      [N, F], F-blocks in parallel
  _down_kernel  out[tokens] += w (h W2 + b2)   fp32 atomics      D-blocks in parallel

Backward, with g = dout[t] and u = g W2_e^T, by hand:

    dw = <u, h> + <g, b2>     dh = w u     dup = act'(up) dh      (SwiGLU: dgate = dh silu(up))
    dW2 = sum (w h)^T g   db2 = sum w g    dW1 = sum x^T dup   db1 = sum dup     dx[t] += dup W1^T

  _hidden_grad_kernel   u = g[tokens] W2^T; dw (fp32 atomics over F-blocks), dup, dgate
  _down_weight_kernel   dW2, db2: per expert, a reduction over its rows (idle experts: zeros)
  _up_weight_kernel     dW1, db1 (dW3, db3): the same
  _input_grad_kernel    dx[tokens] += dup W1^T (+ dgate W3^T)      fp32 atomics

Design choices:
- Scatter-add by fp32 atomics, not a sorted second pass: a second pass would write and read
  back an [N, D] fp32 buffer (37.7 MB at S1, below) and need the pairs sorted by token; atomics
  touch only the [T, D] output (12.6 MB at S1, L2-resident on an H200), and a token gets only
  its few experts' adds, so contention is low. The price: fp32 sums in a run-dependent order
  (out, dx and dw differ between runs in the last bits).
- The pre-activation up [N, F] (and the gate) is saved for backward, not recomputed: it is as
  narrow as the experts (9.4 MB in bf16 at S1), and recomputing it would repeat the x W1 GEMM,
  a sixth of forward+backward's GEMM work. h, which the forward writes for the second GEMM
  anyway, is kept too.
- No host sync: every grid comes from shapes. Row tiles number cdiv(N, BLOCK_M) + E, an upper
  bound on sum_e cdiv(n_e, BLOCK_M); each program finds its expert and rows from offsets_E on
  the device (_row_tile) and the spare programs exit at once. Rows at or past offsets_E[-1]
  (static-shape padding) belong to no tile: never read, never written, zero gradient.

Why it should beat grouped_mm at S1 on an H200 (T=4096, D=768, F=384, E=64, ~3 experts/token,
N ~ 12,288 pairs, bf16, GeLU with biases). Estimates from the hardware's peaks (989 dense bf16
TFLOP/s, 4.8 TB/s, 50 MB L2), not measurements:
- GEMM work is the same on both paths: 2 x 2 N D F = 14.5 GFLOP forward, 15 us at peak.
- Bytes both must move: the expert weights, 2 E D F x 2 B = 75.5 MB, 16 us at peak bandwidth.
  Here, besides: x (6.3 MB; a tile's F-blocks reread its rows from L2), h written and read
  (2 x 9.4 MB), the fp32 output zeroed and written back (2 x 12.6 MB; its 37.7 MB of atomic
  adds land in L2): ~125 MB in all, ~26 us at peak, in three launches (memset and two kernels).
- grouped_mm's path adds, around the same two GEMMs: the [N, D] gather (18.9 MB written, read
  back), per-row bias gathers and adds on [N, F] and [N, D] (~110 MB), the activation as a pass
  of its own (19 MB), a combine that converts [N, D] to fp32, weights it and index_adds it
  (~190 MB): ~500 MB of reads and writes (part of it L2 hits) in about a dozen launches.
At ~115 FLOP per DRAM byte this kernel sits below the H200's ~206 FLOP/B balance point: it is
bandwidth-bound, so ~4x fewer bytes and fewer launches should show up as time; backward
likewise skips the gathered copies of g and x and the [N, D] dx buffer. Against the benchmark's
"speed limit" (one expert's weights for every row, L2-resident: compute-bound, ~15-20 us) the
weight stream is the cost no MoE avoids; 0.7 of it needs the weight loads to overlap the MMAs
(num_stages=3 pipelining). How close this comes is for the GPU check (benchmarks/gpu.py);
the block sizes below are sane Hopper defaults, untuned.

Testing: with TRITON_INTERPRET=1 set before triton is first imported (triton.language's own
helpers are built then, and so are these kernels when this module is imported), the kernels
run on CPU tensors in Triton's interpreter; its bf16 tl.dot is wrong, so bf16 operands are
multiplied as fp32 there.

Shapes: T tokens, D model dim, F expert dim, E experts, N pairs (padded length included).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the optional extra is absent: triton_problem() says so, nothing else runs
    triton = tl = InterpretedFunction = None

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
INSTALL_HINT = "pip install 'xmoe[triton]'"


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """Tile sizes shared by every kernel, and the launch's warps and pipeline stages."""

    rows: int  # BLOCK_M, an output tile's rows: pairs per row tile (F or D in the dW kernels)
    cols: int  # BLOCK_N, an output tile's columns (F or D)
    inner: int  # BLOCK_K, one reduction step (D or F; pairs in the dW kernels)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "inner"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"Blocks.{name} must be a power of two >= 16 (tl.dot's smallest), got {size}")


# Hopper-sized defaults, untuned: 64-row tiles waste ~32 rows per expert of ~192 at S1; with 8
# warps no kernel spills registers on sm_90 in bf16 (fp32 _up_weight_kernel does: fp32 is not the
# fast path).
GPU_BLOCKS = Blocks(rows=64, cols=128, inner=64, num_warps=8)
# The interpreter runs a block as numpy arrays: small tiles keep tests fast and exercise masks.
INTERPRETER_BLOCKS = Blocks(rows=16, cols=32, inner=32, num_warps=1, num_stages=1)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ----------------------------------------------------------------------------- device helpers


@_jit
def _row_tile(tile, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of row tile ``tile``: every expert's rows are cut into tiles
    of BLOCK_M, experts in order. Past the last tile, expert >= E."""
    e = tl.arange(0, BLOCK_E)
    end_E = tl.load(offsets_ptr + e, mask=e < E, other=0)
    start_E = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles_E = tl.cdiv(end_E - start_E, BLOCK_M)
    tiles_end_E = tl.cumsum(tiles_E, axis=0)
    expert = tl.sum((tiles_end_E <= tile).to(tl.int32), axis=0)  # idle experts end where they start
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tiles_end_E - tiles_E, 0), axis=0)
    row_start = tl.sum(tl.where(mine, start_E, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end_E, 0), axis=0)
    return expert, row_start, row_end


@_jit
def _expert_rows(expert, offsets_ptr):
    """(first row, end row) of an expert's group."""
    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    return row_start, tl.load(offsets_ptr + expert)


@_jit
def _rows_dot(
    acc, a_ptr, a_rows, a_row_stride, row_ok, b_ptr, b_k_stride, b_col_stride, cols, col_ok, K,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + A[a_rows, :K] @ B[:K, cols] in fp32; A's rows may be gathered (token indices)."""
    a_rows = a_rows.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * a_row_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * b_k_stride + cols[None, :] * b_col_stride,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@_jit
def _rows_dot_vector(a_ptr, a_rows, a_row_stride, row_ok, v_ptr, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[a_rows, :K] @ v in fp32: [BLOCK_M]."""
    a_rows = a_rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * a_row_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_ptr + ks, mask=k_ok, other=0.0)
        acc += tl.sum(a.to(tl.float32) * v.to(tl.float32)[None, :], axis=1)
    return acc


@_jit
def _tanh(z):
    # triton.language has no tanh (libdevice's is CUDA-only); exp(-2|z|) never overflows.
    e = tl.exp(-2 * tl.abs(z))
    t = (1 - e) / (1 + e)
    return tl.where(z >= 0, t, -t)


@_jit
def _activate(up, ACTIVATION: tl.constexpr):
    """act(up) in fp32 for the one-matrix activations (SwiGLU's silu is _silu)."""
    if ACTIVATION == "gelu":
        return 0.5 * up * (1 + tl.erf(up * 0.7071067811865476))  # x Phi(x), Phi by erf
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * up * (1 + _tanh(0.7978845608028654 * (up + 0.044715 * up * up * up)))
    else:
        return tl.maximum(up, 0.0)


@_jit
def _activate_grad(up, ACTIVATION: tl.constexpr):
    """act'(up) in fp32."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1 + tl.erf(up * 0.7071067811865476))
        return cdf + up * tl.exp(-0.5 * up * up) * 0.3989422804014327  # Phi + x phi
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (up + 0.044715 * up * up * up))
        return 0.5 * (1 + t) + 0.5 * up * (1 - t * t) * 0.7978845608028654 * (1 + 0.134145 * up * up)
    else:
        return tl.where(up > 0, 1.0, 0.0)


@_jit
def _silu(z):
    return z * tl.sigmoid(z)


# ----------------------------------------------------------------------------- forward kernels


@_jit
def _up_kernel(
    x_ptr, token_ptr, offsets_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, h_ptr, up_ptr, gate_ptr,
    D, F, E, num_col_blocks,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """h[rows, cols] = act(x[tokens] W1_e + b1_e) (SwiGLU: silu(.) * (x W3_e + b3_e)); with SAVE
    also the pre-activations, for backward."""
    pid = tl.program_id(0)
    tile, col_block = pid // num_col_blocks, pid % num_col_blocks
    expert, row_start, row_end = _row_tile(tile, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    e = expert.to(tl.int64)

    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = _rows_dot(zeros, x_ptr, tokens, D, row_ok, w1_ptr + e * D * F, F, 1, cols, col_ok, D,
                   DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_BIAS:
        up += tl.load(b1_ptr + e * F + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    at = rows.to(tl.int64)[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if ACTIVATION == "swiglu":
        gate = _rows_dot(zeros, x_ptr, tokens, D, row_ok, w3_ptr + e * D * F, F, 1, cols, col_ok, D,
                         DOT_DTYPE, PRECISION, BLOCK_K)
        if HAS_BIAS:
            gate += tl.load(b3_ptr + e * F + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = _silu(up) * gate
        if SAVE:
            tl.store(gate_ptr + at, gate.to(gate_ptr.dtype.element_ty), mask=ok)
    else:
        h = _activate(up, ACTIVATION)
    tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=ok)
    if SAVE:
        tl.store(up_ptr + at, up.to(up_ptr.dtype.element_ty), mask=ok)


@_jit
def _down_kernel(
    h_ptr, token_ptr, weight_ptr, offsets_ptr, w2_ptr, b2_ptr, out_ptr,
    D, F, E, num_col_blocks,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[tokens, cols] += w (h W2_e + b2_e), in fp32."""
    pid = tl.program_id(0)
    tile, col_block = pid // num_col_blocks, pid % num_col_blocks
    expert, row_start, row_end = _row_tile(tile, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    e = expert.to(tl.int64)

    y = _rows_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), h_ptr, rows, F, row_ok,
                  w2_ptr + e * F * D, D, 1, cols, col_ok, F, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_BIAS:
        y += tl.load(b2_ptr + e * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
    # fp32 adds: a token sums several experts, and bf16 would round every partial sum.
    tl.atomic_add(out_ptr + tokens[:, None] * D + cols[None, :], weight[:, None] * y,
                  mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- backward kernels


@_jit
def _hidden_grad_kernel(
    g_ptr, token_ptr, weight_ptr, offsets_ptr, w2_ptr, b2_ptr, h_ptr, up_ptr, gate_ptr,
    dweight_ptr, dup_ptr, dgate_ptr,
    D, F, E, num_col_blocks,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_DWEIGHT: tl.constexpr, WANT_DUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """u = g[tokens] W2_e^T on columns ``cols`` of F; dw += <u, h> (+ <g, b2_e> once per row);
    dup = act'(up) w u (SwiGLU: dup = silu'(up) gate w u, dgate = silu(up) w u)."""
    pid = tl.program_id(0)
    tile, col_block = pid // num_col_blocks, pid % num_col_blocks
    expert, row_start, row_end = _row_tile(tile, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    e = expert.to(tl.int64)
    at = rows.to(tl.int64)[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]

    # W2_e is [F, D]; read as W2_e^T [D, F]: k strides by 1, columns by D.
    u = _rows_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), g_ptr, tokens, D, row_ok,
                  w2_ptr + e * F * D, 1, D, cols, col_ok, D, DOT_DTYPE, PRECISION, BLOCK_K)
    if WANT_DWEIGHT:
        h = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dweight = tl.sum(u * h, axis=1)
        if HAS_BIAS:
            if col_block == 0:
                dweight += _rows_dot_vector(g_ptr, tokens, D, row_ok, b2_ptr + e * D, D, BLOCK_M, BLOCK_K)
        tl.atomic_add(dweight_ptr + rows, dweight, mask=row_ok, sem="relaxed")
    if WANT_DUP:
        weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        dh = weight[:, None] * u
        up = tl.load(up_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if ACTIVATION == "swiglu":
            gate = tl.load(gate_ptr + at, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(up)
            tl.store(dgate_ptr + at, (dh * up * sig).to(dgate_ptr.dtype.element_ty), mask=ok)
            dup = dh * gate * sig * (1 + up * (1 - sig))
        else:
            dup = dh * _activate_grad(up, ACTIVATION)
        tl.store(dup_ptr + at, dup.to(dup_ptr.dtype.element_ty), mask=ok)


@_jit
def _down_weight_kernel(
    g_ptr, token_ptr, weight_ptr, offsets_ptr, h_ptr, dw2_ptr, db2_ptr,
    D, F, num_f_blocks, num_d_blocks,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW2_e[f_cols, d_cols] = sum over the expert's rows of (w h)^T g[tokens]; db2_e = sum w g.
    BLOCK_K rows per step; the output tile is [BLOCK_M (F), BLOCK_N (D)]."""
    pid = tl.program_id(0)
    expert = pid // (num_f_blocks * num_d_blocks)
    f_block = pid // num_d_blocks % num_f_blocks
    d_block = pid % num_d_blocks
    row_start, row_end = _expert_rows(expert, offsets_ptr)
    f_cols = f_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d_cols = d_block * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok, d_ok = f_cols < F, d_cols < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * F + f_cols[None, :],
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + tokens[:, None] * D + d_cols[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        wh = (weight[:, None] * h).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(wh), g.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias += tl.sum(weight[:, None] * g, axis=0)
    e = expert.to(tl.int64)
    tl.store(dw2_ptr + e * F * D + f_cols[:, None] * D + d_cols[None, :],
             acc.to(dw2_ptr.dtype.element_ty), mask=f_ok[:, None] & d_ok[None, :])
    if HAS_BIAS:
        if f_block == 0:
            tl.store(db2_ptr + e * D + d_cols, bias.to(db2_ptr.dtype.element_ty), mask=d_ok)


@_jit
def _up_weight_kernel(
    x_ptr, token_ptr, offsets_ptr, dup_ptr, dgate_ptr, dw1_ptr, db1_ptr, dw3_ptr, db3_ptr,
    D, F, num_d_blocks, num_f_blocks,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW1_e[d_cols, f_cols] = sum over the expert's rows of x[tokens]^T dup; db1_e = sum dup;
    the same for W3 with dgate. The output tile is [BLOCK_M (D), BLOCK_N (F)]."""
    pid = tl.program_id(0)
    expert = pid // (num_d_blocks * num_f_blocks)
    d_block = pid // num_f_blocks % num_d_blocks
    f_block = pid % num_f_blocks
    row_start, row_end = _expert_rows(expert, offsets_ptr)
    d_cols = d_block * BLOCK_M + tl.arange(0, BLOCK_M)
    f_cols = f_block * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok, f_ok = d_cols < D, f_cols < F

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bias3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        x_t = tl.trans(tl.load(x_ptr + tokens[:, None] * D + d_cols[None, :],
                               mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE))
        at = rows.to(tl.int64)[:, None] * F + f_cols[None, :]
        ok = row_ok[:, None] & f_ok[None, :]
        dup = tl.load(dup_ptr + at, mask=ok, other=0.0)
        acc1 = tl.dot(x_t, dup.to(DOT_DTYPE), acc1, input_precision=PRECISION)
        if HAS_BIAS:
            bias1 += tl.sum(dup.to(tl.float32), axis=0)
        if GATED:
            dgate = tl.load(dgate_ptr + at, mask=ok, other=0.0)
            acc3 = tl.dot(x_t, dgate.to(DOT_DTYPE), acc3, input_precision=PRECISION)
            if HAS_BIAS:
                bias3 += tl.sum(dgate.to(tl.float32), axis=0)
    e = expert.to(tl.int64)
    at = e * D * F + d_cols[:, None] * F + f_cols[None, :]
    ok = d_ok[:, None] & f_ok[None, :]
    tl.store(dw1_ptr + at, acc1.to(dw1_ptr.dtype.element_ty), mask=ok)
    if GATED:
        tl.store(dw3_ptr + at, acc3.to(dw3_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        if d_block == 0:
            tl.store(db1_ptr + e * F + f_cols, bias1.to(db1_ptr.dtype.element_ty), mask=f_ok)
            if GATED:
                tl.store(db3_ptr + e * F + f_cols, bias3.to(db3_ptr.dtype.element_ty), mask=f_ok)


@_jit
def _input_grad_kernel(
    dup_ptr, dgate_ptr, token_ptr, offsets_ptr, w1_ptr, w3_ptr, dx_ptr,
    D, F, E, num_col_blocks,
    GATED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dx[tokens, cols] += dup W1_e^T (+ dgate W3_e^T), in fp32."""
    pid = tl.program_id(0)
    tile, col_block = pid // num_col_blocks, pid % num_col_blocks
    expert, row_start, row_end = _row_tile(tile, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    e = expert.to(tl.int64)

    # W1_e is [D, F]; read as W1_e^T [F, D]: k strides by 1, columns by F.
    dx = _rows_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dup_ptr, rows, F, row_ok,
                   w1_ptr + e * D * F, 1, F, cols, col_ok, F, DOT_DTYPE, PRECISION, BLOCK_K)
    if GATED:
        dx = _rows_dot(dx, dgate_ptr, rows, F, row_ok, w3_ptr + e * D * F, 1, F, cols, col_ok, F,
                       DOT_DTYPE, PRECISION, BLOCK_K)
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
    tl.atomic_add(dx_ptr + tokens[:, None] * D + cols[None, :], dx,
                  mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- host side


def triton_problem(x: Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``, or None when they can."""
    if triton is None:
        return f"Triton is not installed ({INSTALL_HINT})"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32, float16 or bfloat16, not {x.dtype}"
    if _interpreted():
        return None
    if x.device.type != "cuda":
        return (
            f"the Triton kernels run on CUDA GPUs, not {x.device.type}; use backend='fused' on CPU "
            f"(tests: start Python with TRITON_INTERPRET=1 to run them, slowly, in Triton's interpreter)"
        )
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 0) and x.dtype == torch.bfloat16:
        return f"bfloat16 needs a GPU of compute capability 8.0 or newer, not {capability}; use float16 or backend='loop'"
    return None


def triton_moe(
    x_TD: Tensor, token_idx_N: Tensor, weight_N: Tensor, offsets_E: Tensor,
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, w3: Tensor | None, b3: Tensor | None,
    activation: str,
) -> Tensor:
    """``out[t] = sum over pairs n with token t of weight_N[n] * FFN_e(n)(x_t)``: [T, D] float32.

    x_TD         [T, D] float32 / float16 / bfloat16, in the compute dtype; the weights are cast
                 to it (a no-op when they already are), gradients flow back through the cast.
    token_idx_N  int64 [N]: the token of each (token, expert) pair, pairs sorted by expert.
    weight_N     float32 [N]: each pair's combine weight (differentiable: the router's gradient).
    offsets_E    int32 [E]: END offset of each expert's group (expert e owns rows
                 offsets_E[e-1]:offsets_E[e]). Rows at or past offsets_E[-1] are padding: they
                 contribute nothing and get zero gradient (their token index must be valid).
    w1 [E, D, F], w2 [E, F, D], w3 [E, D, F] (SwiGLU only, else None); biases b1 [E, F],
    b2 [E, D], b3 [E, F] (SwiGLU with bias only), or all None.
    activation   "gelu" (erf), "gelu_tanh", "relu" or "swiglu".

    Gradients flow to x_TD, weight_N and every weight and bias that requires one; idle experts
    get exact zeros. No host sync (grids come from shapes), so the call can be captured in a
    CUDA graph. Preconditions not checked (checking would sync): token indices in [0, T),
    offsets non-decreasing and at most N.
    """
    problem = triton_problem(x_TD)
    if problem:
        raise ValueError(f"backend='triton' cannot run here: {problem}")
    _check_inputs(x_TD, token_idx_N, weight_N, offsets_E, w1, b1, w2, b2, w3, b3, activation)
    dtype = x_TD.dtype
    params = tuple(p.to(dtype).contiguous() if p is not None else None for p in (w1, b1, w2, b2, w3, b3))
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, weight_N, w1, b1, w2, b2, w3, b3)
    )
    return _TritonMoE.apply(
        x_TD.contiguous(), token_idx_N.contiguous(), weight_N.contiguous(), offsets_E.contiguous(),
        activation, save, *params,
    )


def _check_inputs(x_TD, token_idx_N, weight_N, offsets_E, w1, b1, w2, b2, w3, b3, activation) -> None:
    """Shapes, dtypes and devices (metadata only: nothing here reads the device)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if x_TD.dim() != 2 or w1.dim() != 3:
        raise ValueError(f"x_TD must be [T, D] and w1 [E, D, F]; got {tuple(x_TD.shape)} and {tuple(w1.shape)}")
    E, D, F_ = w1.shape
    expected = {
        "x_TD": (x_TD, (x_TD.shape[0], D)),
        "w2": (w2, (E, F_, D)),
        "w3": (w3, (E, D, F_) if activation == "swiglu" else None),
        "b1": (b1, (E, F_) if b1 is not None else None),
        "b2": (b2, (E, D) if b1 is not None else None),
        "b3": (b3, (E, F_) if b1 is not None and activation == "swiglu" else None),
        "token_idx_N": (token_idx_N, (token_idx_N.shape[0],)),
        "weight_N": (weight_N, (token_idx_N.shape[0],)),
        "offsets_E": (offsets_E, (E,)),
    }
    for name, (t, shape) in expected.items():
        if shape is None and t is not None:
            raise ValueError(f"{name} must be None here (activation={activation!r}, biases: {b1 is not None})")
        if shape is not None and (t is None or tuple(t.shape) != shape):
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"{name} must have shape {shape} (w1 is {tuple(w1.shape)}), got {got}")
        if t is not None and t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x_TD on {x_TD.device}; move them to one device")
    for name, t, want in (("token_idx_N", token_idx_N, torch.int64), ("weight_N", weight_N, torch.float32),
                          ("offsets_E", offsets_E, torch.int32)):
        if t.dtype != want:
            raise ValueError(f"{name} must be {want}, got {t.dtype}")


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return InterpretedFunction is not None and isinstance(_up_kernel, InterpretedFunction)


def _blocks() -> Blocks:
    return INTERPRETER_BLOCKS if _interpreted() else GPU_BLOCKS


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16 and _interpreted():
        return tl.float32  # bf16 tl.dot gives wrong results in the interpreter
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul setting: IEEE unless TF32 is allowed (16-bit: unused)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch(kernel, num_programs: int, blocks: Blocks, device: torch.device, **args) -> None:
    """Every kernel launch goes through here (one place to see them, or to compile them in tests)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(num_programs,)](**args, num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _tile_args(x_TD: Tensor, blocks: Blocks) -> dict:
    """The constexprs every kernel takes: how to multiply and the tile sizes."""
    return dict(
        DOT_DTYPE=_dot_dtype(x_TD.dtype), PRECISION=_precision(x_TD.dtype),
        BLOCK_M=blocks.rows, BLOCK_N=blocks.cols, BLOCK_K=blocks.inner,
    )


class _TritonMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_idx_N, weight_N, offsets_E, activation, save, w1, b1, w2, b2, w3, b3):
        (T, D), (E, _, F_), N = x_TD.shape, w1.shape, token_idx_N.shape[0]
        blocks, device = _blocks(), x_TD.device
        tile_args = _tile_args(x_TD, blocks)
        tiles, block_e = triton.cdiv(N, blocks.rows) + E, triton.next_power_of_2(E)
        gated, has_bias = w3 is not None, b1 is not None

        # Padding rows (at or past offsets_E[-1]) are never written here, nor read anywhere.
        h_NF = x_TD.new_empty(N, F_)
        up_NF = x_TD.new_empty(N, F_) if save else None
        gate_NF = x_TD.new_empty(N, F_) if save and gated else None
        f_blocks = triton.cdiv(F_, blocks.cols)
        _launch(
            _up_kernel, tiles * f_blocks, blocks, device,
            x_ptr=x_TD, token_ptr=token_idx_N, offsets_ptr=offsets_E, w1_ptr=w1, b1_ptr=b1, w3_ptr=w3,
            b3_ptr=b3, h_ptr=h_NF, up_ptr=up_NF, gate_ptr=gate_NF, D=D, F=F_, E=E, num_col_blocks=f_blocks,
            ACTIVATION=activation, HAS_BIAS=has_bias, SAVE=save, BLOCK_E=block_e, **tile_args,
        )
        out_TD = torch.zeros(T, D, dtype=torch.float32, device=device)  # fp32: a token sums several experts
        d_blocks = triton.cdiv(D, blocks.cols)
        _launch(
            _down_kernel, tiles * d_blocks, blocks, device,
            h_ptr=h_NF, token_ptr=token_idx_N, weight_ptr=weight_N, offsets_ptr=offsets_E, w2_ptr=w2,
            b2_ptr=b2, out_ptr=out_TD, D=D, F=F_, E=E, num_col_blocks=d_blocks,
            HAS_BIAS=has_bias, BLOCK_E=block_e, **tile_args,
        )
        if save:
            ctx.save_for_backward(x_TD, token_idx_N, weight_N, offsets_E, h_NF, up_NF, gate_NF, w1, b1, w2, b2, w3, b3)
            ctx.activation = activation
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, token_idx_N, weight_N, offsets_E, h_NF, up_NF, gate_NF, w1, b1, w2, b2, w3, b3 = ctx.saved_tensors
        need_x, _, need_weight, _, _, _, need_w1, need_b1, need_w2, need_b2, need_w3, need_b3 = ctx.needs_input_grad
        (T, D), (E, _, F_), N = x_TD.shape, w1.shape, token_idx_N.shape[0]
        blocks, device = _blocks(), x_TD.device
        tile_args = _tile_args(x_TD, blocks)
        tiles, block_e = triton.cdiv(N, blocks.rows) + E, triton.next_power_of_2(E)
        gated, has_bias = w3 is not None, b1 is not None
        f_blocks, d_blocks = triton.cdiv(F_, blocks.cols), triton.cdiv(D, blocks.cols)
        g_TD = g_TD.float().contiguous()  # an expanded (stride-0) gradient cannot be indexed by rows

        need_up_weights = need_w1 or need_b1 or need_w3 or need_b3
        need_dup = need_x or need_up_weights
        dweight_N = torch.zeros(N, dtype=torch.float32, device=device) if need_weight else None  # padding: 0
        dup_NF = x_TD.new_empty(N, F_) if need_dup else None
        dgate_NF = x_TD.new_empty(N, F_) if need_dup and gated else None
        if need_weight or need_dup:
            _launch(
                _hidden_grad_kernel, tiles * f_blocks, blocks, device,
                g_ptr=g_TD, token_ptr=token_idx_N, weight_ptr=weight_N, offsets_ptr=offsets_E, w2_ptr=w2,
                b2_ptr=b2, h_ptr=h_NF, up_ptr=up_NF, gate_ptr=gate_NF, dweight_ptr=dweight_N, dup_ptr=dup_NF,
                dgate_ptr=dgate_NF, D=D, F=F_, E=E, num_col_blocks=f_blocks, ACTIVATION=ctx.activation,
                HAS_BIAS=has_bias, WANT_DWEIGHT=need_weight, WANT_DUP=need_dup, BLOCK_E=block_e, **tile_args,
            )

        # Weight gradients: one program per (expert, output tile) reduces over the expert's rows,
        # so every slice is written, idle experts' with zeros.
        dw2 = torch.empty_like(w2) if need_w2 or need_b2 else None
        db2 = torch.empty_like(b2) if has_bias and (need_w2 or need_b2) else None
        if dw2 is not None:
            rows_f_blocks = triton.cdiv(F_, blocks.rows)
            _launch(
                _down_weight_kernel, E * rows_f_blocks * d_blocks, blocks, device,
                g_ptr=g_TD, token_ptr=token_idx_N, weight_ptr=weight_N, offsets_ptr=offsets_E, h_ptr=h_NF,
                dw2_ptr=dw2, db2_ptr=db2, D=D, F=F_, num_f_blocks=rows_f_blocks, num_d_blocks=d_blocks,
                HAS_BIAS=has_bias, **tile_args,
            )
        dw1 = torch.empty_like(w1) if need_up_weights else None
        db1 = torch.empty_like(b1) if has_bias and need_up_weights else None
        dw3 = torch.empty_like(w3) if gated and need_up_weights else None
        db3 = torch.empty_like(b3) if gated and has_bias and need_up_weights else None
        if need_up_weights:
            rows_d_blocks = triton.cdiv(D, blocks.rows)
            _launch(
                _up_weight_kernel, E * rows_d_blocks * f_blocks, blocks, device,
                x_ptr=x_TD, token_ptr=token_idx_N, offsets_ptr=offsets_E, dup_ptr=dup_NF, dgate_ptr=dgate_NF,
                dw1_ptr=dw1, db1_ptr=db1, dw3_ptr=dw3, db3_ptr=db3, D=D, F=F_, num_d_blocks=rows_d_blocks,
                num_f_blocks=f_blocks, GATED=gated, HAS_BIAS=has_bias, **tile_args,
            )
        dx_TD = None
        if need_x:
            dx_TD = torch.zeros(T, D, dtype=torch.float32, device=device)  # fp32: sums several experts
            _launch(
                _input_grad_kernel, tiles * d_blocks, blocks, device,
                dup_ptr=dup_NF, dgate_ptr=dgate_NF, token_ptr=token_idx_N, offsets_ptr=offsets_E, w1_ptr=w1,
                w3_ptr=w3, dx_ptr=dx_TD, D=D, F=F_, E=E, num_col_blocks=d_blocks, GATED=gated,
                BLOCK_E=block_e, **tile_args,
            )
            dx_TD = dx_TD.to(x_TD.dtype)
        return (dx_TD, None, dweight_N, None, None, None,
                dw1 if need_w1 else None, db1 if need_b1 else None, dw2 if need_w2 else None,
                db2 if need_b2 else None, dw3 if need_w3 else None, db3 if need_b3 else None)
