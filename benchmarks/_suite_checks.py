"""GPU suite, checks: the kernel against the float64 reference (tolerances from
rrhf_kernels.tolerances, the ones tests/kernels/test_kernel.py uses), and `pytest -m gpu`.

rrhf_kernels is imported inside the functions: it is importable only after the suite's setup.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _suite_setup import ROOT

REFERENCE_CHUNK_BYTES = 512 * 2**20  # float64 reference works on at most this much at a time

def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_correctness_inputs(n: int, t: int, v: int, dtype_name: str, device: str, seed: int = 0):
    """Logits, labels and upstream grads with the awkward cases in them.

    Row 0 is entirely ignored (a candidate with no response token); every other row has a
    prompt prefix and right padding of -100; labels 0 and V-1 appear; row 1 is shifted by +50
    (large logits test the online logsumexp). Generated on the device, row by row.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = _torch_dtype(dtype_name)
    logits = torch.empty(n, t, v, dtype=dtype, device=device)
    for i in range(n):
        row = torch.randn(t, v, generator=gen, device=device) * 3.0
        if i == 1:
            row += 50.0
        logits[i] = row.to(dtype)
        del row
    labels = torch.randint(0, v, (n, t), generator=gen, device=device)
    for i in range(n):
        prompt = int(torch.randint(0, max(1, t // 3), (1,), generator=gen, device=device))
        end = t - int(torch.randint(0, max(1, t // 4), (1,), generator=gen, device=device))
        labels[i, :prompt] = -100
        labels[i, end:] = -100
    if n > 1 and t > 2:
        labels[n - 1, -2] = 0
        labels[n - 1, -3] = v - 1
    labels[0] = -100
    coef = torch.randn(n, generator=gen, device=device)
    return logits, labels, coef


def _compare_row(logits_row, labels_row, coef: float, grad_row, grad_rtol: float,
                 grad_atol: float):
    """One candidate row against float64, chunk by chunk (the reference's float64 copy, its
    log_softmax and gradient stay under REFERENCE_CHUNK_BYTES together).

    Returns (reference sum, max abs gradient error, max gradient error / tolerance).
    """
    import torch

    from rrhf_kernels import reference_logprob_sums

    t, v = logits_row.shape
    step = max(1, REFERENCE_CHUNK_BYTES // (v * 8 * 3))
    total, max_err, ratio = 0.0, 0.0, 0.0
    for start in range(0, t, step):
        x = logits_row[start:start + step].to(torch.float64).unsqueeze(0).requires_grad_(True)
        sums, _ = reference_logprob_sums(x, labels_row[start:start + step].unsqueeze(0))
        (sums * coef).sum().backward()
        total += float(sums.detach()[0])
        ref = x.grad[0]
        diff = (grad_row[start:start + step].to(torch.float64) - ref).abs()
        max_err = max(max_err, float(diff.max()))
        ratio = max(ratio, float((diff / (grad_rtol * ref.abs() + grad_atol)).max()))
        del x, sums, ref, diff
    return total, max_err, ratio


def check_case(dtype_name: str, n: int, t: int, v: int, device: str,
               kernel_fn: Callable | None = None, backend: str = "triton") -> dict[str, Any]:
    """One correctness case: the kernel's sums and d(sums . coef)/d logits vs float64.

    `kernel_fn(logits, labels) -> (sums, counts)` defaults to
    rrhf_kernels.candidate_logprob_sums(backend=backend); tests pass a broken one to see the
    check fail.
    """
    import torch

    import rrhf_kernels
    from rrhf_kernels.tolerances import GRAD_ATOL, GRAD_RTOL, sum_allowance

    if kernel_fn is None:
        def kernel_fn(x, y):
            return rrhf_kernels.candidate_logprob_sums(x, y, backend=backend)

    logits, labels, coef = make_correctness_inputs(n, t, v, dtype_name, device)
    x = logits.detach().requires_grad_(True)
    sums, counts = kernel_fn(x, labels)
    (grad,) = torch.autograd.grad(sums, x, grad_outputs=coef.to(sums.dtype))
    del x
    sums = sums.detach()
    valid = labels != -100
    dtype = _torch_dtype(dtype_name)
    sum_ratio = grad_ratio = max_sum_err = max_grad_err = 0.0
    finite = bool(torch.isfinite(sums).all()) and bool(torch.isfinite(grad).all())
    counts_ok = bool((counts.cpu() == valid.sum(-1).cpu()).all())
    ignored_grad_max = 0.0
    for i in range(n):
        if not valid[i].all():  # row by row: a boolean-mask copy of all rows could be GBs
            ignored_grad_max = max(ignored_grad_max, float(grad[i][~valid[i]].abs().max()))
        ref_sum, row_err, row_ratio = _compare_row(logits[i], labels[i], float(coef[i]),
                                                   grad[i], GRAD_RTOL[dtype], GRAD_ATOL)
        err = abs(float(sums[i]) - ref_sum)
        max_sum_err = max(max_sum_err, err)
        allowed = sum_allowance(dtype, ref_sum, int(valid[i].sum()))
        sum_ratio = max(sum_ratio, err / allowed)
        max_grad_err, grad_ratio = max(max_grad_err, row_err), max(grad_ratio, row_ratio)
    empty_row_sum = float(sums[0]) if not valid[0].any() else None
    passed = (finite and counts_ok and sum_ratio <= 1.0 and grad_ratio <= 1.0
              and ignored_grad_max == 0.0 and (empty_row_sum in (None, 0.0)))
    return {"name": f"{backend} {dtype_name} {n}x{t}x{v}", "backend": backend,
            "dtype": dtype_name, "shape": f"{n}x{t}x{v}", "valid_tokens": int(valid.sum()),
            "max_sum_err": max_sum_err, "sum_err_vs_tol": sum_ratio,
            "max_grad_err": max_grad_err, "grad_err_vs_tol": grad_ratio,
            "ignored_grad_max": ignored_grad_max, "empty_row_sum": empty_row_sum,
            "finite": finite, "counts_ok": counts_ok, "passed": passed}



def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` (the project's CUDA-only tests) in a subprocess; counts from JUnit XML.

    Run from the repository root as CI runs the tests, with this process's PYTHONPATH (the
    wheels and the project links). On a CPU every such test skips itself.
    """
    import xml.etree.ElementTree as ET

    # Only the files that use the marker: collecting every test module would import the whole
    # project (tens of seconds) to deselect nearly all of it.
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in f.read_text(encoding="utf-8", errors="replace"))
    if not files:
        return {"status": "no tests", "summary": "no test file uses pytest.mark.gpu"}
    with tempfile.TemporaryDirectory(prefix="rrhf_gpu_tests_") as tmp:
        xml_path = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={xml_path}", *files]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired as err:
            tail = (err.stdout or b"")[-1500:]
            return {"status": "timeout", "seconds": time.perf_counter() - start,
                    "output_tail": tail.decode() if isinstance(tail, bytes) else tail}
        out: dict[str, Any] = {"returncode": proc.returncode,
                               "seconds": time.perf_counter() - start,
                               "summary": (proc.stdout.strip().splitlines() or [""])[-1]}
        if not xml_path.is_file():
            out.update(status="error", output_tail=(proc.stdout + proc.stderr)[-3000:])
            return out
        root = ET.parse(xml_path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] = sum(int(x.get(key, 0)) for x in suites)
        out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
        failed = []
        for case in root.iter("testcase"):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "message": (problem.get("message") or "")[:500]})
        out["failed_tests"] = failed
        out["files"] = files
        if failed or proc.returncode not in (0, 5):  # 5: no test selected
            out["status"] = "failed"
        elif out["passed"] == 0:
            out["status"] = "all skipped"  # e.g. on a CPU: nothing was checked
        else:
            out["status"] = "ok"
        return out
