"""Triton forward and backward of one HGT layer step: ``define_ops::hgt_step_triton`` (+ ``_backward``).

Semantics are those of ``define_ops.reference.hgt_step_ref`` and the C++ op: grouped GEMM
x_j [T, a/g] @ W_j [a/g, s] (s = b/g) → +bias (GEMM order) → shuffle z[t·g + i] = y[i·s + t] →
per-group LayerNorm over s features with one γ/β [s] → activation → dropout (Philox from a seed)
→ stored straight into the next layer's mix(e, h, c) row, with e copied from its place in x.

Forward
    ``_hgt_step_fwd_kernel``: one program = (token tile, GEMM group, column tile); the GEMM
    tile goes through the whole epilogue in registers. Feature shuffle and the split-mix output
    are store addresses. LayerNorm needs a group's s features in one tile, so with a norm the
    column tile is the whole group; with shuffle + norm (a norm group then draws from every GEMM
    group) or groups wider than ``FUSED_NORM_MAX``, the kernel stores the pre-norm values (which
    the backward needs anyway) and ``_hgt_step_fwd_rows_kernel`` runs the epilogue row-wise.
Backward
    ``_hgt_step_bwd_dy_kernel`` turns grad_out into dY (GEMM order, regenerating the dropout
    mask) and per-tile partial sums of dγ/dβ; ``_hgt_step_bwd_dx_kernel`` computes dx = dY Wᵀ
    and adds e's pass-through gradient at e's places in x; ``_hgt_step_bwd_dw_kernel`` computes
    dW = xᵀ dY and d bias = Σ_t dY, split over token ranges whose partials are summed in order
    (no atomics: deterministic for a given configuration).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import hgt_step_autograd
from ..reference import dropout_threshold
from ._common import (
    INTERPRET,
    acc_dtype,
    allow_tf32,
    autotuned,
    bounded_put,
    cdiv,
    dot_in_f32,
    interpret_block,
    keep_fitting,
    launch,
    next_pow2,
    register_op,
    sm_count,
    split_float,
)

_ACTIVATIONS = {"none": 0, "": 0, "gelu": 1, "relu": 2, "swish": 3}
# Widest norm group fused into the GEMM epilogue on a GPU (a [16, 1024] fp32 tile is 64
# registers per thread at 8 warps; float64 tiles need twice the shared memory, so half the
# width); wider groups take the row-wise epilogue. Tests lower it.
FUSED_NORM_MAX = 1 << 30 if INTERPRET else 1024
# Largest interpreter blocks: the interpreter costs ~2-3 ms per program and loop step, so big
# blocks keep CI fast. Tests lower them to exercise multi-tile loops and masks.
INTERPRET_MAX_BLOCK = {"T": 128, "N": 1024, "K": 256}
# Elements per tile of the row-wise (no GEMM) kernels on a GPU.
_ROW_TILE = 4096


# ----------------------------------------------------------------------------- shared device code
@triton.jit
def _activation(v, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:  # NaN stays NaN, as in F.relu (a NaN row flags a bad id)
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 3:  # swish = SiLU
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _activation_grad(v, ACT: tl.constexpr):
    """d activation / d v at the pre-activation value v (ACT > 0)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        d = cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACT == 2:  # F.relu's backward: zero where the output is <= 0 (a NaN passes the gradient)
        d = tl.where(v <= 0, 0.0, 1.0)
    else:
        sig = 1.0 / (1.0 + tl.exp(-v))
        d = sig * (1.0 + v * (1.0 - sig))
    return d


@triton.jit
def _sqrt(v):
    """Correctly rounded square root (tl.sqrt_rn takes float32 only; float64 sqrt is exact-rounded)."""
    if v.dtype == tl.float64:
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return r


@triton.jit
def _f64(hi, mid, lo, dtype: tl.constexpr):
    """Rebuild a host float passed as three float32 parts (see ``split_float``)."""
    return tl.cast(hi, dtype) + tl.cast(mid, dtype) + tl.cast(lo, dtype)


@triton.jit
def _dropout_keep(SEED, rows, f, f0, threshold, QUADS: tl.constexpr):
    """Keep mask [rows, f]: word f % 4 of philox(seed, (f // 4, row, 0, 0)) >= threshold.

    QUADS: f is f0, f0 + 1, ... with f0 % 4 == 0, so one Philox call yields the words of four
    features; otherwise each element runs its own call and keeps the word it needs.
    """
    seed = tl.load(SEED)
    if QUADS:
        q = f0 // 4 + tl.arange(0, f.shape[0] // 4)
        zero = (rows[:, None] * 0 + q[None, :] * 0).to(tl.uint32)
        c0 = q.to(tl.uint32)[None, :] + zero
        c1 = rows.to(tl.uint32)[:, None] + zero
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
        # tl.join stacks along a new minor axis: [rows, quads, k, i] holds (w0, w2)[k] for i = 0 and
        # (w1, w3)[k] for i = 1, i.e. word 2k + i, which lands at feature 4q + 2k + i.
        word = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], f.shape[0]))
    else:
        zero = (rows[:, None] * 0 + f[None, :] * 0).to(tl.uint32)
        c0 = (f // 4).to(tl.uint32)[None, :] + zero
        c1 = rows.to(tl.uint32)[:, None] + zero
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
        sel = (f % 4)[None, :] + zero
        word = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
    return word.to(tl.int64) >= threshold  # uint32 → int64 zero-extends


@triton.jit
def _mix_pos(q, part_chunk, other_chunk, first: tl.constexpr):
    """Column of element q of one part inside a mix row whose chunks are [e_j ‖ h_j].

    ``first``: the part is e (at the start of each chunk); otherwise h (after e_j).
    """
    pos = (q // part_chunk) * (part_chunk + other_chunk) + q % part_chunk
    if not first:
        pos += other_chunk
    return pos


@triton.jit
def _copy_e(X, OUT, rows64, row_ok, stride_xt, stride_xk, out_width, e_width, e_in, h_in, e_out, h_out,
            BLOCK_E: tl.constexpr):  # fmt: skip
    """out[t, e place in mix(e, h, out chunks)] = x[t, e place in mix(e, h, in chunks)]."""
    for q0 in range(0, e_width, BLOCK_E):
        q = q0 + tl.arange(0, BLOCK_E)
        m = row_ok[:, None] & (q < e_width)[None, :]
        src = _mix_pos(q, e_in, h_in, True).to(tl.int64)
        dst = _mix_pos(q, e_out, h_out, True).to(tl.int64)
        e = tl.load(X + rows64[:, None] * stride_xt + src[None, :] * stride_xk, mask=m)
        tl.store(OUT + rows64[:, None] * out_width + dst[None, :], e, mask=m)


@triton.jit
def _norm_act_dropout_store(
    v, rows, u, f, f0, grp, row_ok, col_ok,
    GAMMA, BETA, SEED, MEAN, RSTD, OUT,
    s, g, out_width, e_out, h_out, threshold, keep_scale, eps,
    NORM: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, CARRY_E: tl.constexpr, QUADS: tl.constexpr,
):  # fmt: skip
    """The epilogue after the bias: v [rows, u] holds features f (after shuffle) in the
    accumulation dtype; with NORM the tile is norm group ``grp`` (u < s its features).
    QUADS: f = f0 + u with f0 % 4 == 0 (see ``_dropout_keep``)."""
    rows64 = rows.to(tl.int64)
    if NORM:
        mean = tl.sum(tl.where(col_ok[None, :], v, 0.0), axis=1) / s
        d = tl.where(col_ok[None, :], v - mean[:, None], 0.0)
        rstd = 1.0 / _sqrt(tl.sum(d * d, axis=1) / s + eps)
        tl.store(MEAN + rows64 * g + grp, mean, mask=row_ok)
        tl.store(RSTD + rows64 * g + grp, rstd, mask=row_ok)
        gamma = tl.load(GAMMA + u, mask=col_ok, other=0.0).to(v.dtype)
        beta = tl.load(BETA + u, mask=col_ok, other=0.0).to(v.dtype)
        v = d * rstd[:, None] * gamma[None, :] + beta[None, :]
    v = _activation(v, ACT)
    if DROPOUT:
        # v · (kept ? 1/(1−p) : 0), as the reference: a dropped NaN stays NaN (a select would give 0)
        v = v * tl.where(_dropout_keep(SEED, rows, f, f0, threshold, QUADS), keep_scale, 0.0)
    col = f
    if CARRY_E:
        col = _mix_pos(f, h_out, e_out, False)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(OUT + rows64[:, None] * out_width + col.to(tl.int64)[None, :], v.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- forward
# Shared memory the pipelined x and W tiles may take (bytes): fits sm_80 (163 KB) and sm_90.
_SMEM_BUDGET = 160 * 1024


def _smem(m: dict, elem: int, stages: int, reduce: str = "BLOCK_K") -> int:
    """Bytes of a config's operand tiles: (the two output block sizes) × the reduction block, per stage."""
    return (sum(m.values()) - m[reduce]) * m[reduce] * elem * stages


def _fwd_configs() -> list[triton.Config]:
    # Generic GEMM tiles, plus whole-group tiles (BLOCK_N = next_pow2(s)) for the fused norm, each
    # with pipelines from deep to shallow (pruning keeps the deepest that fits the dtype).
    tiles = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
             (32, 64, 64, 4, 4)]  # fmt: skip
    configs = [triton.Config({"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
               for t, n, k, w, st in tiles]  # fmt: skip
    for n in [16, 32, 64, 128, 256, 512, 1024]:
        for t in [16, 32, 64]:
            if t * n > 16384 or (n >= 64 and t >= 64):  # too many registers, or already above
                continue
            for k, stages in [(32, 3), (32, 2), (16, 2), (16, 1)]:
                block = {"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k}
                configs.append(triton.Config(block, num_warps=4 if t * n <= 4096 else 8, num_stages=stages))
    return configs


def _prune_fwd(configs, named_args, **kwargs):
    s_p, k_p = max(16, next_pow2(named_args["s"])), max(32, next_pow2(named_args["a_g"]))
    t_p = max(16, named_args["t_bucket"])
    elem = named_args["X"].element_size()
    if kwargs.get("NORM", named_args.get("NORM")):
        whole, seen = [], set()
        for c in configs[6:]:  # the deepest pipeline that fits, per tile shape
            tile = (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"])
            if c.kwargs["BLOCK_N"] == s_p and tile not in seen and _smem(c.kwargs, elem, c.num_stages) <= _SMEM_BUDGET:
                seen.add(tile)
                whole.append(c)
        return keep_fitting(whole or configs[6:], lambda m: m["BLOCK_T"] <= t_p)
    generic = [c for c in configs[:6] if _smem(c.kwargs, elem, c.num_stages) <= _SMEM_BUDGET]
    return keep_fitting(generic, lambda m: m["BLOCK_N"] <= s_p and m["BLOCK_T"] <= t_p and m["BLOCK_K"] <= k_p)


@triton.jit
def _hgt_step_fwd_kernel(
    X,  # [T, a] layer input, any strides; mix(e, h_prev, e_in chunks) when it carries e
    W,  # [g, a/g, s] grouped weight, any strides (the Reduce layer passes a transposed view)
    BIAS,  # [b] bias, GEMM order
    GAMMA,  # [s] LayerNorm γ shared by the groups
    BETA,  # [s] LayerNorm β
    SEED,  # [1] int64 dropout key
    OUT,  # [T, out_width] contiguous: mix(e, h, e_out chunks), or h
    SAVED,  # [T, b] contiguous pre-norm values (after the bias), GEMM order
    MEAN,  # [T, g] contiguous per-(token, group) mean, accumulation dtype
    RSTD,  # [T, g] contiguous per-(token, group) 1/std
    ROWS,  # [1] int64: rows to compute (dedup's device-side count of distinct ids); read when HAS_ROWS
    T, a_g, s, g, out_width,
    stride_xt, stride_xk, stride_wg, stride_wk, stride_wn,
    e_width, e_in, h_in, e_out, h_out,  # e width; e and h chunk widths of x and of the output
    threshold,  # dropout: a Philox word below it drops the element
    keep_hi, keep_mid, keep_lo,  # 1 / (1 - p)
    eps_hi, eps_mid, eps_lo,  # LayerNorm eps
    t_bucket,  # next_pow2(T): read only by the autotuner's key
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SHUFFLE: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    CARRY_E: tl.constexpr, SAVE: tl.constexpr, QUADS: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    grp = tl.program_id(1)
    pid_n = tl.program_id(2)
    if HAS_ROWS:  # the grid covers T rows; only the first ROWS are real (the rest: dedup padding)
        T = tl.load(ROWS)
        if pid_t * BLOCK_T >= T:
            return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    u = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside GEMM group grp
    col_ok = u < s
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32)

    w_group = W + grp.to(tl.int64) * stride_wg
    for k0 in range(0, a_g, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < a_g
        x_cols = (grp * a_g + kk).to(tl.int64) * stride_xk
        xt = tl.load(X + rows64[:, None] * stride_xt + x_cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_offs = kk.to(tl.int64)[:, None] * stride_wk + u.to(tl.int64)[None, :] * stride_wn
        wt = tl.load(w_group + w_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        # out_dtype: triton 3.6 rejects a float64 accumulator without it
        acc = tl.dot(xt, wt, acc, input_precision="tf32" if ALLOW_TF32 else "ieee", out_dtype=acc.dtype)

    gemm_col = grp * s + u
    v = acc
    if HAS_BIAS:
        v += tl.load(BIAS + gemm_col, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    if SAVE:  # the backward recomputes from the stored (rounded) value, so the forward uses it too
        rounded = v.to(SAVED.dtype.element_ty)
        saved_offs = rows64[:, None] * (g * s) + gemm_col[None, :]
        tl.store(SAVED + saved_offs, rounded, mask=row_ok[:, None] & col_ok[None, :])
        v = rounded.to(acc.dtype)
    if SHUFFLE:  # GEMM column (grp, u) is feature u·g + grp after the shuffle
        f = u * g + grp
    else:
        f = gemm_col
    keep_scale = _f64(keep_hi, keep_mid, keep_lo, acc.dtype)
    eps = _f64(eps_hi, eps_mid, eps_lo, acc.dtype)
    _norm_act_dropout_store(
        v, rows, u, f, grp * s + pid_n * BLOCK_N, grp, row_ok, col_ok, GAMMA, BETA, SEED, MEAN, RSTD, OUT,
        s, g, out_width, e_out, h_out, threshold, keep_scale, eps, NORM, ACT, DROPOUT, CARRY_E, QUADS,
    )  # fmt: skip
    if CARRY_E:
        if (grp == 0) & (pid_n == 0):
            _copy_e(X, OUT, rows64, row_ok, stride_xt, stride_xk, out_width, e_width, e_in, h_in, e_out, h_out,
                    BLOCK_N)  # fmt: skip


_hgt_step_fwd_tuned = autotuned(
    _fwd_configs(),
    key=["t_bucket", "a_g", "s", "g", "HAS_BIAS", "NORM", "SHUFFLE", "ACT", "DROPOUT", "CARRY_E", "SAVE"],
    prune=_prune_fwd,
)(_hgt_step_fwd_kernel)


@triton.jit
def _hgt_step_fwd_rows_kernel(
    X,  # [T, a] layer input (for the e copy), any strides
    SAVED,  # [T, b] contiguous pre-norm values, GEMM order
    GAMMA,  # [s]
    BETA,  # [s]
    SEED,  # [1] int64
    OUT,  # [T, out_width] contiguous
    MEAN,  # [T, g] contiguous
    RSTD,  # [T, g] contiguous
    ROWS,  # [1] int64 rows to compute, read when HAS_ROWS
    T, s, g, out_width, stride_xt, stride_xk,
    e_width, e_in, h_in, e_out, h_out,
    threshold, keep_hi, keep_mid, keep_lo, eps_hi, eps_mid, eps_lo,
    SHUFFLE: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, CARRY_E: tl.constexpr, QUADS: tl.constexpr,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """LayerNorm → activation → dropout → mixed store from SAVED; one program = (token tile, norm group)."""
    pid_t = tl.program_id(0)
    grp = tl.program_id(1)
    if HAS_ROWS:
        T = tl.load(ROWS)
        if pid_t * BLOCK_T >= T:
            return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    u = tl.arange(0, BLOCK_N)
    col_ok = u < s
    f = grp * s + u
    src = (f % g) * s + f // g if SHUFFLE else f  # GEMM column of feature f
    v = tl.load(SAVED + rows64[:, None] * (g * s) + src[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    v = v.to(tl.float64 if SAVED.dtype.element_ty == tl.float64 else tl.float32)
    keep_scale = _f64(keep_hi, keep_mid, keep_lo, v.dtype)
    eps = _f64(eps_hi, eps_mid, eps_lo, v.dtype)
    _norm_act_dropout_store(
        v, rows, u, f, grp * s, grp, row_ok, col_ok, GAMMA, BETA, SEED, MEAN, RSTD, OUT,
        s, g, out_width, e_out, h_out, threshold, keep_scale, eps, True, ACT, DROPOUT, CARRY_E, QUADS,
    )  # fmt: skip
    if CARRY_E:
        if grp == 0:
            _copy_e(X, OUT, rows64, row_ok, stride_xt, stride_xk, out_width, e_width, e_in, h_in, e_out, h_out,
                    BLOCK_N)  # fmt: skip


# ----------------------------------------------------------------------------- backward
@triton.jit
def _hgt_step_bwd_dy_kernel(
    GRAD,  # [T, out_width] gradient of the output, any strides
    SAVED,  # [T, b] contiguous pre-norm values, GEMM order (read when NORM or ACT)
    MEAN,  # [T, g] contiguous
    RSTD,  # [T, g] contiguous
    GAMMA,  # [s]
    BETA,  # [s]
    SEED,  # [1] int64
    DY,  # [T, b] contiguous: gradient of the GEMM output (+bias), GEMM order
    PART,  # [tiles · g, 2 · s] contiguous, accumulation dtype: per (token tile, group) Σ dact·x̂ (dγ) ‖ Σ dact (dβ)
    ROWS,  # [1] int64 rows to compute, read when HAS_ROWS
    T, s, g, stride_gt, stride_gn, e_out, h_out, threshold, keep_hi, keep_mid, keep_lo,
    NORM: tl.constexpr, SHUFFLE: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, CARRY_E: tl.constexpr,
    HAS_SAVED: tl.constexpr, QUADS: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program = (token tile, norm group) with NORM, else (token tile, feature tile)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    if HAS_ROWS:  # no early exit: a tile past the count still writes its (zero) partial sums
        T = tl.load(ROWS)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    u = tl.arange(0, BLOCK_N)
    if NORM:
        f0 = pid_n * s
        col_ok = u < s
    else:
        f0 = pid_n * BLOCK_N
        col_ok = f0 + u < g * s
    f = f0 + u
    valid = row_ok[:, None] & col_ok[None, :]
    src = (f % g) * s + f // g if SHUFFLE else f
    out_col = f
    if CARRY_E:
        out_col = _mix_pos(f, h_out, e_out, False)
    d = tl.load(GRAD + rows64[:, None] * stride_gt + out_col.to(tl.int64)[None, :] * stride_gn, mask=valid, other=0.0)
    d = d.to(tl.float64 if DY.dtype.element_ty == tl.float64 else tl.float32)
    if DROPOUT:
        keep_scale = _f64(keep_hi, keep_mid, keep_lo, d.dtype)
        d = d * tl.where(_dropout_keep(SEED, rows, f, f0, threshold, QUADS), keep_scale, 0.0)
    if HAS_SAVED:
        pre = tl.load(SAVED + rows64[:, None] * (g * s) + src[None, :], mask=valid, other=0.0).to(d.dtype)
        if NORM:
            mean = tl.load(MEAN + rows64 * g + pid_n, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows64 * g + pid_n, mask=row_ok, other=0.0)
            x_hat = tl.where(valid, (pre - mean[:, None]) * rstd[:, None], 0.0)
            gamma = tl.load(GAMMA + u, mask=col_ok, other=0.0).to(d.dtype)
            beta = tl.load(BETA + u, mask=col_ok, other=0.0).to(d.dtype)
            pre = x_hat * gamma[None, :] + beta[None, :]
        if ACT > 0:
            d = d * _activation_grad(pre, ACT)
    if NORM:
        d_act = tl.where(valid, d, 0.0)
        dxh = d_act * gamma[None, :]
        mean_dxh = tl.sum(dxh, axis=1) / s
        mean_dxh_xh = tl.sum(dxh * x_hat, axis=1) / s
        d = rstd[:, None] * (dxh - mean_dxh[:, None] - x_hat * mean_dxh_xh[:, None])
        part = PART + (pid_t.to(tl.int64) * g + pid_n) * (2 * s) + u
        tl.store(part, tl.sum(d_act * x_hat, axis=0), mask=col_ok)
        tl.store(part + s, tl.sum(d_act, axis=0), mask=col_ok)
    tl.store(DY + rows64[:, None] * (g * s) + src[None, :], d.to(DY.dtype.element_ty), mask=valid)


def _dx_configs() -> list[triton.Config]:
    tiles = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (32, 64, 64, 4, 4),
             (64, 32, 64, 4, 4)]  # fmt: skip
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for t, k, n, w, st in tiles]  # fmt: skip


def _prune_dx(configs, named_args, **kwargs):
    k_p, n_p = max(32, next_pow2(named_args["a_g"])), max(32, next_pow2(named_args["s"]))
    t_p = max(16, named_args["t_bucket"])
    elem = named_args["DY"].element_size()
    fitting = [c for c in configs if _smem(c.kwargs, elem, c.num_stages, "BLOCK_N") <= _SMEM_BUDGET]
    return keep_fitting(fitting, lambda m: m["BLOCK_K"] <= k_p and m["BLOCK_N"] <= n_p and m["BLOCK_T"] <= t_p)


@triton.jit
def _sum_column_block(
    P,  # [R, C] contiguous partial sums, accumulation dtype
    OUT_A,  # [C_A] dense: column sums [0, C_A), at their flat offsets
    OUT_B,  # [C - C_A] dense: column sums [C_A, C)
    R, C, C_A, block,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Columns [block·BLOCK_C, (block + 1)·BLOCK_C) of P summed over its rows, in row order
    (deterministic), written to two outputs."""
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_C,), dtype=P.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        acc += tl.sum(tl.load(P + offs, mask=(r < R)[:, None] & c_ok[None, :], other=0.0), axis=0)
    tl.store(OUT_A + c, acc.to(OUT_A.dtype.element_ty), mask=c < C_A)
    tl.store(OUT_B + (c - C_A), acc.to(OUT_B.dtype.element_ty), mask=c_ok & (c >= C_A))


@triton.jit
def _hgt_step_bwd_dx_kernel(
    DY,  # [T, b] gradient of the GEMM output, GEMM order, any strides
    W,  # [g, a/g, s] grouped weight, any strides
    GRAD,  # [T, out_width] gradient of the output, any strides (read at e's places)
    DX,  # [T, a] contiguous
    ROWS,  # [1] int64 rows to compute, read when HAS_ROWS (DX rows past it are left as they are)
    PA, OUT_AA, OUT_AB,  # SUM_A: [R_A, C_A] partial sums (dW ‖ d bias per token split) → grad_weight ‖ grad_bias
    PB, OUT_BA, OUT_BB,  # SUM_B: [R_B, 2s] partial sums (d γ ‖ d β per token tile) → grad_gamma ‖ grad_beta
    T, a_g, s, stride_dyt, stride_dyn, stride_wg, stride_wk, stride_wn, stride_gt, stride_gn,
    e_in, h_in, e_out, h_out, t_bucket,
    rows_a, cols_a, split_a, blocks_a, rows_b, cols_b, split_b, blocks_b,
    CARRY_E: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, HAS_ROWS: tl.constexpr,
    SUM_A: tl.constexpr, SUM_B: tl.constexpr, SUM_BLOCK_R: tl.constexpr, SUM_BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx_j = dY_j W_jᵀ (+ e's gradient, copied through from the output); program = (token tile, group, x tile).

    The programs past the token tiles add up the partial sums that the dW and dY kernels (launched
    before this one) left, SUM_BLOCK_C columns each: the step's backward is three launches.
    """
    pid_t = tl.program_id(0)
    grp = tl.program_id(1)
    pid_k = tl.program_id(2)
    if SUM_A or SUM_B:
        t_tiles = tl.cdiv(T, BLOCK_T)
        if pid_t >= t_tiles:
            block = (pid_t - t_tiles) * (tl.num_programs(1) * tl.num_programs(2)) + grp * tl.num_programs(2) + pid_k
            if SUM_A:
                if block < blocks_a:
                    _sum_column_block(PA, OUT_AA, OUT_AB, rows_a, cols_a, split_a, block, SUM_BLOCK_R, SUM_BLOCK_C)
            if SUM_B:
                if (block >= blocks_a) & (block < blocks_a + blocks_b):
                    _sum_column_block(PB, OUT_BA, OUT_BB, rows_b, cols_b, split_b, block - blocks_a, SUM_BLOCK_R,
                                      SUM_BLOCK_C)  # fmt: skip
            return
    if HAS_ROWS:
        T = tl.load(ROWS)
        if pid_t * BLOCK_T >= T:
            return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < a_g
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float64 if DX.dtype.element_ty == tl.float64 else tl.float32)
    w_group = W + grp.to(tl.int64) * stride_wg
    for n0 in range(0, s, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < s
        dy_cols = (grp * s + nn).to(tl.int64) * stride_dyn
        dy = tl.load(DY + rows64[:, None] * stride_dyt + dy_cols[None, :], mask=row_ok[:, None] & n_ok[None, :],
                     other=0.0)  # fmt: skip
        w_offs = nn.to(tl.int64)[:, None] * stride_wn + kk.to(tl.int64)[None, :] * stride_wk
        wt = tl.load(w_group + w_offs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K] = W_jᵀ
        if DOT_F32:
            dy = dy.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(dy, wt, acc, input_precision="tf32" if ALLOW_TF32 else "ieee", out_dtype=acc.dtype)
    col = grp * a_g + kk  # column of x
    if CARRY_E:  # x column `col` holds e element q when it sits in the e part of its chunk
        r = col % (e_in + h_in)
        is_e = r < e_in
        q = (col // (e_in + h_in)) * e_in + r
        g_col = _mix_pos(q, e_out, h_out, True).to(tl.int64)
        e_mask = row_ok[:, None] & (k_ok & is_e)[None, :]
        acc += tl.load(GRAD + rows64[:, None] * stride_gt + g_col[None, :] * stride_gn, mask=e_mask, other=0.0).to(
            acc.dtype
        )
    tl.store(DX + rows64[:, None] * (a_g * tl.num_programs(1)) + col[None, :], acc.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])  # fmt: skip


_hgt_step_bwd_dx_tuned = autotuned(_dx_configs(), key=["t_bucket", "a_g", "s", "CARRY_E"], prune=_prune_dx)(
    _hgt_step_bwd_dx_kernel
)


def _dw_configs() -> list[triton.Config]:
    tiles = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (32, 64, 64, 4, 4),
             (64, 32, 64, 4, 4)]  # fmt: skip
    return [triton.Config({"BLOCK_K": k, "BLOCK_N": n, "BLOCK_T": t}, num_warps=w, num_stages=st)
            for k, n, t, w, st in tiles]  # fmt: skip


def _prune_dw(configs, named_args, **kwargs):
    k_p, n_p = max(32, next_pow2(named_args["a_g"])), max(32, next_pow2(named_args["s"]))
    elem = named_args["DY"].element_size()
    fitting = [c for c in configs if _smem(c.kwargs, elem, c.num_stages, "BLOCK_T") <= _SMEM_BUDGET]
    return keep_fitting(fitting, lambda m: m["BLOCK_K"] <= k_p and m["BLOCK_N"] <= n_p)


@triton.jit
def _hgt_step_bwd_dw_kernel(
    X,  # [T, a] layer input, any strides
    DY,  # [T, b] gradient of the GEMM output, GEMM order, any strides
    DW,  # [g, a/g, s] grad_weight (any strides), or [splits, g, a/g, s] partials (accumulation dtype)
    DB,  # [b] grad_bias, or [splits, b] partials
    ROWS,  # [1] int64 rows to reduce over, read when HAS_ROWS
    T, a_g, s, stride_xt, stride_xk, stride_dyt, stride_dyn,
    stride_dws, stride_dwg, stride_dwk, stride_dwn, stride_dbs, t_bucket,
    HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, HAS_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dW_j = x_jᵀ dY_j and d bias = Σ_t dY over token split ``program_id(2)``; program = (W tile, group, split)."""
    if HAS_ROWS:  # the splits share the first ROWS rows; every split still writes its partials
        T = tl.load(ROWS)
    n_tiles = tl.cdiv(s, BLOCK_N)
    pid_k = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    grp = tl.program_id(1)
    split = tl.program_id(2)
    rows_per_split = tl.cdiv(tl.cdiv(T, BLOCK_T), tl.num_programs(2)) * BLOCK_T
    t_lo = split * rows_per_split
    t_hi = tl.minimum(T, t_lo + rows_per_split)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < a_g
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = nn < s
    acc_t = tl.float64 if DY.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_t)
    acc_b = tl.zeros((BLOCK_N,), dtype=acc_t)
    x_cols = (grp * a_g + kk).to(tl.int64) * stride_xk
    dy_cols = (grp * s + nn).to(tl.int64) * stride_dyn
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        r_ok = rows < t_hi
        rows64 = rows.to(tl.int64)
        xt = tl.load(X + rows64[None, :] * stride_xt + x_cols[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dyt + dy_cols[None, :], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)  # fmt: skip
        if HAS_BIAS:
            acc_b += tl.sum(dy.to(acc_t), axis=0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision="tf32" if ALLOW_TF32 else "ieee", out_dtype=acc.dtype)
    dw = DW + split.to(tl.int64) * stride_dws + grp.to(tl.int64) * stride_dwg
    dw_offs = kk.to(tl.int64)[:, None] * stride_dwk + nn.to(tl.int64)[None, :] * stride_dwn
    tl.store(dw + dw_offs, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        db = DB + split.to(tl.int64) * stride_dbs + grp * s + nn
        tl.store(db, acc_b.to(DB.dtype.element_ty), mask=n_ok & (pid_k == 0))


_hgt_step_bwd_dw_tuned = autotuned(_dw_configs(), key=["t_bucket", "a_g", "s", "HAS_BIAS"], prune=_prune_dw)(
    _hgt_step_bwd_dw_kernel
)


# ----------------------------------------------------------------------------- launchers
class _Step:
    """Validated shapes and layout of one step (the checks of csrc/define_ops.cpp)."""

    def __init__(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
        seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
        dropout_p: float, norm_eps: float,
    ) -> None:  # fmt: skip
        where = "define_ops::hgt_step_triton"
        if x.dim() != 2:
            raise ValueError(f"{where}: x must be 2-D [T, a], got shape {tuple(x.shape)}")
        if weight.dim() != 3:
            raise ValueError(f"{where}: weight must be 3-D [g, a/g, b/g], got shape {tuple(weight.shape)}")
        if not x.dtype.is_floating_point or weight.dtype != x.dtype:
            raise TypeError(f"{where}: x and weight must share one floating dtype, got {x.dtype} and {weight.dtype}")
        self.tokens, self.a = x.shape
        self.g, self.a_g, self.s = weight.shape
        if self.g < 1 or self.g * self.a_g != self.a:
            raise ValueError(
                f"{where}: weight shape {tuple(weight.shape)} does not match x width {self.a} "
                "(need weight [g, a/g, b/g] with g * a/g == a)"
            )
        self.b = self.g * self.s
        vectors = [("bias", bias, self.b), ("norm_weight", norm_weight, self.s), ("norm_bias", norm_bias, self.s)]
        for name, t, size in vectors:
            if t is not None and (t.dim() != 1 or t.shape[0] != size or t.dtype != x.dtype):
                raise ValueError(f"{where}: {name} must have shape [{size}] and dtype {x.dtype}, got {tuple(t.shape)}")
        if (norm_weight is None) != (norm_bias is None):
            raise ValueError(f"{where}: norm_weight and norm_bias must be given together")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{where}: unknown activation '{activation}' (expected none, gelu, relu or swish)")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
        if dropout_p > 0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
            raise ValueError(f"{where}: dropout_p={dropout_p} needs a one-element int64 seed tensor")
        if norm_eps <= 0:
            raise ValueError(f"{where}: norm_eps must be > 0, got {norm_eps}")
        if min(e_width, e_in_chunks, e_out_chunks) < 0:  # (a negative e_out_chunks would read as "no e")
            raise ValueError(
                f"{where}: e_width={e_width}, e_in_chunks={e_in_chunks} and e_out_chunks={e_out_chunks} "
                "must not be negative"
            )
        self.norm = norm_weight is not None
        self.bias = bias is not None
        self.shuffle = bool(shuffle) and self.g > 1
        self.act = _ACTIVATIONS[activation]
        self.dropout = dropout_p > 0
        self.carry_e = e_out_chunks > 0
        self.e_width = e_width
        self.out_width = self.b
        self.e_in = self.h_in = self.e_out = self.h_out = 1  # chunk widths (unused without e)
        if self.carry_e:
            if not 1 <= e_width <= self.a:
                raise ValueError(f"{where}: e_width={e_width} must be in [1, {self.a}] when e_out_chunks > 0")
            if e_in_chunks < 1 or e_width % e_in_chunks or (self.a - e_width) % e_in_chunks:
                raise ValueError(
                    f"{where}: x width {self.a} with e_width={e_width} cannot be split into "
                    f"e_in_chunks={e_in_chunks} chunks"
                )
            if e_width % e_out_chunks or self.b % e_out_chunks:
                raise ValueError(
                    f"{where}: e_width={e_width} and output width {self.b} must both be divisible by "
                    f"e_out_chunks={e_out_chunks}"
                )
            self.e_in, self.h_in = e_width // e_in_chunks, (self.a - e_width) // e_in_chunks
            self.e_out, self.h_out = e_width // e_out_chunks, self.b // e_out_chunks
            self.out_width = self.b + e_width
        self.needs_saved = self.norm or self.act > 0
        self.threshold = dropout_threshold(dropout_p) if self.dropout else 0
        self.keep_scale = split_float(1.0 / (1.0 - dropout_p)) if self.dropout else (1.0, 0.0, 0.0)
        self.eps = split_float(norm_eps)
        self.allow_tf32 = allow_tf32(x.dtype)
        self.dot_f32 = dot_in_f32(x.dtype)

    @property
    def t_bucket(self) -> int:
        """Token count rounded up to a power of two: the autotuners' key (launch paths only)."""
        return next_pow2(self.tokens)


# _Step per argument layout, for launches (see _step); bounded (bounded_put).
_STEPS: dict[tuple, _Step] = {}


def _step(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
    seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
    dropout_p: float, norm_eps: float, run: bool,
) -> _Step:  # fmt: skip
    """``_Step`` of these arguments; for launches (``run``), looked up by everything it reads
    (shapes, dtypes, options, the TF32 switch) instead of rebuilt and re-validated on every call:
    ~10 µs of Python per step op call on the 2-core VM. Shape-only calls (fake tensors, whose
    sizes may be symbolic) build it."""
    if not run:
        return _Step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle,
                     activation, dropout_p, norm_eps)  # fmt: skip
    key = (
        x.shape, x.dtype, weight.shape, weight.dtype,
        *[None if t is None else (t.shape, t.dtype) for t in (bias, norm_weight, norm_bias, seed)],
        e_width, e_in_chunks, e_out_chunks, shuffle, activation, dropout_p, norm_eps, allow_tf32(x.dtype),
    )  # fmt: skip
    step = _STEPS.get(key)
    if step is None:
        step = _Step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle,
                     activation, dropout_p, norm_eps)  # fmt: skip
        bounded_put(_STEPS, key, step)
    return step


def _row_blocks(tokens: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, num_warps) of the row-wise kernels, whose tile spans ``width`` features."""
    block_n = max(16, next_pow2(width))
    if INTERPRET:
        return max(1, min(INTERPRET_MAX_BLOCK["T"], next_pow2(tokens))), block_n, 4
    block_t = max(1, min(64, _ROW_TILE // block_n))
    return block_t, block_n, 4 if block_t * block_n <= 2048 else 8


def _check_row_count(row_count: Tensor | None, x: Tensor, where: str) -> None:
    if row_count is None:
        return
    if row_count.dtype != torch.int64 or row_count.numel() != 1 or row_count.device != x.device:
        raise ValueError(
            f"{where}: row_count must be a one-element int64 tensor on {x.device}, got {row_count.dtype} "
            f"{tuple(row_count.shape)} on {row_count.device}"
        )


def _forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
    seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
    dropout_p: float, norm_eps: float, run: bool, row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    p = _step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle, activation,
              dropout_p, norm_eps, run)  # fmt: skip
    _check_row_count(row_count, x, "define_ops::hgt_step_triton")
    stats = acc_dtype(x.dtype)
    # With a row count the kernels skip the rows past it: zero them here (one memset each, far
    # cheaper than the GEMM rows skipped), so every output is fully defined.
    alloc = torch.zeros if run and row_count is not None else torch.empty
    out = alloc((p.tokens, p.out_width), dtype=x.dtype, device=x.device)
    saved = alloc((p.tokens, p.b) if p.needs_saved else (0,), dtype=x.dtype, device=x.device)
    mean = alloc((p.tokens, p.g) if p.norm else (0,), dtype=stats, device=x.device)
    rstd = torch.empty_like(mean) if alloc is torch.empty else torch.zeros_like(mean)
    if not run or p.tokens == 0:
        return out, saved, mean, rstd
    if p.dropout:
        seed = seed.to(x.device)
    widest = FUSED_NORM_MAX // (2 if x.dtype == torch.float64 else 1)
    fused = not p.norm or (not p.shuffle and next_pow2(p.s) <= widest)
    dummy = x  # stands in for pointers a constexpr flag leaves unread
    gemm_out = out if fused else saved
    args = (
        x, weight, bias if p.bias else dummy, norm_weight if p.norm else dummy, norm_bias if p.norm else dummy,
        seed if p.dropout else dummy, gemm_out, saved if p.needs_saved else dummy, mean if p.norm else dummy,
        rstd if p.norm else dummy, row_count if row_count is not None else dummy, p.tokens, p.a_g, p.s, p.g,
        p.out_width if fused else p.b,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        p.e_width, p.e_in, p.h_in, p.e_out, p.h_out, p.threshold, *p.keep_scale, *p.eps, p.t_bucket,
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=p.bias, NORM=p.norm and fused, SHUFFLE=p.shuffle and fused, ACT=p.act if fused else 0,
        DROPOUT=p.dropout and fused, CARRY_E=p.carry_e and fused, SAVE=p.needs_saved and fused,
        QUADS=not p.shuffle and p.s % 4 == 0, ALLOW_TF32=p.allow_tf32, DOT_F32=p.dot_f32,
        HAS_ROWS=row_count is not None,
    )  # fmt: skip
    tokens, groups, s = p.tokens, p.g, p.s

    def grid(meta):
        return (cdiv(tokens, meta["BLOCK_T"]), groups, cdiv(s, meta["BLOCK_N"]))

    interpret_meta = {}  # the interpreter's one configuration (on a GPU the autotuner picks)
    if INTERPRET:
        block_n = max(16, next_pow2(p.s)) if flags["NORM"] else interpret_block(p.s, INTERPRET_MAX_BLOCK["N"])
        interpret_meta = dict(
            BLOCK_T=interpret_block(p.tokens, INTERPRET_MAX_BLOCK["T"]), BLOCK_N=block_n,
            BLOCK_K=interpret_block(p.a_g, INTERPRET_MAX_BLOCK["K"]),
        )  # fmt: skip
    launch(_hgt_step_fwd_kernel, _hgt_step_fwd_tuned, grid, args, flags, interpret_meta)
    if fused:
        return out, saved, mean, rstd

    block_t, block_n, warps = _row_blocks(p.tokens, p.s)
    rows_args = (
        x, saved, norm_weight, norm_bias, seed if p.dropout else dummy, out, mean, rstd,
        row_count if row_count is not None else dummy, p.tokens, p.s, p.g, p.out_width, x.stride(0), x.stride(1),
        p.e_width, p.e_in, p.h_in, p.e_out, p.h_out,
        p.threshold, *p.keep_scale, *p.eps,
    )  # fmt: skip
    rows_flags = dict(
        SHUFFLE=p.shuffle, ACT=p.act, DROPOUT=p.dropout, CARRY_E=p.carry_e, QUADS=p.s % 4 == 0,
        HAS_ROWS=row_count is not None,
    )  # fmt: skip
    meta = dict(BLOCK_T=block_t, BLOCK_N=block_n)
    launch(
        _hgt_step_fwd_rows_kernel, None, lambda _: (cdiv(tokens, block_t), groups), rows_args, rows_flags, meta,
        dict(meta, num_warps=warps),
    )  # fmt: skip
    return out, saved, mean, rstd


def _backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
    norm_bias: Tensor | None, seed: Tensor | None, saved: Tensor, mean: Tensor, rstd: Tensor, e_width: int,
    e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str, dropout_p: float, norm_eps: float, run: bool,
    row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    p = _step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle, activation,
              dropout_p, norm_eps, run)  # fmt: skip
    where = "define_ops::hgt_step_triton_backward"
    _check_row_count(row_count, x, where)
    if tuple(grad_out.shape) != (p.tokens, p.out_width):
        raise ValueError(f"{where}: grad_out must be [{p.tokens}, {p.out_width}], got {tuple(grad_out.shape)}")
    if p.needs_saved and tuple(saved.shape) != (p.tokens, p.b):
        raise ValueError(f"{where}: saved must be [{p.tokens}, {p.b}], got {tuple(saved.shape)}")
    if p.norm and (mean.numel() != p.tokens * p.g or rstd.numel() != p.tokens * p.g):
        raise ValueError(f"{where}: mean and rstd must be [{p.tokens}, {p.g}]")
    stats = acc_dtype(x.dtype)
    # With a row count, grad_x's rows past it stay zero (the dx kernel skips them): the gradient the
    # previous layer or the Map sees there is exactly nothing, whatever ids those padding rows hold.
    grad_x = x.new_zeros((p.tokens, p.a)) if row_count is not None else x.new_empty((p.tokens, p.a))
    # Same layout as the weight (the Reduce layer's is a transposed view); dense, as empty_like makes it
    # for a dense weight (else contiguous), which the split partials below rely on.
    grad_weight = torch.empty_like(weight)
    grad_bias = x.new_empty((p.b,)) if p.bias else x.new_empty((0,))
    grad_gamma = x.new_empty((p.s,)) if p.norm else x.new_empty((0,))
    grad_beta = x.new_empty((p.s,)) if p.norm else x.new_empty((0,))
    if not run:
        return grad_x, grad_weight, grad_bias, grad_gamma, grad_beta
    if p.tokens == 0:
        for t in (grad_weight, grad_bias, grad_gamma, grad_beta):
            t.zero_()
        return grad_x, grad_weight, grad_bias, grad_gamma, grad_beta
    if p.dropout:
        seed = seed.to(x.device)
    dummy = x
    rows = row_count if row_count is not None else dummy
    has_rows = row_count is not None
    tokens, groups, a_g, s = p.tokens, p.g, p.a_g, p.s
    cap = INTERPRET_MAX_BLOCK

    # (partials [R, C], out_a, out_b): partial sums that the dx launch adds up (its extra programs)
    norm_sums: tuple[Tensor, Tensor, Tensor] | None = None
    dw_sums: tuple[Tensor, Tensor, Tensor] | None = None
    # dY, GEMM order. Without an epilogue it is grad_out itself (its h part: a strided view).
    if not (p.norm or p.act or p.dropout or p.shuffle) and e_out_chunks <= 1:
        dy = grad_out[:, p.e_width :] if p.carry_e else grad_out
    else:
        dy = x.new_empty((p.tokens, p.b))
        block_t, block_n, warps = _row_blocks(p.tokens, p.s if p.norm else p.b)
        if not p.norm and not INTERPRET:
            block_n = min(block_n, 256)
            block_t = max(1, min(64, _ROW_TILE // block_n))
        tiles = cdiv(p.tokens, block_t)
        part = x.new_empty((tiles * p.g, 2 * p.s), dtype=stats) if p.norm else dummy
        args = (
            grad_out, saved if p.needs_saved else dummy, mean if p.norm else dummy, rstd if p.norm else dummy,
            norm_weight if p.norm else dummy, norm_bias if p.norm else dummy, seed if p.dropout else dummy, dy, part,
            rows, p.tokens, p.s, p.g, grad_out.stride(0), grad_out.stride(1), p.e_out, p.h_out, p.threshold,
            *p.keep_scale,
        )  # fmt: skip
        flags = dict(
            NORM=p.norm, SHUFFLE=p.shuffle, ACT=p.act, DROPOUT=p.dropout, CARRY_E=p.carry_e, HAS_SAVED=p.needs_saved,
            QUADS=not p.norm or p.s % 4 == 0,  # tiles start at multiples of BLOCK_N, or of s
            HAS_ROWS=has_rows,
        )  # fmt: skip
        n_tiles = p.g if p.norm else cdiv(p.b, block_n)
        meta = dict(BLOCK_T=block_t, BLOCK_N=block_n)
        grid = (tiles, n_tiles)
        launch(_hgt_step_bwd_dy_kernel, None, lambda _: grid, args, flags, meta, dict(meta, num_warps=warps))
        if p.norm:  # per-tile partial sums, added in a fixed order by the dx launch below
            norm_sums = (part, grad_gamma, grad_beta)

    # dW = xᵀ dY and d bias = Σ_t dY, over `splits` token ranges when the weight alone gives too few programs.
    if INTERPRET:
        splits = DW_SPLITS_INTERPRET
    else:
        programs = p.g * cdiv(p.a_g, 64) * cdiv(p.s, 64)
        splits = max(1, min(cdiv(2 * sm_count(x.device), programs), cdiv(p.tokens, 512)))
    splits = max(1, min(splits, p.tokens))
    if splits == 1:
        dw, db = grad_weight, grad_bias if p.bias else dummy
        dw_strides = (0, *grad_weight.stride())
        db_stride = 0
    else:
        # One row per split: grad_weight's elements at their offsets in its (dense) layout, then bias.
        width = grad_weight.numel() + (p.b if p.bias else 0)
        partials = x.new_empty((splits, width), dtype=stats)
        dw, db = partials, partials[:, grad_weight.numel() :] if p.bias else dummy
        dw_strides = (width, *grad_weight.stride())
        db_stride = width
    args = (
        x, dy, dw, db, rows, p.tokens, p.a_g, p.s, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        *dw_strides, db_stride, p.t_bucket,
    )  # fmt: skip
    flags = dict(HAS_BIAS=p.bias, ALLOW_TF32=p.allow_tf32, DOT_F32=p.dot_f32, HAS_ROWS=has_rows)
    meta = dict(
        BLOCK_K=interpret_block(p.a_g, cap["K"]), BLOCK_N=interpret_block(p.s, cap["N"]),
        BLOCK_T=interpret_block(p.tokens, cap["T"]),
    ) if INTERPRET else {}  # fmt: skip

    def dw_grid(meta):
        return (cdiv(a_g, meta["BLOCK_K"]) * cdiv(s, meta["BLOCK_N"]), groups, splits)

    launch(_hgt_step_bwd_dw_kernel, _hgt_step_bwd_dw_tuned, dw_grid, args, flags, meta)
    if splits > 1:  # without a bias, out_b is never written (its columns start past C)
        dw_sums = (partials, grad_weight, grad_bias if p.bias else grad_weight)

    # dx = dY Wᵀ, plus e's gradient passed straight through to e's places in x.
    # The partial sums of dW / d bias (split dW) and d γ / d β are added up by extra programs of
    # this launch: dY, dW, dx make the step's three launches.
    sum_block_r, sum_block_c = (16, 256) if INTERPRET else (4, 1024)

    def slot(sums: tuple[Tensor, Tensor, Tensor] | None) -> tuple[tuple, tuple]:
        """((partials, out_a, out_b), (rows, columns, columns of out_a, column blocks))."""
        if sums is None:
            return (dummy, dummy, dummy), (0, 0, 0, 0)
        partials_, out_a, _ = sums
        rows_, cols_ = partials_.shape
        return sums, (rows_, cols_, out_a.numel(), cdiv(cols_, sum_block_c))

    (pa, out_aa, out_ab), sizes_a = slot(dw_sums)
    (pb, out_ba, out_bb), sizes_b = slot(norm_sums)
    sum_blocks = sizes_a[3] + sizes_b[3]
    args = (
        dy, weight, grad_out, grad_x, rows, pa, out_aa, out_ab, pb, out_ba, out_bb, p.tokens, p.a_g, p.s,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), grad_out.stride(0),
        grad_out.stride(1), p.e_in, p.h_in, p.e_out, p.h_out, p.t_bucket, *sizes_a, *sizes_b,
    )  # fmt: skip
    flags = dict(
        CARRY_E=p.carry_e, ALLOW_TF32=p.allow_tf32, DOT_F32=p.dot_f32, HAS_ROWS=has_rows, SUM_A=dw_sums is not None,
        SUM_B=norm_sums is not None, SUM_BLOCK_R=sum_block_r, SUM_BLOCK_C=sum_block_c,
    )  # fmt: skip
    meta = dict(
        BLOCK_T=interpret_block(p.tokens, cap["T"]), BLOCK_K=interpret_block(p.a_g, cap["K"]),
        BLOCK_N=interpret_block(p.s, cap["N"]),
    ) if INTERPRET else {}  # fmt: skip

    def dx_grid(meta):
        k_tiles = cdiv(a_g, meta["BLOCK_K"])
        extra = cdiv(sum_blocks, groups * k_tiles)  # the sum programs, spread over (group, x tile)
        return (cdiv(tokens, meta["BLOCK_T"]) + extra, groups, k_tiles)

    launch(_hgt_step_bwd_dx_kernel, _hgt_step_bwd_dx_tuned, dx_grid, args, flags, meta)

    return grad_x, grad_weight, grad_bias, grad_gamma, grad_beta


# Token splits of the dW kernel under the interpreter (tests raise it to cover the split path).
DW_SPLITS_INTERPRET = 1


# ----------------------------------------------------------------------------- ops and autograd
def _hgt_step_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
    seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
    dropout_p: float, norm_eps: float, row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out [T, out_width], saved [T, b] or [0], mean [T, g] or [0], rstd [T, g] or [0]).

    row_count [1] int64 (dedup): only the first row_count rows are computed; the rest of every
    output is zero. No host synchronisation.
    """
    return _forward(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle,
                    activation, dropout_p, norm_eps, run=True, row_count=row_count)  # fmt: skip


def _hgt_step_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
    seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
    dropout_p: float, norm_eps: float, row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _forward(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle,
                    activation, dropout_p, norm_eps, run=False, row_count=row_count)  # fmt: skip


def _hgt_step_backward_impl(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
    norm_bias: Tensor | None, seed: Tensor | None, saved: Tensor, mean: Tensor, rstd: Tensor, e_width: int,
    e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str, dropout_p: float, norm_eps: float,
    row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_x incl. e's pass-through, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias).

    With row_count, rows past it are ignored and grad_x's rows past it are zero.
    """
    return _backward(grad_out, x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, e_width, e_in_chunks,
                     e_out_chunks, shuffle, activation, dropout_p, norm_eps, run=True,
                     row_count=row_count)  # fmt: skip


def _hgt_step_backward_fake(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
    norm_bias: Tensor | None, seed: Tensor | None, saved: Tensor, mean: Tensor, rstd: Tensor, e_width: int,
    e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str, dropout_p: float, norm_eps: float,
    row_count: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _backward(grad_out, x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, e_width, e_in_chunks,
                     e_out_chunks, shuffle, activation, dropout_p, norm_eps, run=False,
                     row_count=row_count)  # fmt: skip


hgt_step_op = register_op("hgt_step_triton", _hgt_step_impl, _hgt_step_fake)
hgt_step_backward_op = register_op("hgt_step_triton_backward", _hgt_step_backward_impl, _hgt_step_backward_fake)


_setup_context, _backward_autograd = hgt_step_autograd(hgt_step_backward_op, trailing_tensors=1)  # row_count
hgt_step_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def hgt_step(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None,
    seed: Tensor | None, e_width: int, e_in_chunks: int, e_out_chunks: int, shuffle: bool, activation: str,
    dropout_p: float, norm_eps: float, row_count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One differentiable HGT layer step (arguments as ``define_ops.ops.hgt_step`` passes them).

    x [T, a], weight [g, a/g, b/g] → [T, b], or mix(e, h, e_out_chunks) [T, n + b]; with
    ``row_count`` only its first rows are computed (and get gradients).
    """
    return hgt_step_op(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks, shuffle,
                       activation, dropout_p, norm_eps, row_count)[0]  # fmt: skip
