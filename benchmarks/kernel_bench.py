"""Benchmark: fwd+bwd of per-candidate log-prob scores, rrhf_kernels vs the naive approach.

The naive path is what RRHF's reference code does: a full float32 log_softmax of the [N, T, V]
logits, a gather, a mask (``rrhf_kernels.reference_candidate_logprobs(compute_dtype=float32)``).
Every path is timed side by side in this process on the same inputs (fwd + bwd: the scores and
d scores / d logits for random upstream weights), and its scores are checked against naive.

Peak extra memory (beyond the inputs; the gradient itself is one logits-sized buffer):
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step (exact).
- CPU: each (path, shape, dtype) runs once more in a fresh subprocess that builds the inputs,
  resets the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), runs one
  fwd+bwd and reports ``VmHWM - VmRSS_before``: the real peak of resident memory, allocator
  slack included. Where /proc cannot be reset it falls back to the ``ru_maxrss`` delta (a lower
  bound) and says so in the ``memory_method`` field.

Bandwidth: minimum traffic of fwd+bwd is 3 logits-sized transfers (read in the forward, read
and write in the backward). ``gbps`` = 3 x logits bytes / time; on CUDA ``bandwidth_fraction``
divides that by a measured device-to-device copy (2 x bytes / copy time).

Usage::

    python benchmarks/kernel_bench.py            # the issue's shapes, fp32 and bf16
    python benchmarks/kernel_bench.py --quick    # smaller shapes, minutes on a laptop CPU
    python benchmarks/kernel_bench.py --dry      # tiny shapes, no result file (smoke test)

Function API for other scripts (benchmarks/gpu_suite)::

    from benchmarks.kernel_bench import run_kernel_bench
    rows = run_kernel_bench([(4, 1024, 128256)], ["bf16"], device="cuda")
    # each row: name, shape, dtype, ms, speedup_vs_naive, peak_extra_mb,
    #           peak_extra_vs_logits, gbps, bandwidth_fraction, max_abs_err_vs_naive, note
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
from collections.abc import Callable, Sequence

import torch

try:
    from benchmarks._common import print_table, time_fn, write_result
    from benchmarks._memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )
except ImportError:  # run as a script: this folder is on sys.path
    from _common import print_table, time_fn, write_result
    from _memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )

import rrhf_kernels

ISSUE_SHAPES = [(8, 512, 32000), (4, 1024, 128256)]
QUICK_SHAPES = [(8, 128, 32000), (2, 256, 128256)]
DRY_SHAPES = [(2, 8, 1000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LENGTH_PENALTY = 1.0
COLUMNS = ["name", "shape", "dtype", "ms", "speedup_vs_naive", "peak_extra_mb",
           "peak_extra_vs_logits", "gbps", "bandwidth_fraction", "max_abs_err_vs_naive"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the paths


def _naive(logits, labels):
    return rrhf_kernels.reference_candidate_logprobs(
        logits, labels, LENGTH_PENALTY, compute_dtype=torch.float32
    )


def _rrhf(backend: str) -> ScoreFn:
    def fn(logits, labels):
        return rrhf_kernels.candidate_logprobs(logits, labels, LENGTH_PENALTY, backend=backend)

    return fn


def _masked_mean(token_logps, labels):
    valid = labels != -100
    sums = (token_logps.float() * valid).sum(-1)
    return sums / valid.sum(-1).clamp(min=1).float() ** LENGTH_PENALTY


def _trl_path() -> ScoreFn | None:
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return None

    def fn(logits, labels):
        return _masked_mean(selective_log_softmax(logits, labels.clamp(min=0)), labels)

    return fn


def _liger_path() -> ScoreFn | None:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None

    def fn(logits, labels):
        flat = logits.reshape(-1, logits.shape[-1])
        nll = liger_cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none")
        return _masked_mean(-nll.view(labels.shape), labels)

    return fn


def available_paths(device: str, only: str | Sequence[str] | None = None) -> dict[str, ScoreFn]:
    """name -> score function, 'naive' first (the baseline); paths whose library is missing
    are left out. `only` names the paths wanted, so nothing else gets imported or compiled."""
    wanted = None if only is None else {only} if isinstance(only, str) else set(only)

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    cuda = device.startswith("cuda")
    candidates: dict[str, Callable[[], ScoreFn | None]] = {
        "naive": lambda: _naive,
        "rrhf_torch": lambda: _rrhf("torch"),
        "naive_compiled": lambda: torch.compile(_naive, dynamic=False) if cuda else None,
        "rrhf_triton": lambda: _rrhf("triton") if cuda and rrhf_kernels.triton_available() else None,
        "liger_cross_entropy": lambda: _liger_path() if cuda else None,
        "trl_selective_log_softmax": _trl_path,
    }
    paths = {}
    for name, make in candidates.items():
        fn = make() if want(name) else None
        if fn is not None:
            paths[name] = fn
    return paths


# ----------------------------------------------------------------------------- helpers


def make_inputs(shape, dtype, device, seed=0, masked_frac=0.25):
    """Random logits and labels; the first quarter of each row is prompt (ignored)."""
    n, t, v = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(n, t, v, dtype=dtype, device=device)
    for i in range(n):  # row by row: no full fp32 temporary for bf16 inputs
        logits[i] = (torch.randn(t, v, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, : int(t * masked_frac)] = -100
    labels[-1, t // 2:] = -100  # one shorter candidate, as padding makes in real batches
    weights = torch.randn(n, generator=gen)
    return logits, labels.to(device), weights.to(device)


def fwd_bwd(fn: ScoreFn, logits, labels, weights):
    """Scores and d(scores . weights)/d logits, the work one training step does here."""
    x = logits.detach().requires_grad_(True)
    scores = fn(x, labels)
    (grad,) = torch.autograd.grad(scores, x, grad_outputs=weights.to(scores.dtype))
    return scores.detach(), grad


def _memory_case(path: str, shape, dtype_name: str) -> dict:
    """In a fresh process: peak resident memory of one fwd+bwd beyond the inputs."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    fn = available_paths("cpu", only=path)[path]
    logits, labels, weights = make_inputs(shape, DTYPES[dtype_name], "cpu")
    _, mem = peak_extra_memory(lambda: fwd_bwd(fn, logits, labels, weights), "cpu")
    return mem


def _cpu_peak_extra(path: str, shape, dtype_name: str) -> dict:
    return in_fresh_process(__file__, {"path": path, "shape": list(shape), "dtype": dtype_name},
                            drop_env=["TRITON_INTERPRET"])


def _cuda_peak_extra(fn, logits, labels, weights) -> dict:
    _, mem = peak_extra_memory(lambda: fwd_bwd(fn, logits, labels, weights), "cuda")
    return mem


def copy_gbps(nbytes: int, device: str, repeat: int = 5) -> float:
    """Measured device-to-device copy bandwidth (read + write) for a logits-sized buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), warmup=2, repeat=repeat, device=device)
    return 2 * nbytes / (timing["ms"] * 1e-3) / 1e9


# ----------------------------------------------------------------------------- the bench


def run_kernel_bench(
    shapes: Sequence[tuple[int, int, int]],
    dtypes: Sequence[str] = ("fp32", "bf16"),
    device: str = "cpu",
    paths: Sequence[str] | None = None,
    repeat: int = 3,
    warmup: int = 1,
    measure_memory: bool = True,
) -> list[dict]:
    """Time (and measure peak extra memory of) fwd+bwd for each path, shape and dtype."""
    chosen = None if paths is None else ["naive", *[p for p in paths if p != "naive"]]
    available = available_paths(device, chosen)
    chosen = list(available) if chosen is None else chosen
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            logits, labels, weights = make_inputs(shape, DTYPES[dtype_name], device)
            nbytes = logits.numel() * logits.element_size()
            copy_bw = copy_gbps(nbytes, device) if device.startswith("cuda") else None
            baseline_ms = baseline_scores = None
            for name in chosen:
                row = {"name": name, "shape": "x".join(map(str, shape)), "dtype": dtype_name}
                fn = available.get(name)
                if fn is None:
                    rows.append({**row, "note": "not available here"})
                    continue
                try:
                    scores, grad = fwd_bwd(fn, logits, labels, weights)  # also the warm-up
                    del grad
                    step = functools.partial(fwd_bwd, fn, logits, labels, weights)
                    timing = time_fn(step, warmup=max(0, warmup - 1), repeat=repeat,
                                     device=device)
                except Exception as err:  # a third-party path failing must not stop the bench
                    rows.append({**row, "note": f"failed: {type(err).__name__}: {err}"[:300]})
                    continue
                if name == "naive":
                    baseline_ms, baseline_scores = timing["ms"], scores
                row["ms"] = timing["ms"]
                row["ms_min"] = timing["ms_min"]
                row["speedup_vs_naive"] = baseline_ms / timing["ms"] if baseline_ms else None
                row["max_abs_err_vs_naive"] = (
                    (scores.float() - baseline_scores.float()).abs().max().item()
                    if baseline_scores is not None else None
                )
                row["gbps"] = 3 * nbytes / (timing["ms"] * 1e-3) / 1e9
                row["bandwidth_fraction"] = row["gbps"] / copy_bw if copy_bw else None
                row["copy_gbps"] = copy_bw
                row["logits_mb"] = nbytes / 2**20
                if measure_memory:
                    if device.startswith("cuda"):
                        mem = _cuda_peak_extra(fn, logits, labels, weights)
                    else:
                        mem = _cpu_peak_extra(name, shape, dtype_name)
                    extra = mem["peak_extra_bytes"]
                    row["peak_extra_mb"] = extra / 2**20 if extra is not None else None
                    row["peak_extra_vs_logits"] = extra / nbytes if extra is not None else None
                    row["memory_method"] = mem["memory_method"]
                rows.append(row)
                print_table([row], COLUMNS)  # progress: long runs show each result as it lands
            del logits, labels, weights
            gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller shapes")
    size.add_argument("--dry", action="store_true", help="tiny shapes, write no result file")
    size.add_argument("--shapes", nargs="+", metavar="NxTxV", help="e.g. 8x512x32000")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", nargs="+", help="subset of paths (naive always runs)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--name", default="kernel_bench", help="result file name part")
    add_memory_case_option(parser)
    args = parser.parse_args(argv)

    # internal: one CPU memory measurement in this fresh process
    if answer_memory_case(args, lambda case: _memory_case(case["path"], tuple(case["shape"]),
                                                          case["dtype"])):
        return 0

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1))) if args.device == "cpu" else None
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    else:
        shapes = DRY_SHAPES if args.dry else QUICK_SHAPES if args.quick else ISSUE_SHAPES
    repeat = 1 if args.dry else args.repeat
    rows = run_kernel_bench(shapes, args.dtypes, args.device, args.paths, repeat=repeat,
                            measure_memory=not args.no_memory)
    print()
    print_table(rows, COLUMNS, title=f"fwd+bwd, {args.device}, length_penalty={LENGTH_PENALTY}")
    if not args.dry:
        path = write_result(args.name, {
            "device": args.device, "shapes": [list(s) for s in shapes], "dtypes": args.dtypes,
            "repeat": repeat, "threads": torch.get_num_threads(), "rows": rows,
            "method": "fwd+bwd wall clock median; memory: see memory_method per row",
        }, device=args.device)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
