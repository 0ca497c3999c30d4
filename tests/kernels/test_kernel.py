"""rrhf_kernels against the float64 reference: forward, backward, edge rows, dtypes, backends.

Tolerances: rrhf_kernels/tolerances.py (stated once there, with the reason for each number;
the GPU tests and the GPU suite use the same ones).
"""

from __future__ import annotations

import pytest
import torch
from helpers.kernel_cases import check_against_reference, make_case

import rrhf_kernels as K
from rrhf_kernels.tolerances import SCORE_ATOL, SCORE_RTOL

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not K.triton_available(), reason="triton not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
def test_matches_reference_length_penalties(backend, length_penalty):
    logits, labels = make_case(3, 4, 97, seed=int(length_penalty * 10))
    check_against_reference(logits, labels, length_penalty, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 1, 130), (2, 3, 257), (4, 4, 1000), (1, 7, 2)])
def test_matches_reference_shapes(backend, shape):
    # vocabularies not a power of two, T = 1, V tiny
    logits, labels = make_case(*shape, seed=sum(shape))
    check_against_reference(logits, labels, 1.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_valid_tokens_give_zero(backend):
    logits, labels = make_case(3, 4, 50, seed=3)
    labels[0] = -100  # whole row masked
    labels[2, :] = -100
    labels[1, 0] = 7
    scores, grad = check_against_reference(logits, labels, 1.0, backend)
    assert scores[0].item() == 0.0 and scores[2].item() == 0.0
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    sums, counts = K.candidate_logprob_sums(logits, labels, backend=backend)
    assert counts.tolist() == [0, int((labels[1] != -100).sum()), 0]
    assert counts.dtype == torch.int64 and sums[0].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_masked_everywhere(backend):
    logits, labels = make_case(2, 3, 20)
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    scores = K.candidate_logprobs(x, labels, backend=backend)
    scores.sum().backward()
    assert scores.tolist() == [0.0, 0.0]
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    logits, labels = make_case(2, 3, 300, dtype=dtype, seed=5)
    check_against_reference(logits, labels, 1.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_labels(backend):
    logits, labels = make_case(2, 5, 64, seed=9)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels).to(torch.int32)
    check_against_reference(logits, labels, 1.0, backend, ignore_index=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base, labels_base = make_case(4, 6, 90, seed=11)
    logits = base.transpose(0, 1)  # [6, 4, 90], non-contiguous rows
    labels = labels_base.t()
    assert not logits.is_contiguous() and not labels.is_contiguous()
    check_against_reference(logits, labels, 1.0, backend)
    sliced = base[:, ::2, :]  # strided time axis
    check_against_reference(sliced, labels_base[:, ::2], 0.5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    logits, labels = make_case(2, 3, 40, seed=4, masked_frac=0.0)
    logits[0, 0] *= 1000  # huge spread: naive exp would overflow
    logits[1, 1] = 0.0  # uniform row: log-prob is -log(V)
    scores, _ = check_against_reference(logits, labels, 1.0, backend)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 1000])
def test_torch_chunking_does_not_change_results(chunk_rows):
    logits, labels = make_case(3, 5, 61, seed=chunk_rows)
    check_against_reference(logits, labels, 1.0, "torch", chunk_rows=chunk_rows)


def test_gradcheck_torch_backend_float64():
    logits, labels = make_case(2, 3, 11, dtype=torch.float64, seed=2)
    labels[1, 2] = -100
    x = logits.clone().requires_grad_(True)

    def sums_fn(z):
        return K.candidate_logprob_sums(z, labels, backend="torch", chunk_rows=2)[0]

    assert torch.autograd.gradcheck(sums_fn, (x,))

    def scores_fn(z):  # the contract's normalisation, composed in float64
        sums, counts = K.candidate_logprob_sums(z, labels, backend="torch")
        return sums / counts.clamp(min=1).double() ** 0.5

    assert torch.autograd.gradcheck(scores_fn, (x,))


def test_auto_backend_uses_torch_on_cpu():
    logits, labels = make_case(2, 2, 10)
    a = K.candidate_logprobs(logits, labels, backend="auto")
    b = K.candidate_logprobs(logits, labels, backend="torch")
    assert torch.equal(a, b)


def test_scores_equal_sums_over_counts():
    logits, labels = make_case(3, 6, 33, seed=8)
    sums, counts = K.candidate_logprob_sums(logits, labels, backend="torch")
    for lp in (0.0, 1.0, 2.0):
        scores = K.candidate_logprobs(logits, labels, lp, backend="torch")
        torch.testing.assert_close(scores, sums / counts.clamp(min=1).float() ** lp)


def test_empty_batch_and_empty_time():
    for shape in [(0, 3, 10), (2, 0, 10)]:
        x = torch.randn(*shape, requires_grad=True)
        labels = torch.zeros(shape[:2], dtype=torch.long)
        scores = K.candidate_logprobs(x, labels, backend="torch")
        assert scores.shape == (shape[0],) and (scores == 0).all()
        scores.sum().backward()


@pytest.mark.parametrize(
    "logits, labels, kwargs, match",
    [
        (torch.randn(2, 3), torch.zeros(2, dtype=torch.long), {}, r"\[N, T, V\]"),
        (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {}, "labels must be"),
        (torch.randn(2, 3, 4), torch.zeros(2, 3), {}, "integer"),
        (torch.randn(2, 3, 4), torch.full((2, 3), 4), {}, "outside the vocabulary"),
        (torch.randn(2, 3, 4), torch.full((2, 3), -5), {}, "outside the vocabulary"),
        (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), {"backend": "cuda"}, "backend"),
        (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
         {"length_penalty": float("nan")}, "finite"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), {}, "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        K.candidate_logprobs(logits, labels, **kwargs)


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, rrhf_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("backend,examples", [("torch", 25), pytest.param(
    "triton", 8, marks=pytest.mark.skipif(not K.triton_available(), reason="no triton"))])
def test_random_shapes_match_reference(backend, examples):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(
        n=st.integers(1, 3), t=st.integers(1, 4), v=st.integers(1, 300),
        masked=st.sampled_from([0.0, 0.5, 1.0]), lp=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        seed=st.integers(0, 2**16), block=st.sampled_from([16, 64, None]),
    )
    def check(n, t, v, masked, lp, seed, block):
        logits, labels = make_case(n, t, v, masked_frac=masked, seed=seed)
        kw = {"block_size": block} if backend == "triton" and block else {}
        check_against_reference(logits, labels, lp, backend, **kw)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_garbage_in_ignored_rows_does_not_leak(backend, chunk_rows):
    # Ignored positions (padding) may hold inf/NaN logits: scores and gradients stay clean.
    logits, labels = make_case(2, 6, 40, seed=21, masked_frac=0.0)
    labels[0, 2] = labels[1, 0] = labels[1, 5] = -100
    logits[0, 2] = float("nan")
    logits[1, 0] = float("inf")
    logits[1, 5, :3] = float("-inf")
    kw = {"chunk_rows": chunk_rows} if backend == "torch" and chunk_rows else {}
    scores, grad = check_against_reference(logits.nan_to_num(0, 0, 0), labels, 1.0, backend)
    x = logits.clone().requires_grad_(True)
    sums, _ = K.candidate_logprob_sums(x, labels, backend=backend, **kw)
    sums.sum().backward()
    assert torch.isfinite(sums).all() and torch.isfinite(x.grad).all()
    assert (x.grad[labels == -100] == 0).all()
    ref_sums, _ = K.reference_logprob_sums(logits.nan_to_num(0, 0, 0), labels)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=SCORE_RTOL[logits.dtype],
                               atol=SCORE_ATOL)
