"""Triton backend: one program per token row, vocabulary tiled, online logsumexp.

Forward reads each valid row of logits once and saves only its logsumexp (fp32, one float per
token). Backward reads each valid row once more, recomputes softmax from the saved logsumexp,
and writes the gradient row once, in the logits' dtype; an ignored row is written as zeros
without reading its logits. Offsets are int64, so N * T * V may exceed 2**31.

Imported lazily by rrhf_kernels.api: triton decides at @jit time whether it interprets
(TRITON_INTERPRET=1, CPU tensors) or compiles (CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest vocabulary tile: one pass over V in tiles, never a block of size V


@triton.jit
def row_max_and_sum(row_ptr, n_cols, BLOCK: tl.constexpr):
    """(max, sum of exp(x - max)) over one row's n_cols values, read once, tile by tile.

    Per-lane running max and sum of exp; lanes are combined once at the end. A lane that has
    only seen -inf (padding past the row's end) shifts by 0 instead of -inf, so it adds
    exp(-inf) = 0 rather than NaN.
    """
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    return row_max, tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, lse_ptr, token_lp_ptr,
    T, V, stride_ln, stride_lt, stride_bn, stride_bt, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_bn + t * stride_bt).to(tl.int64)
    if label != ignore_index:
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        row_max, row_sum = row_max_and_sum(row_ptr, V, BLOCK_V)
        lse = row_max + tl.log(row_sum)
        target = tl.load(row_ptr + label).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(token_lp_ptr + row, target - lse)
    else:
        tl.store(lse_ptr + row, 0.0)
        tl.store(token_lp_ptr + row, 0.0)


@triton.jit
def _backward_kernel(
    logits_ptr, labels_ptr, lse_ptr, coef_ptr, grad_ptr,
    T, V, stride_ln, stride_lt, stride_bn, stride_bt, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_bn + t * stride_bt).to(tl.int64)
    grad_row = grad_ptr + row * V  # the gradient is allocated contiguous [N, T, V]
    if label != ignore_index:
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        lse = tl.load(lse_ptr + row)
        coef = tl.load(coef_ptr + n)  # d loss / d sums[n], fp32
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            prob = tl.exp(x - lse)
            grad = coef * (tl.where(cols == label, 1.0, 0.0) - prob)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    else:
        zeros = tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row + cols, zeros, mask=cols < V)


def _block(vocab: int, block_size: int | None) -> int:
    if block_size is None:
        return min(MAX_BLOCK, triton.next_power_of_2(vocab))
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _prepare(logits: torch.Tensor, labels: torch.Tensor):
    if logits.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before rrhf_kernels "
            "first uses triton (for CPU tensors); use backend='torch' or 'auto' instead"
        )
    # Rows may be strided anywhere, but each row must be contiguous over the vocabulary.
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # knowingly: one copy, only for a strided vocab axis
    return logits, labels


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forward(logits, labels, ignore_index, block_size=None):
    logits, labels = _prepare(logits, labels)
    n_rows, seq, vocab = logits.shape
    lse = torch.empty(n_rows * seq, dtype=torch.float32, device=logits.device)
    token_lp = torch.empty(n_rows, seq, dtype=torch.float32, device=logits.device)
    block = _block(vocab, block_size)
    _forward_kernel[(n_rows * seq,)](
        logits, labels, lse, token_lp,
        seq, vocab, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
        ignore_index, BLOCK_V=block, num_warps=_num_warps(block),
    )
    return token_lp.sum(dim=1), (lse,)


def backward(grad_sums, logits, labels, saved, ignore_index, block_size=None):
    (lse,) = saved
    logits, labels = _prepare(logits, labels)
    n_rows, seq, vocab = logits.shape
    grad = torch.empty((n_rows, seq, vocab), dtype=logits.dtype, device=logits.device)
    coef = grad_sums.float().contiguous()
    block = _block(vocab, block_size)
    _backward_kernel[(n_rows * seq,)](
        logits, labels, lse, coef, grad,
        seq, vocab, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
        ignore_index, BLOCK_V=block, num_warps=_num_warps(block),
    )
    return grad
