"""rrhf_kernels: fused per-candidate length-normalised log-probabilities (a stable public API).

Public API
----------
``candidate_logprobs(logits, labels, length_penalty=1.0, ignore_index=-100, backend="auto")``
    **contract.** ``logits`` [N, T, V] fp32/bf16/fp16 (N = prompts x candidates), ``labels``
    [N, T] aligned with the logits (the label at t is the target of logits at t; no shift
    inside). Row i: sum of ``log_softmax(logits[i, t])[labels[i, t]]`` over t with
    ``labels[i, t] != ignore_index``, divided by ``max(count_i, 1) ** length_penalty``; a row
    with no valid token gives 0 (never NaN). Returns float32 [N], differentiable w.r.t. logits.
    ``backend``: ``"triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"``
    (memory-lean chunked fallback with its own chunked backward), ``"auto"`` (triton on CUDA,
    torch elsewhere).

Memory (fwd+bwd, beyond the inputs): triton saves one fp32 logsumexp per token and writes the
gradient once (one logits-sized buffer); torch adds one slab temporary of about a quarter of
the logits (see benchmarks/kernel_bench.py and its recorded results).

``candidate_logprob_sums(logits, labels, ignore_index=-100, backend="auto") -> (sums, counts)``
    What the trainer needs besides the score: per row the token log-prob SUM (float32 [N],
    float64 for float64 logits; differentiable) and the valid-token COUNT (int64 [N], no grad).
    ``candidate_logprobs`` is exactly ``sums / counts.clamp(min=1) ** length_penalty``; the SFT
    loss of a candidate is ``-sums / counts.clamp(min=1)``. Call it once and derive both, rather
    than running the kernel twice. Optional keyword-only tuning knobs: ``block_size`` (triton
    vocabulary tile, a power of two) and ``chunk_rows`` (torch: token rows per slab).

``reference_candidate_logprobs(logits, labels, length_penalty=1.0, ignore_index=-100,
compute_dtype=torch.float64)`` and ``reference_logprob_sums(...) -> (sums, counts)``
    Plain full log_softmax + gather + mask, for tests (float64) and benchmarks (float32 is the
    RRHF reference code's approach). Differentiable; memory-hungry by design.

``candidate_logprob_sums_from_hidden(hidden, weight, labels, bias=None, ignore_index=-100,
backend="auto", *, chunk_tokens=None, chunk_vocab=None, return_lse=False) -> (sums, counts)``
    The same sums and counts for logits = hidden [N, T, H] @ weight [V, H].T (+ bias [V]), without
    ever building the logits: tiled over tokens and vocabulary with an online logsumexp (Triton
    tile kernels on CUDA, torch elsewhere). Differentiable w.r.t. hidden, weight and bias (tied
    embeddings included). ``return_lse=True`` adds the per-token logsumexp [N, T].

``weighted_logprob_sum_from_hidden(hidden, weight, labels, coef, bias=None, ignore_index=-100,
backend="auto", *, lse=None, chunk_tokens=None, chunk_vocab=None) -> (total, sums, counts)``
    When d loss / d sums = ``coef`` [N] is known up front (the trainer's third pass): total =
    sum(coef * sums), with its gradients computed during the forward (nothing logits-sized is
    kept); ``sums`` detached. ``lse`` from an earlier forward skips a vocabulary pass.

``reference_logprob_sums_from_hidden(hidden, weight, labels, bias=None, ...)``: the float64
reference of the two above (full logits, then reference_logprob_sums).

``triton_available() -> bool``: whether triton imports here.

Errors: malformed inputs (wrong shapes/dtypes, a label outside [0, V) that is not
``ignore_index``, unknown backend) raise ValueError naming the problem; ``backend="triton"``
without triton raises RuntimeError. Importing this package never imports triton.
"""

from .api import candidate_logprob_sums, candidate_logprobs, triton_available
from .hidden import candidate_logprob_sums_from_hidden, weighted_logprob_sum_from_hidden
from .reference import (
    reference_candidate_logprobs,
    reference_logprob_sums,
    reference_logprob_sums_from_hidden,
)

__all__ = [
    "candidate_logprobs",
    "candidate_logprob_sums",
    "candidate_logprob_sums_from_hidden",
    "weighted_logprob_sum_from_hidden",
    "reference_logprob_sums_from_hidden",
    "reference_candidate_logprobs",
    "reference_logprob_sums",
    "triton_available",
]
