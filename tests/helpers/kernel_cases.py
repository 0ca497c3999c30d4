"""Random kernel inputs and the check of a backend against the float64 reference, shared by the
CPU (torch, Triton interpreter) and GPU kernel tests."""

from __future__ import annotations

import torch

import rrhf_kernels as K
from rrhf_kernels.tolerances import GRAD_ATOL, GRAD_RTOL, SCORE_ATOL, SCORE_RTOL


def make_case(n, t, v, dtype=torch.float32, masked_frac=0.3, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    drop = torch.rand(n, t, generator=gen) < masked_frac
    labels[drop] = -100
    return logits, labels


def check_against_reference(logits, labels, length_penalty, backend, ignore_index=-100, **kw):
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_(True)
    ref_x = logits.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(logits.shape[0], generator=gen)  # non-uniform upstream grads

    if kw:
        sums, counts = K.candidate_logprob_sums(x, labels, ignore_index, backend, **kw)
        scores = (sums / counts.clamp(min=1).to(sums.dtype) ** length_penalty).float()
    else:
        scores = K.candidate_logprobs(x, labels, length_penalty, ignore_index, backend)
    assert scores.dtype == torch.float32 and scores.shape == (logits.shape[0],)
    (scores * weights).sum().backward()

    ref = K.reference_candidate_logprobs(ref_x, labels, length_penalty, ignore_index)
    (ref * weights.double()).sum().backward()

    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), ref.detach(), rtol=SCORE_RTOL[dtype], atol=SCORE_ATOL)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(
        x.grad.double(), ref_x.grad.double(), rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL
    )
    # ignored tokens get exactly zero gradient
    ignored = labels == ignore_index
    assert (x.grad[ignored] == 0).all()
    return scores, x.grad
