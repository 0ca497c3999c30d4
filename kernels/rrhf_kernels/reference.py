"""Plain reference for the kernel: full log_softmax, gather, mask. Written for clarity, not speed.

Tests compare every backend against it in float64; the benchmark runs it in float32 as "the
reference code's approach" (what RRHF's train.py does: a full log-softmax copy of the logits).
"""

from __future__ import annotations

import torch


def reference_logprob_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of target log-probs over valid tokens, number of valid tokens).

    Sums are in `compute_dtype` and differentiable w.r.t. logits; counts are int64.
    """
    valid = labels != ignore_index
    logprobs = torch.log_softmax(logits.to(compute_dtype), dim=-1)  # [N, T, V]: the big copy
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))  # any in-range index
    token_logprobs = logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [N, T]
    token_logprobs = token_logprobs * valid.to(compute_dtype)
    return token_logprobs.sum(dim=-1), valid.sum(dim=-1)


def reference_candidate_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    length_penalty: float = 1.0,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """RRHF's p_i = sum_t log p(y_t) / max(count, 1) ** length_penalty, in `compute_dtype`."""
    sums, counts = reference_logprob_sums(logits, labels, ignore_index, compute_dtype)
    return sums / counts.clamp(min=1).to(compute_dtype) ** length_penalty


def reference_logprob_sums_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference_logprob_sums of the full logits hidden @ weight.T + bias, all in `compute_dtype`.

    Differentiable w.r.t. hidden, weight and bias; builds the whole [N, T, V] logits.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return reference_logprob_sums(logits, labels, ignore_index, compute_dtype)
