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

``triton_available() -> bool``: whether triton imports here.

Errors: malformed inputs (wrong shapes/dtypes, a label outside [0, V) that is not
``ignore_index``, unknown backend) raise ValueError naming the problem; ``backend="triton"``
without triton raises RuntimeError. Importing this package never imports triton.
"""

from .api import candidate_logprob_sums, candidate_logprobs, triton_available
from .reference import reference_candidate_logprobs, reference_logprob_sums

__all__ = [
    "candidate_logprobs",
    "candidate_logprob_sums",
    "reference_candidate_logprobs",
    "reference_logprob_sums",
    "triton_available",
]
