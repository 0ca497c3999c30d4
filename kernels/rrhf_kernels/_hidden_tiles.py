"""Log-prob sums straight from hidden states, tiled over tokens and vocabulary.

Only the valid tokens (label != ignore_index) are visited, `rows` of them at a time; for each
token chunk the vocabulary is walked in tiles of `cols` entries. A tile of logits is
``h_chunk @ weight[v0:v1].T (+ bias)`` in the weight's dtype (what the model's Linear head would
compute), and is folded into a running max and sum of exponentials per token (online
logsumexp), in float32. Nothing [N, T, V]-sized is ever allocated: peak extra memory is a few
tile-sized buffers, plus per-token floats and one [rows, H] accumulator.

The gradient of sum_n coef[n] * sums[n] w.r.t. a tile of logits is
``coef[token] * (onehot(target) - softmax)``; it needs the token's final logsumexp, so a tile is
computed again once that is known (a second vocabulary pass) unless the caller gives the
logsumexp (the trainer's scoring pass computed it) or one tile spans the whole vocabulary.
From the tile's gradient: d hidden += g @ W_tile, d weight[tile] += g.T @ h, d bias += sum(g).

Tile operations come from a backend: `TorchTiles` here (plain torch, any device), the Triton
kernels in _triton_tiles.py on CUDA. The matrix products are torch's (cuBLAS / CPU BLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tile budget: TILE_SHARE of the bytes of the [valid tokens x V] logits in the weight's dtype,
# divided by what one tile element costs at its peak (the matmul output, a float32 copy or
# temporary: 8 bytes for float32, 10 for bf16/fp16, 16 for float64), clamped. Peak extra memory
# then stays under 10 % of one logits buffer with the per-token vectors and the [rows, H]
# accumulator on top, in few, large tiles (each op on a tile has a fixed cost, large on a busy
# multi-threaded CPU).
TILE_SHARE = 0.07
MIN_TILE = 2**15
MAX_TILE = 2**24
ROW_TARGET = 512  # token rows per chunk when the vocabulary must be split
_TILE_BYTES = {torch.float32: 8, torch.float64: 16}


def tile_shape(tokens: int, vocab: int, rows: int | None, cols: int | None,
               dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(token rows, vocabulary columns) per tile; explicit values win."""
    logits_bytes = tokens * vocab * dtype.itemsize
    budget = int(TILE_SHARE * logits_bytes / _TILE_BYTES.get(dtype, 10))
    budget = min(MAX_TILE, max(MIN_TILE, budget))
    if cols is None:
        cols = min(vocab, max(1, budget // max(1, min(tokens, ROW_TARGET))))
    cols = max(1, min(vocab, int(cols)))
    if rows is None:
        rows = budget // cols if cols == vocab else ROW_TARGET
    return max(1, min(max(tokens, 1), int(rows))), cols


class TorchTiles:
    """Tile operations in plain torch (float32 math on a tile of any dtype)."""

    @staticmethod
    def lse_update(tile, run_max, run_sum, target_logit, targets, v0):
        """Fold a [r, c] tile into the running max/sum (float32 [r], in place); store the
        target's logit where the target falls in this tile."""
        x = tile.to(run_max.dtype)
        new_max = torch.maximum(run_max, x.amax(dim=1))
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        run_sum.mul_(torch.exp(run_max - shift)).add_((x - shift[:, None]).exp_().sum(dim=1))
        run_max.copy_(new_max)
        local = targets - v0
        inside = (local >= 0) & (local < tile.shape[1])
        picked = x.gather(1, local.clamp(0, tile.shape[1] - 1)[:, None]).squeeze(1)
        target_logit.copy_(torch.where(inside, picked, target_logit))

    @staticmethod
    def grad(tile, lse, coef, targets, v0):
        """coef * (onehot(target) - exp(tile - lse)) in the tile's dtype (may reuse `tile`)."""
        x = tile.to(lse.dtype).sub_(lse[:, None]).exp_().mul_(-coef[:, None])
        local = targets - v0
        inside = (local >= 0) & (local < tile.shape[1])
        x.scatter_add_(1, local.clamp(0, tile.shape[1] - 1)[:, None],
                       torch.where(inside, coef, torch.zeros_like(coef))[:, None])
        return x if tile.dtype == x.dtype else tile.copy_(x)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 weights (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(h, weight, bias, v0, v1):
    return F.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1])


def _chunk_lse(ops, h, weight, bias, targets, cols):
    """Online logsumexp and target logit of every row of h over the whole vocabulary."""
    r, acc = h.shape[0], acc_dtype(weight.dtype)
    run_max = torch.full((r,), float("-inf"), dtype=acc, device=h.device)
    run_sum = torch.zeros(r, dtype=acc, device=h.device)
    target_logit = torch.zeros(r, dtype=acc, device=h.device)
    last = None
    for v0 in range(0, weight.shape[0], cols):
        last = None  # free the previous tile before the next one is made
        last = _tile(h, weight, bias, v0, min(v0 + cols, weight.shape[0]))
        ops.lse_update(last, run_max, run_sum, target_logit, targets, v0)
    return run_max + torch.log(run_sum), target_logit, last


def token_logprobs(ops, hidden, weight, bias, flat_rows, targets, rows, cols):
    """Forward only: (log-prob, logsumexp) of each listed token, float32 [M] each."""
    seq = hidden.shape[1]
    lp = torch.empty(len(flat_rows), dtype=acc_dtype(weight.dtype), device=hidden.device)
    lse = torch.empty_like(lp)
    for c0 in range(0, len(flat_rows), rows):
        idx = flat_rows[c0:c0 + rows]
        h = hidden[idx // seq, idx % seq].to(weight.dtype)
        chunk_lse, target_logit, _ = _chunk_lse(ops, h, weight, bias, targets[c0:c0 + rows], cols)
        lse[c0:c0 + rows] = chunk_lse
        lp[c0:c0 + rows] = target_logit - chunk_lse
    return lp, lse


def token_grads(ops, hidden, weight, bias, flat_rows, targets, coef, rows, cols, *, lse=None,
                need=(True, True, True)):
    """Gradients of sum_j coef[j] * logprob_j (j over the listed tokens) w.r.t. hidden, weight
    and bias (None where not needed), and the tokens' log-probs (float32 [M]).

    `lse`: the tokens' logsumexp if already known (float32 [M]); otherwise it is computed here,
    chunk by chunk, before the gradient pass (no extra pass when one tile spans the vocabulary).
    """
    seq, vocab = hidden.shape[1], weight.shape[0]
    need_h, need_w, need_b = need
    grad_h = torch.zeros_like(hidden) if need_h else None
    acc = acc_dtype(weight.dtype)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b and bias is not None else None
    lp = torch.empty(len(flat_rows), dtype=acc, device=hidden.device)
    for c0 in range(0, len(flat_rows), rows):
        idx = flat_rows[c0:c0 + rows]
        n_idx, t_idx = idx // seq, idx % seq
        h = hidden[n_idx, t_idx].to(weight.dtype)
        tgt, k = targets[c0:c0 + rows], coef[c0:c0 + rows]
        reuse = None
        if lse is None:
            chunk_lse, target_logit, last = _chunk_lse(ops, h, weight, bias, tgt, cols)
            reuse = last if cols >= vocab else None  # one tile: no second pass
            del last
        else:
            chunk_lse = lse[c0:c0 + rows]
            target_logit = torch.zeros_like(chunk_lse)
        acc_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            tile = g = None  # free the previous tile before the next one is made
            tile = reuse if reuse is not None else _tile(h, weight, bias, v0, v1)
            if lse is not None:  # the target logit is read from the tile that holds it
                local = tgt - v0
                inside = (local >= 0) & (local < v1 - v0)
                picked = tile.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1).to(acc)
                target_logit = torch.where(inside, picked, target_logit)
            g = ops.grad(tile, chunk_lse, k, tgt, v0)
            if need_h:
                acc_h += (g @ weight[v0:v1]).to(acc)
            if need_w:
                grad_w[v0:v1] += (g.t() @ h).to(acc)
            if grad_b is not None:
                grad_b[v0:v1] += g.to(acc).sum(dim=0)
        tile = g = reuse = None
        lp[c0:c0 + rows] = target_logit - chunk_lse
        if need_h:
            grad_h[n_idx, t_idx] = acc_h.to(grad_h.dtype)
    return grad_h, grad_w, grad_b, lp
