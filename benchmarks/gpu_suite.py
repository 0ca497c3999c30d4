"""The one prepared GPU suite: kernel correctness, kernel benchmark, end-to-end RRHF step.

Made for a rare, short window on a bare GPU machine (H100/H200, no internet): one call, a global
time budget (default 480 s, the whole call stays under 9 minutes), items skipped and recorded
when time runs short, results written after every item, so a cut-off run still leaves a file.

What it runs, in this order (most important first):
  1. correctness  rrhf_kernels' Triton kernel vs the float64 reference, forward and backward:
                  fp32, bf16, fp16; V in {32000, 128256, 151936, 262144}; N x T = 8 x 1024
                  (and a small odd shape); prompt prefixes, padding and one fully ignored row.
                  The reference runs chunk by chunk (<= 512 MB of float64 at a time): a full
                  float64 copy of 8 x 1024 x 262144 logits alone would be 17 GB.
  2. kernel       benchmarks/kernel_bench.run_kernel_bench on the goal shape first (bf16
                  4 x 1024 x 128256): Triton vs naive vs torch.compile'd naive vs Liger / TRL
                  where importable, bandwidth as a fraction of a measured device-to-device copy.
  3. e2e          benchmarks/e2e_bench.run_e2e: one RRHF step (QLoRA NF4, LoRA r=16 all-linear,
                  gradient checkpointing, k = 4 candidates x 512 tokens) on a random model of
                  Llama-3-8B shape (LLaMA-2-7B in 5): RRHFTrainer.training_step with candidate
                  micro-batches 1, 2, 4 vs the reference code's step (all candidates at once,
                  fp32 log_softmax over [k, L, V]); peak memory and step time.
  4. tests        `pytest -m gpu` (the CUDA-only tests, e.g. tests/test_kernel_gpu.py), right
                  after the Llama-3-8B-shape e2e item; counts and failures from JUnit XML.
  5. e2e          the LLaMA-2-7B shape.
  6. kernel       all paths on the goal shape (torch.compile'd naive, Liger, TRL), then the
                  remaining shapes/dtypes, while time is left.
Then it prints the goals with PASS / FAIL / NOT MEASURED:
  kernel >= 80 % of copy bandwidth and >= 3x naive fwd+bwd on bf16 4 x 1024 x 128256;
  Llama-3-8B-shape step at k = 4 x 512 within 12 GB peak (fits a 16 GB card).

Output: OUT/<date>-<device>.json with top-level "device", "date", "versions", "correctness",
"gpu_tests", "kernel" (rows: name, shape, dtype, ms, speedup_vs_naive, bandwidth_fraction, ...), "e2e" (rows:
model, variant, peak_memory_gb, step_s, ...), "goals", "skipped", "errors", and a markdown
table beside it (same name, .md). OUT defaults to benchmarks/results/.

Tolerances (the same as tests/test_kernel.py): sums within SCORE_RTOL relative (fp32 1e-5,
bf16/fp16 1e-4) plus 1e-5 per valid token; gradients element-wise within GRAD_RTOL relative
(fp32 1e-5, bf16 2 * 2**-7, fp16 2 * 2**-10) plus 1e-6 absolute; ignored tokens exactly 0.

--dry runs the same code on tiny shapes on the CPU (Triton through TRITON_INTERPRET=1, NF4 via
bitsandbytes' CPU path); tests/test_gpu_suite.py runs it.

------------------------------------------------------------------------------------------------
Preparing the wheels (here, on a machine with pip access, in the repository root). The GPU
image has torch, triton, transformers 5.17, peft, accelerate, but not bitsandbytes, liger-kernel,
trl or datasets, and its transformers lacks TrainingArguments.activation_checkpointing, which
RRHFConfig uses: so transformers and peft travel too, at the versions CI uses. `.whl/` is
git-ignored (.gitignore). About 60 MB; the whole tree that travels must stay under 64 MiB.

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
      bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 liger-kernel==0.8.5 \
      trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

The suite installs every wheel in .whl/ itself (pip --no-index --no-deps --target
/tmp/rrhf_suite_site, put first on sys.path and PYTHONPATH) before importing any of them, and
makes rrhf_lite / rrhf_kernels importable from this tree without installing the project.

The device command (device tool `run`, carry [".whl"], timeout_s 560):

    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT 2>&1 | tee $OUT/suite.log

(add `--commit <sha>` to record the commit: the device copy has no .git). It leaves three
files in $OUT (json, md, log). Copy the json and md into benchmarks/results/ and commit them.
With minutes left on a still-warm machine, rerun one section with a smaller budget (the wheels
stay installed in /tmp, so setup is skipped), e.g. `... gpu_suite.py --out $OUT --only e2e
--budget-s 200`. A machine starts with the 15-minute device allowance minus ~1-2 minutes, so
one full run fits; plan no second full run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WHEEL_DIR = ROOT / ".whl"
SITE_DIR = Path(tempfile.gettempdir()) / "rrhf_suite_site"
# one link folder per checkout, so suites run from two trees at once do not fight over it
LINK_DIR = Path(tempfile.gettempdir()) / (
    "rrhf_suite_path_" + hashlib.sha1(str(ROOT).encode()).hexdigest()[:10])
WHEELS = ("bitsandbytes==0.50.2", "transformers==5.24.0", "peft==0.21.2", "liger-kernel==0.8.5",
          "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
VERSIONED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "trl",
             "datasets", "liger_kernel")

GOAL_BANDWIDTH_FRACTION = 0.80
GOAL_SPEEDUP_VS_NAIVE = 3.0
GOAL_PEAK_GB = 12.0

# Tolerances, as in tests/test_kernel.py (see the module docstring).
SCORE_RTOL = {"fp32": 1e-5, "bf16": 1e-4, "fp16": 1e-4}
GRAD_RTOL = {"fp32": 1e-5, "bf16": 2 * 2**-7, "fp16": 2 * 2**-10}
GRAD_ATOL = 1e-6
REFERENCE_CHUNK_BYTES = 512 * 2**20  # float64 reference works on at most this much at a time


@dataclass(frozen=True)
class Plan:
    """Shapes and settings of one mode (the GPU run or --dry)."""

    correctness_cases: tuple[tuple[str, int, int, int], ...]  # (dtype, N, T, V)
    kernel_goal: tuple[tuple[int, int, int], str, str]  # (shape, dtype, path of the kernel)
    kernel_rest: tuple[tuple[tuple[int, int, int], str], ...]
    kernel_repeat: int
    kernel_memory: bool
    e2e_models: tuple[str, ...]
    e2e_goal_model: str
    e2e_shape: dict[str, int]  # k, seq_len, prompt_len
    e2e_steps: int
    budget_s: float


def gpu_plan() -> Plan:
    vocabs = (32000, 128256, 151936, 262144)
    cases = [(d, 3, 37, 32000) for d in ("bf16", "fp32", "fp16")]  # odd small shape first
    cases += [(d, 8, 1024, v) for d in ("bf16", "fp32", "fp16") for v in vocabs]
    goal = ((4, 1024, 128256), "bf16", "rrhf_triton")
    rest = (((8, 512, 32000), "bf16"), ((4, 1024, 128256), "fp32"), ((8, 512, 32000), "fp32"),
            ((4, 1024, 262144), "bf16"), ((4, 1024, 128256), "fp16"))
    return Plan(tuple(cases), goal, rest, kernel_repeat=5, kernel_memory=True,
                e2e_models=("llama3-8b", "llama2-7b"), e2e_goal_model="llama3-8b",
                e2e_shape=dict(k=4, seq_len=512, prompt_len=64), e2e_steps=3, budget_s=480.0)


def dry_plan() -> Plan:
    # Same structure, tiny: V = 5000 > the kernel's 4096-wide tile gives two tiles per row.
    cases = [(d, 3, 6, v) for d in ("bf16", "fp32", "fp16") for v in (37, 5000)]
    # kernel_bench offers the Triton path on CUDA only; on CPU the goal row is the torch backend.
    goal = ((2, 8, 1000), "bf16", "rrhf_torch")
    return Plan(tuple(cases), goal, (((2, 8, 1000), "fp32"),), kernel_repeat=1,
                kernel_memory=False, e2e_models=("tiny-llama3",), e2e_goal_model="tiny-llama3",
                e2e_shape=dict(k=4, seq_len=16, prompt_len=4), e2e_steps=1, budget_s=900.0)


# --------------------------------------------------------------------------- setup


def install_wheels(wheel_dir: Path, target: Path = SITE_DIR) -> dict[str, Any]:
    """pip-install every wheel of `wheel_dir` into `target` (offline) and put it first on paths."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    info: dict[str, Any] = {"wheel_dir": str(wheel_dir), "wheels": [w.name for w in wheels]}
    if not wheels:
        info["note"] = "no wheels found: using what is installed"
        return info
    marker = target / ".installed"
    listing = "\n".join(info["wheels"])
    if not (marker.is_file() and marker.read_text() == listing):  # a rerun on a warm machine
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
               *map(str, wheels)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        info["install_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"pip install of {wheel_dir} failed:\n{proc.stderr[-2000:]}")
        marker.write_text(listing)
    _prepend_path(target)
    expected = {w.split("==")[0].replace("-", "_").lower() for w in WHEELS}
    have = {w.name.split("-")[0].lower() for w in wheels}
    info["missing_from_wheel_dir"] = sorted(expected - have)
    info["dropped"] = drop_broken_optional(target)
    return info


# Optional packages (only comparisons use them) and what breaks with them. A `datasets` that
# cannot import (e.g. its pyarrow is older than it needs) would break `transformers.Trainer`,
# which imports datasets whenever it is installed: then it is removed again, with trl.
OPTIONAL_PROBES = (
    ("datasets", "import datasets", ("datasets", "trl")),
    ("trl", "import trl.trainer.utils", ("trl",)),
    ("liger_kernel", "import liger_kernel.transformers.functional", ("liger_kernel",)),
)


def drop_broken_optional(target: Path) -> dict[str, str]:
    """Import-test the optional packages installed into `target`; remove the broken ones."""
    dropped: dict[str, str] = {}
    for dist, code, remove in OPTIONAL_PROBES:
        if dist in dropped or not _dist_info(target, dist):
            continue
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ), timeout=120)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
            for name in remove:
                if _remove_dist(target, name):
                    dropped[name] = f"{code!r} failed: {reason}"
    if dropped:
        importlib.invalidate_caches()
        print(f"[suite] removed optional packages that do not import here: {dropped}", flush=True)
    return dropped


def _dist_info(target: Path, dist: str) -> Path | None:
    norm = dist.replace("-", "_").lower()
    return next((d for d in target.glob("*.dist-info")
                 if d.name.split("-")[0].replace("-", "_").lower() == norm), None)


def _remove_dist(target: Path, dist: str) -> bool:
    """Delete an installed distribution's files (from its RECORD) and its dist-info folder."""
    import shutil

    info = _dist_info(target, dist)
    if info is None:
        return False
    record = info / "RECORD"
    lines = record.read_text(encoding="utf-8").splitlines() if record.is_file() else []
    tops = set()
    for line in lines:
        path = line.split(",", 1)[0]
        if not path or path.startswith(".."):
            continue
        top = path.split("/", 1)[0]
        if top == "bin" or "/" not in path:  # shared script folder, top-level modules
            (target / path).unlink(missing_ok=True)
        elif top != info.name:
            tops.add(top)
    for top in sorted(tops):
        shutil.rmtree(target / top, ignore_errors=True)
    shutil.rmtree(info, ignore_errors=True)
    return True


def _prepend_path(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(folder) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *parts])
    importlib.invalidate_caches()


def ensure_project_importable() -> dict[str, str]:
    """rrhf_lite and rrhf_kernels from THIS tree (installed or not), via links in a temp dir.

    Links, not the repository root: the root on sys.path would make its kernels/ folder an
    (empty) namespace package named `kernels` where Hugging Face's package is not installed.
    """
    wanted = {"rrhf_kernels": ROOT / "kernels" / "rrhf_kernels", "rrhf_lite": ROOT / "rrhf_lite"}
    found = {}
    for name, folder in wanted.items():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve().parent if spec and spec.origin else None
        if origin != folder.resolve():
            LINK_DIR.mkdir(parents=True, exist_ok=True)
            tmp = LINK_DIR / f".{name}.{os.getpid()}"
            tmp.symlink_to(folder.resolve(), target_is_directory=True)
            os.replace(tmp, LINK_DIR / name)  # atomic: a concurrent run never sees no link
            _prepend_path(LINK_DIR)
        found[name] = str(folder)
    return found


def versions(commit: str | None = None) -> dict[str, Any]:
    import importlib.metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in VERSIONED:
        for name in (dist, dist.replace("_", "-")):
            try:
                out[dist] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                out[dist] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        out["cuda"] = None
    import rrhf_lite

    out["rrhf_lite"] = rrhf_lite.__version__
    out["git_commit"] = _git("rev-parse", "HEAD") or commit
    status = _git("status", "--porcelain")
    out["git_dirty"] = None if status is None else bool(status)
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# --------------------------------------------------------------------------- budget


class ItemTimeout(BaseException):
    """Raised by the alarm when an item runs past its time (BaseException: `except Exception`
    blocks inside the benchmarks must not swallow it)."""


class Suite:
    """Runs items within a global time budget and keeps the results file up to date."""

    def __init__(self, results: dict[str, Any], budget_s: float, write: Callable[[], None],
                 reserve_s: float = 15.0):
        self.results = results
        self.budget_s = budget_s
        self.reserve_s = reserve_s  # kept back for writing results at the end
        self.start = time.monotonic()
        self.write = write

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run_item(self, name: str, estimate_s: float, fn: Callable[[], Any],
                 cap_s: float | None = None) -> bool:
        """Run fn unless the budget cannot cover `estimate_s`; stop it after `cap_s` or when the
        budget runs out. Skips, timeouts and errors are recorded; returns True on success."""
        left = self.left() - self.reserve_s
        if left < estimate_s:
            self.results["skipped"].append({"item": name, "reason": (
                f"time budget: {max(left, 0):.0f} s left, item needs about {estimate_s:.0f} s")})
            print(f"[suite] skip {name}: not enough time left ({max(left, 0):.0f} s)", flush=True)
            self.write()
            return False
        limit = left if cap_s is None else min(left, cap_s)
        print(f"[suite] {name} (budget left {self.left():.0f} s, limit {limit:.0f} s)", flush=True)
        started = time.monotonic()
        ok = False
        try:
            with _alarm(limit):
                fn()
            ok = True
        except ItemTimeout:
            self.results["skipped"].append({"item": name, "reason": (
                f"stopped after {time.monotonic() - started:.0f} s (limit {limit:.0f} s); "
                "rows measured before the stop are kept")})
            print(f"[suite] {name} stopped at its time limit", flush=True)
        except Exception as err:  # noqa: BLE001 - recorded; the next item still runs
            self.results["errors"].append({"item": name, "error": f"{type(err).__name__}: {err}",
                                           "traceback": traceback.format_exc()[-4000:]})
            print(f"[suite] {name} failed: {type(err).__name__}: {err}", flush=True)
        finally:
            self.results["timings_s"][name] = round(time.monotonic() - started, 2)
            _free_memory()
            self.write()
        return ok


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise ItemTimeout in the main thread after `seconds` (no-op where SIGALRM is missing)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0 or math.isinf(seconds):
        yield
        return

    def handler(signum, frame):
        raise ItemTimeout()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _free_memory() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- correctness

DTYPE_NAMES = ("fp32", "bf16", "fp16")


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


def _compare_row(logits_row, labels_row, coef: float, grad_row, grad_rtol: float):
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
        ratio = max(ratio, float((diff / (grad_rtol * ref.abs() + GRAD_ATOL)).max()))
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
    rtol_s, rtol_g = SCORE_RTOL[dtype_name], GRAD_RTOL[dtype_name]
    sum_ratio = grad_ratio = max_sum_err = max_grad_err = 0.0
    finite = bool(torch.isfinite(sums).all()) and bool(torch.isfinite(grad).all())
    counts_ok = bool((counts.cpu() == valid.sum(-1).cpu()).all())
    ignored_grad_max = 0.0
    for i in range(n):
        if not valid[i].all():  # row by row: a boolean-mask copy of all rows could be GBs
            ignored_grad_max = max(ignored_grad_max, float(grad[i][~valid[i]].abs().max()))
        ref_sum, row_err, row_ratio = _compare_row(logits[i], labels[i], float(coef[i]),
                                                   grad[i], rtol_g)
        err = abs(float(sums[i]) - ref_sum)
        max_sum_err = max(max_sum_err, err)
        allowed = rtol_s * abs(ref_sum) + 1e-5 * max(1, int(valid[i].sum()))
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


# --------------------------------------------------------------------------- gpu tests


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` (the project's CUDA-only tests) in a subprocess; counts from JUnit XML.

    Run from the repository root as CI runs the tests, with this process's PYTHONPATH (the
    wheels and the project links). On a CPU every such test skips itself.
    """
    import xml.etree.ElementTree as ET

    # Only the files that use the marker: collecting every test module would import the whole
    # project (tens of seconds) to deselect nearly all of it.
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
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


# --------------------------------------------------------------------------- goals


def _find(rows: Sequence[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def evaluate_goals(results: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The issue's goals, each PASS / FAIL / NOT MEASURED, from the recorded rows."""
    shape, dtype, path = plan.kernel_goal
    shape_s = "x".join(map(str, shape))
    row = _find(results["kernel"], name=path, shape=shape_s, dtype=dtype) or {}
    goals = []

    def goal(name: str, measured: float | None, target: float, higher_is_better: bool,
             where: str) -> None:
        if measured is None:
            status = "NOT MEASURED"
        else:
            ok = measured >= target if higher_is_better else measured <= target
            status = "PASS" if ok else "FAIL"
        goals.append({"goal": name, "target": target, "measured": measured, "status": status,
                      "where": where})

    where = f"{path} {dtype} {shape_s}"
    goal("kernel bandwidth fraction of device copy >= 0.80", row.get("bandwidth_fraction"),
         GOAL_BANDWIDTH_FRACTION, True, where)
    goal("kernel fwd+bwd speedup vs naive >= 3x", row.get("speedup_vs_naive"),
         GOAL_SPEEDUP_VS_NAIVE, True, where)
    ours = [r for r in results["e2e"] if r.get("model") == plan.e2e_goal_model
            and r.get("variant", "").startswith("rrhf-lite") and r.get("status") == "ok"
            and r.get("peak_memory_gb") is not None]
    best = min(ours, key=lambda r: r["peak_memory_gb"]) if ours else None
    k, seq = plan.e2e_shape["k"], plan.e2e_shape["seq_len"]
    goal(f"{plan.e2e_goal_model} RRHF step k={k}x{seq} peak memory <= 12 GB",
         best["peak_memory_gb"] if best else None, GOAL_PEAK_GB, False,
         f"{plan.e2e_goal_model} {best['variant']}" if best else plan.e2e_goal_model)
    checked = results["correctness"]
    goals.append({"goal": "kernel matches the float64 reference (all cases)",
                  "target": len(checked), "measured": sum(bool(r.get("passed")) for r in checked),
                  "status": ("NOT MEASURED" if not checked else
                             "PASS" if all(r.get("passed") for r in checked) else "FAIL"),
                  "where": f"{len(checked)} cases"})
    tests = results.get("gpu_tests") or {}
    if tests.get("status") in ("ok", "failed"):
        status = "PASS" if tests["status"] == "ok" else "FAIL"
        where = tests.get("summary", "")
    else:
        status, where = "NOT MEASURED", tests.get("status", "not run")
    goals.append({"goal": "pytest -m gpu passes", "target": tests.get("tests"),
                  "measured": tests.get("passed"), "status": status, "where": where})
    return goals


# --------------------------------------------------------------------------- output

KERNEL_COLUMNS = ("name", "shape", "dtype", "ms", "speedup_vs_naive", "gbps",
                  "bandwidth_fraction", "peak_extra_mb", "max_abs_err_vs_naive", "note")
CORRECTNESS_COLUMNS = ("name", "valid_tokens", "max_sum_err", "sum_err_vs_tol", "max_grad_err",
                       "grad_err_vs_tol", "ignored_grad_max", "passed")
E2E_COLUMNS = ("model", "variant", "peak_memory_gb", "memory_vs_reference", "step_s",
               "speedup_vs_reference", "model_memory_gb", "build_s", "status")
GOAL_COLUMNS = ("goal", "status", "measured", "target", "where")


def _md_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_markdown(results: dict[str, Any]) -> str:
    v = results["versions"]
    parts = [
        f"# GPU suite: {results['device']}, {results['date']}\n",
        f"mode {results['mode']}, status {results['status']}, {results['elapsed_s']:.0f} s of a "
        f"{results['budget_s']:.0f} s budget; torch {v.get('torch')}, triton {v.get('triton')}, "
        f"transformers {v.get('transformers')}, peft {v.get('peft')}, bitsandbytes "
        f"{v.get('bitsandbytes')}, CUDA {v.get('cuda')}, commit {v.get('git_commit')}\n",
        "## Goals\n", markdown_table(results["goals"], GOAL_COLUMNS),
        "## Kernel fwd+bwd (median ms; bandwidth = 3 x logits bytes / time, as a fraction of a "
        "device-to-device copy)\n", markdown_table(results["kernel"], KERNEL_COLUMNS),
        "## End-to-end RRHF step (warm-up, then the mean of timed steps; peak = "
        "torch.cuda.max_memory_allocated)\n", markdown_table(results["e2e"], E2E_COLUMNS),
        "## Kernel correctness vs float64 (err_vs_tol <= 1 passes)\n",
        markdown_table(results["correctness"], CORRECTNESS_COLUMNS),
    ]
    tests = results.get("gpu_tests") or {}
    if tests:
        parts += ["## pytest -m gpu\n", f"{tests.get('status')}: {tests.get('summary', '')}\n",
                  markdown_table(tests.get("failed_tests", []), ("test", "message"))]
    if results["skipped"]:
        parts += ["## Skipped\n", markdown_table(results["skipped"], ("item", "reason"))]
    if results["errors"]:
        parts += ["## Errors\n", markdown_table(results["errors"], ("item", "error"))]
    return "\n".join(parts)


def write_outputs(results: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Atomically (re)write OUT/<stem>.json and OUT/<stem>.md."""
    from rrhf_lite.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    results["elapsed_s"] = round(time.monotonic() - results["_start"], 1)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(public, indent=2, default=str) + "\n")
    atomic_write_text(md_path, to_markdown(public))
    return json_path, md_path


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter); used by the tests")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="global time budget in seconds (default 480; dry 900)")
    parser.add_argument("--only", nargs="+", choices=("correctness", "kernel", "e2e", "tests"),
                        help="run only these sections")
    parser.add_argument("--commit", default=None,
                        help="git commit to record when the tree has no .git (device copies)")
    parser.add_argument("--wheels", default=None,
                        help=f"wheel folder to install first (default {DEFAULT_WHEEL_DIR.name}/ "
                             "when not --dry; 'none' to skip)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    if args.dry:
        # before triton's @jit decorators run (at the first use of the Triton backend)
        os.environ["TRITON_INTERPRET"] = "1"
    wheel_dir = None if args.wheels == "none" else (
        Path(args.wheels) if args.wheels else (None if args.dry else DEFAULT_WHEEL_DIR))
    setup_errors = []
    try:
        setup = install_wheels(wheel_dir) if wheel_dir else {"note": "no wheel install"}
    except Exception as err:  # noqa: BLE001 - run what still can (no NF4 e2e) and say why
        setup = {"wheel_dir": str(wheel_dir), "error": str(err)[-2000:]}
        setup_errors.append({"item": "setup", "error": f"{type(err).__name__}: {err}"[:2000],
                             "traceback": traceback.format_exc()[-4000:]})
        print(f"[suite] wheel install failed: {err}", flush=True)
    setup["project"] = ensure_project_importable()
    sys.path.insert(0, str(BENCH_DIR))

    import torch

    import rrhf_kernels
    import rrhf_lite

    setup["imported_from"] = {m.__name__: str(Path(m.__file__).resolve().parent)
                              for m in (rrhf_kernels, rrhf_lite)}
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        print("[suite] no CUDA device: run with --dry for the CPU smoke run", file=sys.stderr)
        return 2
    if args.dry:
        torch.set_num_threads(1)  # a shared CPU: one thread avoids oversubscription stalls
    device = "cuda" if cuda else "cpu"
    plan = dry_plan() if args.dry else gpu_plan()
    budget = args.budget_s if args.budget_s is not None else plan.budget_s
    from _common import device_tag

    date = _dt.datetime.now(_dt.UTC)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "date": date.isoformat(timespec="seconds"),
        "mode": "dry" if args.dry else "gpu",
        "status": "running", "budget_s": budget, "elapsed_s": 0.0,
        "versions": versions(args.commit), "setup": setup,
        "goals": [], "correctness": [], "kernel": [], "e2e": [], "gpu_tests": {},
        "skipped": [], "errors": setup_errors, "timings_s": {}, "_start": start,
    }
    try:
        from _common import environment_info

        results["environment"] = environment_info()
    except Exception as err:  # noqa: BLE001 - informative only
        results["environment"] = {"error": str(err)}
    out_dir = Path(args.out) if args.out else BENCH_DIR / "results"
    stem = f"{date:%Y-%m-%d}-{device_tag(device)}" + ("-dry" if args.dry else "")

    def write() -> None:
        results["goals"] = evaluate_goals(results, plan)
        write_outputs(results, out_dir, stem)

    suite = Suite(results, budget, write)
    suite.start = start  # the budget counts the wheel install and imports too
    sections = set(args.only or ("correctness", "kernel", "e2e", "tests"))
    try:
        _run_sections(suite, plan, device, sections)
        results["status"] = "complete" if not results["skipped"] else "partial"
    finally:
        if results["status"] == "running":
            results["status"] = "interrupted"
        write()
    _print_summary(results, out_dir, stem)
    failed = [r for r in results["correctness"] if not r.get("passed")]
    failed += [r for r in results["e2e"] if str(r.get("status", "")).startswith("error")]
    if (results.get("gpu_tests") or {}).get("status") == "failed":
        failed.append(results["gpu_tests"])
    return 1 if failed or results["errors"] else 0


def _run_sections(suite: Suite, plan: Plan, device: str, sections: set[str]) -> None:
    results = suite.results
    if "correctness" in sections:
        def correctness():
            for dtype_name, n, t, v in plan.correctness_cases:
                row = check_case(dtype_name, n, t, v, device)
                results["correctness"].append(row)
                print(f"  {row['name']}: {'ok' if row['passed'] else 'FAILED'} "
                      f"(sum {row['sum_err_vs_tol']:.3g}, grad {row['grad_err_vs_tol']:.3g} "
                      "of tolerance)", flush=True)
                _free_memory()

        suite.run_item("correctness", 20 if device == "cuda" else 5, correctness,
                       cap_s=150 if device == "cuda" else None)

    def kernel_item(shape, dtype_name, paths=None, label=""):
        def run():
            from kernel_bench import run_kernel_bench

            rows = run_kernel_bench([shape], [dtype_name], device=device, paths=paths,
                                    repeat=plan.kernel_repeat, measure_memory=plan.kernel_memory)
            add_kernel_rows(results["kernel"], rows)

        name = f"kernel {dtype_name} {'x'.join(map(str, shape))}{label}"
        suite.run_item(name, 40 if device == "cuda" else 3, run,
                       cap_s=150 if device == "cuda" else None)

    def run_tests_item():
        def run():
            # the subprocess gets its own limit inside the item's, so a hang still reports
            cap = 150.0 if device == "cuda" else math.inf
            results["gpu_tests"] = run_gpu_tests(
                max(10.0, min(cap, suite.left() - suite.reserve_s) - 5))
            print(f"  pytest -m gpu: {results['gpu_tests'].get('summary')}", flush=True)

        suite.run_item("pytest -m gpu", 30 if device == "cuda" else 10, run,
                       cap_s=150 if device == "cuda" else None)

    goal_shape, goal_dtype, goal_path = plan.kernel_goal
    if "kernel" in sections:
        # The goal row first and alone (naive always runs as the baseline): a slow
        # torch.compile of another path cannot use up the time before the goal is measured.
        kernel_item(goal_shape, goal_dtype, paths=[goal_path], label=" (goal)")
    if "e2e" in sections:
        from e2e_bench import run_e2e

        for model in plan.e2e_models:
            def run(model=model):
                # bf16 mixed precision as on the GPU (dry too: it exercises the same wrapper)
                run_e2e(model, device=device, steps=plan.e2e_steps, bf16=True,
                        on_row=results["e2e"].append, **plan.e2e_shape)

            suite.run_item(f"e2e {model}", 90 if device == "cuda" else 5, run,
                           cap_s=200 if device == "cuda" else None)
            if model == plan.e2e_goal_model and "tests" in sections:
                run_tests_item()
    elif "tests" in sections:
        run_tests_item()
    if "kernel" in sections:
        kernel_item(goal_shape, goal_dtype, label=" (all paths)")  # compiled naive, Liger, TRL
        for shape, dtype_name in plan.kernel_rest:
            kernel_item(shape, dtype_name)


def add_kernel_rows(rows: list[dict], new_rows: Sequence[dict]) -> None:
    """Append benchmark rows, keeping the first row of each (name, shape, dtype): a second run
    of a shape repeats its naive baseline, whose ratios are already in the first."""
    seen = {(r.get("name"), r.get("shape"), r.get("dtype")) for r in rows}
    for row in new_rows:
        key = (row.get("name"), row.get("shape"), row.get("dtype"))
        if key not in seen:
            rows.append(row)
            seen.add(key)


def _print_summary(results: dict[str, Any], out_dir: Path, stem: str) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from _common import print_table

    print()
    print_table(results["correctness"], CORRECTNESS_COLUMNS, title="Kernel correctness")
    print()
    print_table(results["kernel"], KERNEL_COLUMNS, title="Kernel fwd+bwd")
    print()
    print_table(results["e2e"], E2E_COLUMNS, title="End-to-end RRHF step")
    print()
    if results["skipped"]:
        print_table(results["skipped"], ("item", "reason"), title="Skipped")
        print()
    for err in results["errors"]:
        print(f"ERROR in {err['item']}: {err['error']}\n{err['traceback']}")
    for row in results["e2e"]:
        if row.get("error"):
            print(f"e2e {row['model']} {row['variant']}: {row['status']}: {row['error']}")
    print_table(results["goals"], GOAL_COLUMNS, title="Goals")
    print(f"\nstatus {results['status']} after {results['elapsed_s']:.0f} s; wrote "
          f"{out_dir / (stem + '.json')} and .md", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
