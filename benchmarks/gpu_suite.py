"""The one prepared GPU suite: kernel correctness, kernel benchmark, end-to-end RRHF step.

Made for a rare, short window on a bare GPU machine: one call, a global time budget, results
written after every item. What it runs and why, its goals, its output files, how to prepare the
wheels and the device command: benchmarks/README.md. `--dry` runs the same code on tiny shapes
on the CPU (tests/benchmark_scripts/test_gpu_suite.py).

Entry point only; the jobs live beside it: _suite_setup (wheel install, imports, versions),
_suite_runner (plans, time budget, items), _suite_checks (kernel vs float64, pytest -m gpu),
_suite_output (goals, results files, summary).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _suite_output import evaluate_goals, print_summary, write_outputs
from _suite_runner import Suite, dry_plan, gpu_plan, run_sections
from _suite_setup import DEFAULT_WHEEL_DIR, ensure_project_importable, install_wheels, versions

BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter); used by the tests")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="global time budget in seconds (default 480; dry 900)")
    parser.add_argument("--only", nargs="+", choices=("correctness", "kernel", "e2e", "tests", "hidden", "shared", "plan",
                                 "recipe"),
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
        "goals": [], "correctness": [], "kernel": [], "e2e": [], "hidden": [], "hidden_correctness": [],
        "plan": [], "recipe_step": [], "shared": [], "shared_correctness": [],
        "gpu_tests": {},
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
    sections = set(args.only or ("correctness", "kernel", "e2e", "tests", "hidden", "shared", "plan",
                                 "recipe"))
    try:
        run_sections(suite, plan, device, sections)
        results["status"] = "complete" if not results["skipped"] else "partial"
    finally:
        if results["status"] == "running":
            results["status"] = "interrupted"
        write()
    print_summary(results, out_dir, stem)
    failed = [r for r in results["correctness"] + results["hidden_correctness"]
              + results["shared_correctness"] if not r.get("passed")]
    failed += [r for r in results["e2e"] if str(r.get("status", "")).startswith("error")]
    if (results.get("gpu_tests") or {}).get("status") == "failed":
        failed.append(results["gpu_tests"])
    return 1 if failed or results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
