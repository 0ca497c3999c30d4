"""Log-prob sums from hidden states (no logits) against the float64 reference: forward, backward
(hidden, weight, bias; tied weights), the fused-gradient variant, edge rows, tiles, backends.

Tolerances: rrhf_kernels/tolerances.py (fp32 uses the kernel's score and gradient bounds;
bf16/fp16 the HIDDEN_LOWP_RTOL bound, relative to each tensor's scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rrhf_kernels as K
from rrhf_kernels.tolerances import (
    GRAD_ATOL,
    GRAD_RTOL,
    HIDDEN_LOWP_RTOL,
    SCORE_ATOL,
    SCORE_RTOL,
    sum_allowance,
)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not K.triton_available(), reason="triton not installed"))]


def make_case(n, t, h, v, dtype=torch.float32, masked_frac=0.3, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 2 / h**0.5).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < masked_frac] = -100
    coef = torch.randn(n, generator=gen)
    return hidden, weight, b, labels, coef


def _leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]


def _reference(hidden, weight, bias, labels, coef):
    h, w, b = _leaves(hidden, weight, bias)
    if hidden.dtype in HIDDEN_LOWP_RTOL:  # the head's logits, rounded as the model rounds them
        logits = F.linear(h, w, b).double()
    else:
        logits = F.linear(h.double(), w.double(), None if b is None else b.double())
    sums, counts = K.reference_logprob_sums(logits, labels)
    (sums * coef.double()).sum().backward()
    return sums.detach(), counts, [None if x is None else x.grad.double() for x in (h, w, b)]


def _close(got, want, dtype, kind):
    got = got.double()
    if dtype in HIDDEN_LOWP_RTOL:
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=HIDDEN_LOWP_RTOL[dtype] * max(scale, 1e-3))
    elif kind == "grad":
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL)
    else:
        torch.testing.assert_close(got, want, rtol=SCORE_RTOL[dtype], atol=SCORE_ATOL * got.numel())


def check(hidden, weight, bias, labels, coef, backend, **kw):
    """Both entry points against the reference: sums, counts and all three gradients."""
    dtype = hidden.dtype
    ref_sums, ref_counts, ref_grads = _reference(hidden, weight, bias, labels, coef)
    h, w, b = _leaves(hidden, weight, bias)
    sums, counts, lse = K.candidate_logprob_sums_from_hidden(h, w, labels, b, backend=backend,
                                                             return_lse=True, **kw)
    assert sums.shape == (hidden.shape[0],) and torch.equal(counts, ref_counts)
    assert torch.isfinite(sums).all()
    _close(sums, ref_sums, dtype, "sum")
    if dtype not in HIDDEN_LOWP_RTOL:
        for got, want, n in zip(sums.tolist(), ref_sums.tolist(), counts.tolist(), strict=True):
            assert abs(got - want) <= sum_allowance(dtype, want, n)
    (sums * coef.to(sums.dtype)).sum().backward()
    grads = [h.grad, w.grad, None if b is None else b.grad]
    for got, want in zip(grads, ref_grads, strict=True):
        if want is not None:
            assert got.dtype == dtype
            _close(got, want, dtype, "grad")
    assert (h.grad[labels == -100] == 0).all()  # ignored positions: exactly zero
    # the fused variant (gradient made in the forward), with and without the saved logsumexp
    for saved in (None, lse):
        h2, w2, b2 = _leaves(hidden, weight, bias)
        total, sums2, counts2 = K.weighted_logprob_sum_from_hidden(
            h2, w2, labels, coef, b2, backend=backend, lse=saved, **kw)
        assert not sums2.requires_grad and torch.equal(counts2, ref_counts)
        _close(sums2, ref_sums, dtype, "sum")
        _close(total.detach().reshape(1), (ref_sums * coef.double()).sum().reshape(1), dtype, "sum")
        (2.0 * total).backward()  # the upstream scalar scales the precomputed gradients
        for got, want in zip((h2.grad, w2.grad, None if b2 is None else b2.grad), ref_grads, strict=True):
            if want is not None:
                _close(got / 2, want, dtype, "grad")
    return sums, h.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 4, 5), (2, 1, 8, 130), (2, 3, 16, 257), (3, 4, 8, 1000),
                                   (1, 7, 3, 2)])
def test_matches_reference_shapes(backend, shape):
    # vocabularies not a power of two, T = 1, V tiny, one tile
    check(*make_case(*shape, seed=sum(shape)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiles", [(1, 1), (1, 7), (3, 50), (5, 1000), (2, 96)])
def test_tiles_do_not_change_results(backend, tiles):
    # several token chunks and vocabulary tiles: online logsumexp across tiles, targets in any tile
    rows, cols = tiles
    check(*make_case(3, 5, 8, 97, seed=rows * 100 + cols), backend,
          chunk_tokens=rows, chunk_vocab=cols)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    check(*make_case(3, 6, 16, 300, dtype=dtype, seed=5), backend)
    check(*make_case(3, 6, 16, 300, dtype=dtype, seed=6), backend, chunk_tokens=4, chunk_vocab=64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_rows_and_no_bias(backend):
    hidden, weight, _, labels, coef = make_case(4, 5, 8, 33, seed=3, bias=False)
    labels[0] = -100  # a row with no valid token
    labels[1, :] = -100
    labels[1, 4] = 7  # a row with one valid token
    sums, grad = check(hidden, weight, None, labels, coef, backend, chunk_tokens=2, chunk_vocab=8)
    assert sums[0].item() == 0.0 and (grad[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_masked(backend):
    hidden, weight, bias, labels, coef = make_case(2, 3, 4, 11, seed=4)
    labels[:] = -100
    h, w = _leaves(hidden, weight)
    sums, counts = K.candidate_logprob_sums_from_hidden(h, w, labels, bias, backend=backend)
    assert (sums == 0).all() and (counts == 0).all()
    sums.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()
    total, _, _ = K.weighted_logprob_sum_from_hidden(hidden, weight, labels, coef, bias, backend=backend)
    assert total.item() == 0.0


def test_tied_weight_gradient_adds_both_uses():
    # tied embeddings: the head's weight is also the input embedding; autograd adds both parts
    hidden, weight, _, labels, coef = make_case(2, 4, 8, 40, seed=8, bias=False)
    ids = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(9))
    w = weight.clone().requires_grad_(True)
    w_ref = weight.double().clone().requires_grad_(True)
    for fn, wt in ((None, w), ("ref", w_ref)):
        emb = F.embedding(ids, wt)
        h = hidden.to(wt.dtype) + emb
        if fn is None:
            total, _, _ = K.weighted_logprob_sum_from_hidden(h, wt, labels, coef, backend="torch",
                                                             chunk_tokens=3, chunk_vocab=16)
        else:
            sums, _ = K.reference_logprob_sums_from_hidden(h, wt, labels)
            total = (sums * coef.double()).sum()
        total.backward()
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=GRAD_RTOL[torch.float32], atol=GRAD_ATOL)


def test_frozen_weight_gets_no_gradient_and_non_contiguous_hidden():
    hidden, weight, bias, labels, coef = make_case(3, 6, 8, 50, seed=10)
    h = hidden.detach().clone().requires_grad_(True)
    view = h[:, 1:]  # a shifted view, as the trainer passes it
    total, _, _ = K.weighted_logprob_sum_from_hidden(view, weight, labels[:, 1:], coef, bias)
    total.backward()
    ref_h = hidden.double().requires_grad_(True)
    sums, _ = K.reference_logprob_sums_from_hidden(ref_h[:, 1:], weight, labels[:, 1:], bias)
    (sums * coef.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-6)
    assert not weight.requires_grad and weight.grad is None


def test_gradcheck_float64():
    hidden, weight, bias, labels, _ = make_case(2, 3, 4, 9, dtype=torch.float64, seed=11)
    labels[0, 0] = -100
    h, w, b = _leaves(hidden, weight, bias)

    def fn(h, w, b):
        return K.candidate_logprob_sums_from_hidden(h, w, labels, b, chunk_tokens=2, chunk_vocab=4)[0]

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_no_grad_forward_is_plain():
    hidden, weight, bias, labels, coef = make_case(2, 3, 4, 9, seed=12)
    with torch.no_grad():
        sums, _ = K.candidate_logprob_sums_from_hidden(hidden.requires_grad_(), weight, labels, bias)
        total, _, _ = K.weighted_logprob_sum_from_hidden(hidden, weight, labels, coef, bias)
    assert not sums.requires_grad and not total.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=torch.zeros(2, 3)), "hidden must be"),
    (dict(weight=torch.zeros(5, 3)), "weight must be"),
    (dict(labels=torch.zeros(2, 3)), "integer"),
    (dict(labels=torch.full((2, 3), 9)), "outside the vocabulary"),
    (dict(bias=torch.zeros(4)), "bias must be"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(5, 4), labels=torch.zeros(2, 3, dtype=torch.long),
                bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        K.candidate_logprob_sums_from_hidden(args["hidden"], args["weight"], args["labels"], args["bias"])


@pytest.mark.parametrize("backend,examples", [("torch", 20), pytest.param(
    "triton", 6, marks=pytest.mark.skipif(not K.triton_available(), reason="no triton"))])
def test_random_shapes_match_reference(backend, examples):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(
        n=st.integers(1, 3), t=st.integers(1, 4), h=st.integers(1, 12), v=st.integers(1, 300),
        masked=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16),
        rows=st.sampled_from([1, 3, None]), cols=st.sampled_from([1, 17, 64, None]),
        bias=st.booleans(),
    )
    def run(n, t, h, v, masked, seed, rows, cols, bias):
        case = make_case(n, t, h, v, masked_frac=masked, seed=seed, bias=bias)
        check(*case, backend, chunk_tokens=rows, chunk_vocab=cols)

    run()


def test_default_tiles_stay_small():
    from rrhf_kernels._hidden_tiles import tile_shape

    for dtype, per_element in ((torch.bfloat16, 10), (torch.float32, 8)):
        rows, cols = tile_shape(4 * 512, 128256, None, None, dtype)
        logits_bytes = 4 * 512 * 128256 * dtype.itemsize
        assert rows * cols * per_element <= 0.08 * logits_bytes  # room left for per-token vectors
    assert tile_shape(10, 97, None, None) == (10, 97)  # small inputs: one tile
