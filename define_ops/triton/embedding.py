"""Triton forward and backward of the Map step: ``define_ops::embedding_lookup_triton`` (+ ``_backward``).

e = weight[ids] · scale, padding ids give zero rows and no gradient (``reference.lookup_ref``).

The backward writes only the rows the batch touches: ids are sorted (stably), and the program
at the first position of each run of equal ids sums that run's gradient rows (a block of sorted
positions at a time, in a fixed order) and writes the row once — deterministic, no atomics, no
data-dependent shapes (so it traces under torch.compile). Untouched rows are the zeros of the
dense [V, n] gradient autograd expects.
Batches of up to ``SMALL_BATCH_TOKENS`` ids skip the sort (~30 µs for 1,400 ids on an H100, more
than the kernel): the program of each token finds the id's earlier and later occurrences itself,
a block of ids at a time.

Ids are validated by the caller (``DeFINE`` checks them eagerly, except under torch.compile). An
out-of-range id that gets here never touches memory outside the table: its row is NaN (as in the
CUDA kernel, so the error shows in the loss instead of passing silently) and it gets no gradient.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import embedding_autograd
from ..reference import normalized_padding_idx
from ._common import INTERPRET, cdiv, launch, next_pow2, register_op, split_float

# Interpreter blocks: ids per program and (largest) feature tile.
INTERPRET_BLOCK_IDS = 128
INTERPRET_MAX_BLOCK_N = 1024
# Largest batch whose backward runs without a sort (tests lower it to cover the sorted path).
SMALL_BATCH_TOKENS = 4096


@triton.jit
def _embedding_fwd_kernel(
    WEIGHT,  # [V, n] table, any strides
    IDS,  # [N] int32/int64 token ids, contiguous
    OUT,  # [N, n] contiguous
    N, V, n, stride_wv, stride_wn, pad,  # pad: padding id, or -1
    scale_hi, scale_mid, scale_lo,  # the scale as three float32 parts
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < N
    c_ok = c < n
    ids = tl.load(IDS + i, mask=i_ok, other=0).to(tl.int64)
    use = i_ok & (ids >= 0) & (ids < V) & (ids != pad)
    rows = tl.load(WEIGHT + ids[:, None] * stride_wv + c.to(tl.int64)[None, :] * stride_wn,
                   mask=use[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
    acc_t = tl.float64 if OUT.dtype.element_ty == tl.float64 else tl.float32
    scale = tl.cast(scale_hi, acc_t) + tl.cast(scale_mid, acc_t) + tl.cast(scale_lo, acc_t)
    e = rows.to(acc_t) * scale
    out_of_range = i_ok & ((ids < 0) | (ids >= V))
    e = tl.where(out_of_range[:, None], float("nan"), e)
    out_offs = i.to(tl.int64)[:, None] * n + c[None, :]
    tl.store(OUT + out_offs, e.to(OUT.dtype.element_ty), mask=i_ok[:, None] & c_ok[None, :])


@triton.jit
def _embedding_bwd_kernel(
    GRAD,  # [N, n] gradient of e, any strides
    SORTED,  # [N] int64 ids, sorted (stable)
    ORDER,  # [N] int64: SORTED[j] = ids[ORDER[j]]
    DW,  # [V, n] contiguous dense gradient, zero-filled; touched rows are written here
    N, V, n, stride_gi, stride_gn, pad,
    scale_hi, scale_mid, scale_lo,
    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program = (sorted position, feature tile); only the first position of each run works: it
    sums the run's rows BLOCK_J sorted positions at a time (a block's rows added as a fixed-order
    tree), so the run of a frequent token on real text (hundreds of rows) takes a few dependent
    steps instead of one per row."""
    j = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < n
    token = tl.load(SORTED + j)
    prev = tl.load(SORTED + tl.maximum(j - 1, 0))
    starts = (j == 0) | (prev != token)
    if starts & (token != pad) & (token >= 0) & (token < V):
        acc_t = tl.float64 if DW.dtype.element_ty == tl.float64 else tl.float32
        acc = tl.zeros((BLOCK_N,), dtype=acc_t)
        k = j
        more = True
        while more:
            kk = k + tl.arange(0, BLOCK_J)
            inside = kk < N
            match = (tl.load(SORTED + kk, mask=inside, other=-1) == token) & inside  # a prefix: SORTED is sorted
            src = tl.load(ORDER + kk, mask=match, other=0)
            rows = tl.load(GRAD + src[:, None] * stride_gi + c.to(tl.int64)[None, :] * stride_gn,
                           mask=match[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(rows.to(acc_t), axis=0)
            k += BLOCK_J
            more = tl.sum(match.to(tl.int32)) == BLOCK_J  # the whole block was this token: the run may go on
        scale = tl.cast(scale_hi, acc_t) + tl.cast(scale_mid, acc_t) + tl.cast(scale_lo, acc_t)
        tl.store(DW + token * n + c, (acc * scale).to(DW.dtype.element_ty), mask=c_ok)


@triton.jit
def _embedding_bwd_small_kernel(
    GRAD,  # [N, n] gradient of e, any strides
    IDS,  # [N] int32/int64 token ids, contiguous
    DW,  # [V, n] contiguous dense gradient, zero-filled; touched rows are written here
    N, V, n, stride_gi, stride_gn, pad,
    scale_hi, scale_mid, scale_lo,
    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program = (token, feature tile), no sort: a token whose id occurs earlier in the batch
    does nothing; otherwise the program sums the rows of all the id's occurrences (BLOCK_J ids at a
    time, a block's matching rows added as a fixed-order tree) and writes the row once."""
    i = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < n
    token = tl.load(IDS + i).to(tl.int64)
    if (token != pad) & (token >= 0) & (token < V):
        earlier = 0
        for j0 in range(0, i, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            before = j < i
            earlier += tl.sum(((tl.load(IDS + j, mask=before, other=-1).to(tl.int64) == token) & before).to(tl.int32))
        if earlier == 0:
            acc_t = tl.float64 if DW.dtype.element_ty == tl.float64 else tl.float32
            acc = tl.zeros((BLOCK_N,), dtype=acc_t)
            for j0 in range(i, N, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                inside = j < N
                match = (tl.load(IDS + j, mask=inside, other=-1).to(tl.int64) == token) & inside
                if tl.sum(match.to(tl.int32)) > 0:
                    rows = tl.load(GRAD + j.to(tl.int64)[:, None] * stride_gi + c.to(tl.int64)[None, :] * stride_gn,
                                   mask=match[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
                    acc += tl.sum(rows.to(acc_t), axis=0)
            scale = tl.cast(scale_hi, acc_t) + tl.cast(scale_mid, acc_t) + tl.cast(scale_lo, acc_t)
            tl.store(DW + token * n + c, (acc * scale).to(DW.dtype.element_ty), mask=c_ok)


def _blocks(n: int) -> tuple[int, int]:
    """(ids per program, feature tile) of the forward."""
    if INTERPRET:
        return INTERPRET_BLOCK_IDS, max(16, min(next_pow2(n), INTERPRET_MAX_BLOCK_N))
    block_n = max(16, min(next_pow2(n), 256))
    return max(1, 4096 // block_n), block_n


def _check(weight: Tensor, ids: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"define_ops::embedding_lookup_triton: weight must be [V, n], got {tuple(weight.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"define_ops::embedding_lookup_triton: ids must be int64 or int32, got {ids.dtype}")


def _padding_row(padding_idx: int | None, num_embeddings: int) -> int:
    """The kernels' padding row: padding_idx normalised as nn.Embedding does, -1 for none."""
    row = normalized_padding_idx(padding_idx, num_embeddings)
    return -1 if row is None else row


def _lookup(weight: Tensor, ids: Tensor, padding_idx: int | None, scale: float, run: bool) -> Tensor:
    _check(weight, ids)
    pad = _padding_row(padding_idx, weight.shape[0])
    flat = ids.reshape(-1)
    out = weight.new_empty((flat.numel(), weight.shape[1]))
    if not run or flat.numel() == 0 or weight.shape[1] == 0:
        return out
    flat = flat.contiguous()
    count, num_embeddings, width = flat.numel(), weight.shape[0], weight.shape[1]
    block_i, block_n = _blocks(width)
    args = (weight, flat, out, count, num_embeddings, width, weight.stride(0), weight.stride(1), pad,
            *split_float(scale))  # fmt: skip
    meta = dict(BLOCK_I=block_i, BLOCK_N=block_n)
    grid = (cdiv(count, block_i), cdiv(width, block_n))
    launch(_embedding_fwd_kernel, None, lambda _: grid, args, {}, meta, dict(meta, num_warps=4))
    return out


def _lookup_backward(
    grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float, run: bool
) -> Tensor:
    flat = ids.reshape(-1)
    if num_embeddings < 0:
        raise ValueError(f"define_ops::embedding_lookup_triton_backward: num_embeddings={num_embeddings} is negative")
    pad = _padding_row(padding_idx, num_embeddings)
    if grad.dim() != 2 or grad.shape[0] != flat.numel():
        raise ValueError(
            f"define_ops::embedding_lookup_triton_backward: grad must be [{flat.numel()}, n], got {tuple(grad.shape)}"
        )
    width = grad.shape[1]
    grad_weight = grad.new_zeros((num_embeddings, width)) if run else grad.new_empty((num_embeddings, width))
    if not run or flat.numel() == 0 or width == 0:
        return grad_weight
    block_n = max(16, min(next_pow2(width), INTERPRET_MAX_BLOCK_N if INTERPRET else 256))
    if flat.numel() <= SMALL_BATCH_TOKENS:
        flat = flat.contiguous()
        block_j = max(16, 8192 // block_n) if not INTERPRET else 64  # the [BLOCK_J, BLOCK_N] tile of rows
        args = (grad, flat, grad_weight, flat.numel(), num_embeddings, width, grad.stride(0), grad.stride(1), pad,
                *split_float(scale))  # fmt: skip
        grid = (flat.numel(), cdiv(width, block_n))
        meta = dict(BLOCK_J=block_j, BLOCK_N=block_n)
        launch(_embedding_bwd_small_kernel, None, lambda _: grid, args, {}, meta, dict(meta, num_warps=4))
        return grad_weight
    sorted_ids, order = torch.sort(flat.to(torch.int64), stable=True)
    args = (grad, sorted_ids, order, grad_weight, flat.numel(), num_embeddings, width, grad.stride(0), grad.stride(1),
            pad, *split_float(scale))  # fmt: skip
    grid = (flat.numel(), cdiv(width, block_n))
    meta = dict(BLOCK_J=8 if INTERPRET else 16, BLOCK_N=block_n)
    warps = 4 if block_n >= 128 else 1
    launch(_embedding_bwd_kernel, None, lambda _: grid, args, {}, meta, dict(meta, num_warps=warps))
    return grad_weight


def _lookup_impl(weight: Tensor, ids: Tensor, padding_idx: int | None, scale: float) -> Tensor:
    """e [numel(ids), n] = weight[ids] · scale."""
    return _lookup(weight, ids, padding_idx, scale, run=True)


def _lookup_fake(weight: Tensor, ids: Tensor, padding_idx: int | None, scale: float) -> Tensor:
    return _lookup(weight, ids, padding_idx, scale, run=False)


def _lookup_backward_impl(
    grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float
) -> Tensor:
    """Dense [V, n] gradient of the table; only touched, non-padding rows are non-zero."""
    return _lookup_backward(grad, ids, num_embeddings, padding_idx, scale, run=True)


def _lookup_backward_fake(
    grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float
) -> Tensor:
    return _lookup_backward(grad, ids, num_embeddings, padding_idx, scale, run=False)


embedding_lookup_op = register_op("embedding_lookup_triton", _lookup_impl, _lookup_fake)
embedding_lookup_backward_op = register_op(
    "embedding_lookup_triton_backward", _lookup_backward_impl, _lookup_backward_fake
)


_setup_context, _backward_autograd = embedding_autograd(embedding_lookup_backward_op)
embedding_lookup_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def embedding_lookup(weight: Tensor, ids_flat: Tensor, padding_idx: int | None, scale: float) -> Tensor:
    """Differentiable Map step: weight [V, n], ids_flat [T] int32/int64 → [T, n]."""
    return embedding_lookup_op(weight, ids_flat, padding_idx, scale)
