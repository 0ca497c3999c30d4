"""Triton tile operations for the hidden-state path (_hidden_tiles.py): one program per tile row.

`lse_update` folds a [rows, cols] tile of logits into each row's running max and sum of
exponentials (float32) and picks the target's logit when it lies in the tile; `grad` overwrites
the tile in place with coef * (onehot(target) - softmax), so the gradient of a tile costs no
memory beyond the tile. The matrix products around them stay cuBLAS's (torch).

Imported lazily, like _triton_backend: triton decides at @jit time whether it interprets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_backend import _interpreting, row_max_and_sum

MAX_BLOCK = 4096


@triton.jit
def _lse_update_kernel(
    tile_ptr, max_ptr, sum_ptr, target_logit_ptr, targets_ptr, v0, C, stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * stride
    tile_max, tile_sum = row_max_and_sum(row_ptr, C, BLOCK)
    old_max = tl.load(max_ptr + row)
    old_sum = tl.load(sum_ptr + row)
    both_max = tl.maximum(old_max, tile_max)
    tl.store(max_ptr + row, both_max)
    tl.store(sum_ptr + row, old_sum * tl.exp(old_max - both_max)
             + tile_sum * tl.exp(tile_max - both_max))
    local = tl.load(targets_ptr + row) - v0
    if (local >= 0) & (local < C):
        tl.store(target_logit_ptr + row, tl.load(row_ptr + local).to(tl.float32))


@triton.jit
def _grad_kernel(tile_ptr, lse_ptr, coef_ptr, targets_ptr, v0, C, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    local = tl.load(targets_ptr + row) - v0
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < C
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = coef * (tl.where(cols == local, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(row_ptr + cols, grad.to(tile_ptr.dtype.element_ty), mask=in_row)


def _block(cols: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(cols))


def _check(tile: torch.Tensor) -> None:
    if tile.device.type != "cuda" and not _interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU "
                           "tensors; use backend='torch' or 'auto' instead")
    if tile.stride(1) != 1:
        raise RuntimeError("a tile must be contiguous along the vocabulary")


class TritonTiles:
    """The tile operations of _hidden_tiles.TorchTiles, as Triton kernels (float32 state)."""

    @staticmethod
    def lse_update(tile, run_max, run_sum, target_logit, targets, v0):
        _check(tile)
        rows, cols = tile.shape
        block = _block(cols)
        _lse_update_kernel[(rows,)](tile, run_max, run_sum, target_logit, targets.contiguous(),
                                    v0, cols, tile.stride(0), BLOCK=block,
                                    num_warps=8 if block >= 2048 else 4)

    @staticmethod
    def grad(tile, lse, coef, targets, v0):
        _check(tile)
        rows, cols = tile.shape
        block = _block(cols)
        _grad_kernel[(rows,)](tile, lse.float().contiguous(), coef.float().contiguous(),
                              targets.contiguous(), v0, cols, tile.stride(0), BLOCK=block,
                              num_warps=8 if block >= 2048 else 4)
        return tile
