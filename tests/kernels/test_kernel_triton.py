"""Triton-specific checks, run on CPU through TRITON_INTERPRET=1 (set by conftest.py).

Shapes stay tiny: the interpreter runs each program in Python. Small block sizes force the
multi-tile path (online logsumexp across tiles, a partial last tile) that real vocabularies use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.kernel_cases import check_against_reference, make_case

import rrhf_kernels as K
from rrhf_kernels.tolerances import BACKEND_ATOL, BACKEND_RTOL

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="triton not installed")


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tile_vocab(block_size, dtype):
    # V = 1000 is not a multiple of any block: the last tile is partial.
    logits, labels = make_case(2, 3, 1000, dtype=dtype, seed=block_size)
    check_against_reference(logits, labels, 1.0, "triton", block_size=block_size)


def test_vocab_wider_than_max_block():
    # The default tile is capped (no block of size V): 5000 > 4096 gives two tiles.
    logits, labels = make_case(1, 2, 5000, seed=3, masked_frac=0.0)
    check_against_reference(logits, labels, 1.0, "triton")


def test_minus_inf_logits_are_handled():
    # Vocabulary masking puts -inf in logits; whole -inf tiles must not give NaN.
    logits, labels = make_case(2, 2, 200, seed=6, masked_frac=0.0)
    logits[..., :64] = float("-inf")  # the first tiles of every row are all -inf
    logits[..., 150:170] = float("-inf")
    labels = labels.clamp(min=64)
    labels[labels.ge(150) & labels.lt(170)] = 100
    check_against_reference(logits, labels, 1.0, "triton", block_size=32)
    check_against_reference(logits, labels, 1.0, "torch")


def test_triton_and_torch_agree_on_fp16():
    logits, labels = make_case(3, 4, 333, dtype=torch.float16, seed=12)
    a = K.candidate_logprob_sums(logits, labels, backend="triton", block_size=64)[0]
    b = K.candidate_logprob_sums(logits, labels, backend="torch")[0]
    torch.testing.assert_close(a, b, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)


def test_block_size_must_be_power_of_two():
    logits, labels = make_case(1, 1, 10)
    with pytest.raises(ValueError, match="power of two"):
        K.candidate_logprob_sums(logits, labels, backend="triton", block_size=24)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    code = (
        "import torch, rrhf_kernels as K\n"
        "try:\n"
        "    K.candidate_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long),"
        " backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = _run(code, {})
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr


def test_missing_triton_gives_clear_error_and_torch_still_works():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, rrhf_kernels as K\n"
        "x, y = torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long)\n"
        "print('AVAILABLE', K.triton_available())\n"
        "print('AUTO', K.candidate_logprobs(x, y).tolist())\n"
        "try:\n"
        "    K.candidate_logprobs(x, y, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = _run(code, {"TRITON_INTERPRET": "1"})
    assert "AVAILABLE False" in out.stdout and "AUTO [" in out.stdout, out.stderr
    assert "ERR backend='triton' needs the 'triton' package" in out.stdout, out.stderr
