"""How close the kernel must be, stated once. tests/test_kernel*.py and the GPU suite
(benchmarks/_suite_correctness.py) import these numbers; they used to keep three copies.

Every comparison reads `|got - want| <= atol + rtol * |want|` (torch.testing.assert_close).
The values are the ones tests/kernels/test_kernel.py has always passed with (the CPU and Triton
interpreter runs); the GPU tests and the GPU suite use the same ones.

Only torch is imported here (the package stands alone).
"""

from __future__ import annotations

import torch

# Scores (or sums) against the float64 reference.
# fp32/fp64 logits: the kernel accumulates in fp32, so 1e-5 relative.
# bf16/fp16 logits: the reference upcasts the same *rounded* logits the kernel reads and the
# kernel accumulates in fp32, so only the order of fp32 work differs; 1e-4 relative is the
# bound the tests have proven.
SCORE_RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 1e-4,
              torch.float16: 1e-4}
# Absolute slack on a length-normalised score (a mean over tokens, length_penalty 1, the
# contract default), for scores near 0. A per-row SUM over `count` tokens collects one such
# rounding per token: see sum_allowance.
SCORE_ATOL = 1e-5

# Gradients against the float64 reference, element-wise. The kernel computes them in fp32 and
# rounds once to the logits dtype on the way out: 2 units in the last place of that dtype
# (bf16 2**-7, fp16 2**-10, relative to each element) cover that rounding; fp32 keeps 1e-5.
GRAD_RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7,
             torch.float16: 2 * 2**-10}
# Elements whose softmax probability is ~0 (their gradient is ~0 and rtol gives no room).
GRAD_ATOL = 1e-6

# Two backends (triton vs torch) on the same inputs: both read the same rounded logits and
# accumulate in fp32, so they differ only by summation order: fp32-level, whatever the logits
# dtype. Their gradients are each rounded to the logits dtype: compare those with GRAD_RTOL.
BACKEND_RTOL = 1e-5
BACKEND_ATOL = 1e-5


def sum_allowance(dtype: torch.dtype, reference_sum: float, count: int) -> float:
    """Allowed |error| of a row's log-prob SUM over `count` valid tokens: SCORE_RTOL relative
    plus SCORE_ATOL per token (the score bound, multiplied back by the count)."""
    return SCORE_RTOL[dtype] * abs(reference_sum) + SCORE_ATOL * max(1, count)

# The hidden-state op (candidate_logprob_sums_from_hidden) against the float64 reference of
# F.linear(hidden, weight, bias) followed by the log-softmax. fp32 / fp64: the tiles' matmuls
# and the float32 accumulation differ from float64 by float32 rounding only, so the score and
# gradient bounds above hold. bf16 / fp16: each logit is rounded to that dtype by the matmul (as
# the model's own head rounds it), and each gradient tile is rounded once more before its matmul
# (as autograd rounds the logits' gradient): errors of a few units in the last place of the
# dtype, relative to the largest logit or gradient entry, so these bounds are relative to the
# row's scale (max |reference|), not element-wise.
HIDDEN_LOWP_RTOL = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11}
