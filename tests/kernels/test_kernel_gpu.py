"""The compiled Triton kernel on a real GPU (marker `gpu`; run by the GPU suite, not by default).

Tolerances: rrhf_kernels/tolerances.py, as in tests/kernels/test_kernel.py. The large cases check what the interpreter cannot:
compiled code paths, vocabularies of 128k-262k, and element offsets beyond 2**31 (int64).
"""

from __future__ import annotations

import pytest
import torch

import rrhf_kernels as K
from rrhf_kernels.tolerances import (
    BACKEND_ATOL,
    BACKEND_RTOL,
    GRAD_ATOL,
    GRAD_RTOL,
    SCORE_ATOL,
    SCORE_RTOL,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _case(n, t, v, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, t, v, device="cuda", generator=gen) * 2).to(dtype)
    labels = torch.randint(0, v, (n, t), device="cuda", generator=gen)
    labels[:, : t // 4] = -100
    labels[-1] = -100
    return logits, labels


def _rowwise_reference(logits, labels, rows):
    """float64 sums for a few (n) rows only: a full float64 copy would not fit for big shapes."""
    out = {}
    for n in rows:
        sums, _ = K.reference_logprob_sums(logits[n : n + 1], labels[n : n + 1])
        out[n] = sums.item()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 17, 1000), (4, 64, 32000), (2, 33, 50257)])
def test_triton_matches_reference_on_gpu(shape, dtype):
    logits, labels = _case(*shape, dtype)
    x = logits.clone().requires_grad_(True)
    ref_x = logits.clone().requires_grad_(True)
    weights = torch.randn(shape[0], device="cuda")
    for lp in (0.0, 1.0, 2.0):
        scores = K.candidate_logprobs(x, labels, lp, backend="triton")
        ref = K.reference_candidate_logprobs(ref_x, labels, lp)
        torch.testing.assert_close(scores.double(), ref, rtol=SCORE_RTOL[dtype], atol=SCORE_ATOL)
    scores = K.candidate_logprobs(x, labels, 1.0, backend="auto")
    (scores * weights).sum().backward()
    (K.reference_candidate_logprobs(ref_x, labels) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad.double(), rtol=GRAD_RTOL[dtype],
                               atol=GRAD_ATOL)
    assert x.grad.dtype == dtype
    assert (x.grad[labels == -100] == 0).all()


def test_triton_and_torch_backends_agree_bf16_llama3_vocab():
    logits, labels = _case(4, 256, 128256, torch.bfloat16, seed=1)
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    a = K.candidate_logprobs(x, labels, backend="triton")
    b = K.candidate_logprobs(y, labels, backend="torch")
    torch.testing.assert_close(a, b, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=GRAD_RTOL[torch.bfloat16],
                               atol=GRAD_ATOL)


def test_int64_offsets_beyond_2_pow_31():
    # 4 x 2048 x 262144 bf16 = 2.1e9 elements (> 2**31): rows past the 32-bit limit must be
    # right in both passes. About 4.3 GB logits + 4.3 GB gradient.
    n, t, v = 4, 2048, 262144
    assert n * t * v > 2**31
    logits = torch.empty(n, t, v, dtype=torch.bfloat16, device="cuda").normal_(0, 2)
    labels = torch.randint(0, v, (n, t), device="cuda")
    labels[:, :100] = -100
    x = logits.requires_grad_(True)
    sums, counts = K.candidate_logprob_sums(x, labels, backend="triton")
    ref = _rowwise_reference(logits.detach(), labels, rows=[0, n - 1])
    for row, value in ref.items():
        assert abs(sums[row].item() - value) <= SCORE_RTOL[torch.bfloat16] * abs(value) + SCORE_ATOL
    (grad,) = torch.autograd.grad(sums[n - 1], x)
    # last row's last token sits past 2**31 elements: check its gradient against float64
    tok = logits[n - 1, t - 1].double()
    expect = -torch.softmax(tok, dim=-1)
    expect[labels[n - 1, t - 1]] += 1
    torch.testing.assert_close(grad[n - 1, t - 1].double(), expect,
                               rtol=GRAD_RTOL[torch.bfloat16], atol=GRAD_ATOL)
    assert (grad[: n - 1] == 0).all() and (grad[n - 1, :100] == 0).all()
