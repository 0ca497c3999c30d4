"""Memory-lean torch backend: chunked over valid tokens, forward and backward.

Never builds a log-softmax of the whole [N, T, V] tensor: each chunk of valid tokens is copied
to the accumulation dtype, reduced to a per-token logsumexp (saved, [K] floats), and dropped.
The backward recomputes softmax per chunk from the saved logsumexp and writes the gradient
rows straight into one logits-sized buffer; ignored tokens are never read.
"""

from __future__ import annotations

import torch

# Default chunk: about this many bytes of accumulation-dtype logits at a time. Big enough that
# the per-chunk Python overhead is negligible, small enough to stay a fraction of the logits.
DEFAULT_CHUNK_BYTES = 16 * 2**20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 when the logits are float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int, dtype: torch.dtype, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    itemsize = torch.finfo(acc_dtype(dtype)).bits // 8
    return max(1, DEFAULT_CHUNK_BYTES // (vocab * itemsize))


def forward(logits, labels, ignore_index, chunk_rows=None):
    """Returns (sums [N] acc dtype, saved tensors for backward)."""
    n_rows, _, vocab = logits.shape
    acc = acc_dtype(logits.dtype)
    row_idx, pos_idx = (labels != ignore_index).nonzero(as_tuple=True)  # valid tokens only
    targets = labels[row_idx, pos_idx].long()
    lse = torch.empty(row_idx.numel(), dtype=acc, device=logits.device)
    token_logprobs = torch.empty_like(lse)
    step = _chunk_rows(vocab, logits.dtype, chunk_rows)
    for start in range(0, row_idx.numel(), step):
        sl = slice(start, start + step)
        x = logits[row_idx[sl], pos_idx[sl]].to(acc)  # [c, V] copy of this chunk only
        lse[sl] = torch.logsumexp(x, dim=-1)
        token_logprobs[sl] = x.gather(1, targets[sl, None]).squeeze(1) - lse[sl]
    sums = torch.zeros(n_rows, dtype=acc, device=logits.device)
    sums.index_add_(0, row_idx, token_logprobs)
    return sums, (row_idx, pos_idx, targets, lse)


def backward(grad_sums, logits, saved, chunk_rows=None):
    """d sums / d logits: grad_sums[n] * (onehot(target) - softmax) on valid tokens, else 0."""
    row_idx, pos_idx, targets, lse = saved
    acc = lse.dtype
    # Empty, then zero only the ignored positions: one write pass over the gradient, not two.
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    ignored = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    ignored[row_idx, pos_idx] = False
    grad[ignored] = 0
    coef = grad_sums.to(acc)[row_idx]  # [K]
    step = _chunk_rows(logits.shape[-1], logits.dtype, chunk_rows)
    for start in range(0, row_idx.numel(), step):
        sl = slice(start, start + step)
        x = logits[row_idx[sl], pos_idx[sl]].to(acc)  # fresh copy: safe to edit in place
        x.sub_(lse[sl, None]).exp_()  # softmax
        x.mul_(-coef[sl, None])
        x.scatter_add_(1, targets[sl, None], coef[sl, None])
        grad[row_idx[sl], pos_idx[sl]] = x.to(logits.dtype)
    return grad
