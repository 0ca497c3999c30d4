"""Memory-lean torch backend: chunked over token rows, forward and backward.

Never builds a log-softmax of the whole [N, T, V] tensor. The logits are walked in slabs of
consecutive token rows (views, no gather copies) that start and end on valid tokens, so prompt
and padding runs between slabs are never read. Forward: per slab one accumulation-dtype
temporary, reduced to a per-token logsumexp (the only thing saved besides small index
tensors). Backward: recompute softmax from the saved logsumexp and write the gradient slab
straight into the one logits-sized gradient buffer (in place when the dtypes match).
"""

from __future__ import annotations

from bisect import bisect_left

import torch

# Slab size: a quarter of the logits' bytes (as accumulation dtype), clamped to [8, 512] MiB.
# Peak extra memory is then about the gradient (one logits buffer) plus one slab temporary.
# Few, large slabs keep the per-op overhead small (it is large on a busy multi-threaded CPU).
SLAB_FRACTION = 4
MIN_SLAB_BYTES = 8 * 2**20
MAX_SLAB_BYTES = 512 * 2**20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 when the logits are float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slab_rows(logits: torch.Tensor, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    row_bytes = logits.shape[-1] * (torch.finfo(acc_dtype(logits.dtype)).bits // 8)
    target = logits.numel() * logits.element_size() // SLAB_FRACTION
    return max(1, min(MAX_SLAB_BYTES, max(MIN_SLAB_BYTES, target)) // row_bytes)


def _row_views(tensor: torch.Tensor, like: list | None = None) -> list[tuple[torch.Tensor, int]]:
    """2-D [rows, V] views covering tensor, each with its first row's flat index n * T + t.

    One view when N and T merge without a copy, else one per candidate; `like` forces the
    same split as another tensor's views.
    """
    if like is None or len(like) == 1:
        try:
            return [(tensor.view(-1, tensor.shape[-1]), 0)]
        except RuntimeError:
            pass
    return [(tensor[n], n * tensor.shape[1]) for n in range(tensor.shape[0])]


def _slabs(valid_flat: list[int], lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """Row ranges [s, e) within [lo, hi), at most `step` rows, starting and ending on valid
    rows; valid_flat is the sorted list of valid flat row indices."""
    out = []
    i = bisect_left(valid_flat, lo)
    while i < len(valid_flat) and valid_flat[i] < hi:
        start = valid_flat[i]
        j = bisect_left(valid_flat, min(start + step, hi), lo=i)
        out.append((start, valid_flat[j - 1] + 1))
        i = j
    return out


def forward(logits, labels, ignore_index, chunk_rows=None):
    """Returns (sums [N] acc dtype, saved tensors for backward)."""
    n_rows, seq, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    valid = (labels != ignore_index).reshape(-1)
    targets = torch.where(valid, labels.reshape(-1), 0).long()  # any in-range index if ignored
    lse = torch.zeros(n_rows * seq, dtype=acc, device=logits.device)
    token_logprobs = torch.zeros_like(lse)
    valid_flat = valid.nonzero().squeeze(1).tolist()
    step = _slab_rows(logits, chunk_rows)
    for rows, first in _row_views(logits):
        for s, e in _slabs(valid_flat, first, first + rows.shape[0], step):
            slab = rows[s - first : e - first]
            row_max = slab.amax(dim=1, keepdim=True).to(acc)
            target = slab.gather(1, targets[s:e, None]).squeeze(1).to(acc)
            x = slab - row_max  # new tensor, promoted to acc: the one slab temporary
            slab_lse = x.exp_().sum(dim=1).log_().add_(row_max.squeeze(1))
            lse[s:e] = slab_lse
            token_logprobs[s:e] = target - slab_lse
    # where, not multiply: an ignored row inside a slab may hold garbage (inf/NaN) logits
    token_logprobs = torch.where(valid, token_logprobs, 0).view(n_rows, seq)
    return token_logprobs.sum(dim=1), (valid, targets, lse)


def backward(grad_sums, logits, saved, chunk_rows=None):
    """d sums / d logits: grad_sums[n] * (onehot(target) - softmax) on valid tokens, else 0."""
    valid, targets, lse = saved
    n_rows, seq, _ = logits.shape
    acc = lse.dtype
    coef = (grad_sums.to(acc)[:, None].expand(n_rows, seq).reshape(-1)) * valid  # [N * T]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    valid_flat = valid.nonzero().squeeze(1).tolist()
    step = _slab_rows(logits, chunk_rows)
    views = _row_views(logits)
    for (rows, first), (grad_rows, _) in zip(views, _row_views(grad, views), strict=True):
        done = 0  # rows of this view written so far
        for s, e in _slabs(valid_flat, first, first + rows.shape[0], step):
            grad_rows[done : s - first].zero_()  # ignored rows between slabs: never read
            slab, out = rows[s - first : e - first], grad_rows[s - first : e - first]
            if logits.dtype == acc:
                x = torch.sub(slab, lse[s:e, None], out=out)  # compute in the gradient itself
            else:
                x = slab - lse[s:e, None]  # promoted to acc: the one slab temporary
            x.exp_().mul_(-coef[s:e, None])  # -coef * softmax
            x.scatter_add_(1, targets[s:e, None], coef[s:e, None])
            ignored_inside = (~valid[s:e]).nonzero().squeeze(1)
            if ignored_inside.numel():
                x.index_fill_(0, ignored_inside, 0)  # exact zeros even for garbage logits
            if x is not out:
                out.copy_(x)
            done = e - first
        grad_rows[done:].zero_()
    return grad
