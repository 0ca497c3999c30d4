"""GPU suite, output: the goals' verdicts, the results files (OUT/<stem>.json and .md, rewritten
after every item) and the summary printed at the end. Tables come from the one renderer,
rrhf_lite.utils.report_files.format_table (imported on use: the project is importable only after setup).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _suite_runner import Plan

GOAL_BANDWIDTH_FRACTION = 0.80
GOAL_SPEEDUP_VS_NAIVE = 3.0
GOAL_PEAK_GB = 12.0
GOAL_HIDDEN_PEAK_VS_LOGITS = 0.10
GOAL_SHARED_SPEEDUPS = (("P200 R100 k6", 1.8), ("P30 R30 k2", 1.2))  # shared vs unshared step
GOAL_RECIPE_PLAN_ERR = 0.05  # |plan / measured - 1| of the 8 GB recipe's step


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
    hidden = [r for r in results.get("hidden", []) if r.get("path") == "hidden_fused"
              and r.get("shape", "").endswith("x128256")]
    goal("hidden-state log-probs: peak extra <= 10 % of one logits buffer (V = 128256)",
         hidden[0].get("peak_extra_vs_logits") if hidden else None, GOAL_HIDDEN_PEAK_VS_LOGITS,
         False, f"hidden_fused {hidden[0]['dtype']} {hidden[0]['shape']}" if hidden else "V = 128256")
    hidden_checked = results.get("hidden_correctness", [])
    goals.append({"goal": "hidden-state log-probs match the float64 reference",
                  "target": len(hidden_checked),
                  "measured": sum(bool(r.get("passed")) for r in hidden_checked),
                  "status": ("NOT MEASURED" if not hidden_checked else
                             "PASS" if all(r.get("passed") for r in hidden_checked) else "FAIL"),
                  "where": f"{len(hidden_checked)} cases"})
    shared = [r for r in results.get("shared", []) if r.get("mode") == "shared"]
    for shape, target in GOAL_SHARED_SPEEDUPS:
        row = _find(shared, shape=shape) or {}
        goal(f"shared prompt: training step at {shape} >= {target}x unshared",
             row.get("speed_vs_unshared"), target, True, f"SmolLM2-135M shape fp32 {shape}")
    ratios = [r["memory_vs_unshared"] for r in shared if r.get("memory_vs_unshared") is not None]
    goal("shared prompt: peak memory no higher than unshared (every shape)",
         max(ratios) if ratios else None, 1.0, False, f"{len(ratios)} shapes")
    shared_checked = results.get("shared_correctness", [])
    goals.append({"goal": "shared prompt: packed = unshared sums and gradients (<= 1e-5)",
                  "target": len(shared_checked),
                  "measured": sum(bool(r.get("passed")) for r in shared_checked),
                  "status": ("NOT MEASURED" if not shared_checked else
                             "PASS" if all(r.get("passed") for r in shared_checked) else "FAIL"),
                  "where": ", ".join(str(r.get("attn")) for r in shared_checked) or "-"})
    recipe = [r for r in results.get("recipe_step", []) if r.get("err") is not None]
    goals.append({"goal": "8 GB recipe's training step: measured peak within 5 % of the plan",
                  "target": GOAL_RECIPE_PLAN_ERR,
                  "measured": recipe[0]["err"] if recipe else None,
                  "status": ("NOT MEASURED" if not recipe else "PASS"
                             if abs(recipe[0]["err"]) <= GOAL_RECIPE_PLAN_ERR else "FAIL"),
                  "where": (f"{recipe[0]['model']}, {recipe[0]['layers']} blocks, k {recipe[0]['k']} x "
                            f"{recipe[0]['seq_len']}" if recipe else "recipes/llama3_8b_qlora_8gb.yaml")})
    return goals


# --------------------------------------------------------------------------- output

KERNEL_COLUMNS = ("name", "shape", "dtype", "ms", "speedup_vs_naive", "gbps",
                  "bandwidth_fraction", "peak_extra_mb", "max_abs_err_vs_naive", "note")
CORRECTNESS_COLUMNS = ("name", "valid_tokens", "max_sum_err", "sum_err_vs_tol", "max_grad_err",
                       "grad_err_vs_tol", "ignored_grad_max", "passed")
E2E_COLUMNS = ("model", "variant", "peak_memory_gb", "memory_vs_reference", "step_s",
               "speedup_vs_reference", "model_memory_gb", "build_s", "status")
HIDDEN_COLUMNS = ("path", "shape", "dtype", "ms", "speed_vs_logits", "peak_extra_mb",
                  "peak_extra_vs_logits", "max_abs_err_vs_logits")
PLAN_COLUMNS = ("shape", "k", "micro_batch", "seq_len", "meas_total_mb", "pred_total_mb",
                "err_total", "pred_peak_at")
RECIPE_COLUMNS = ("recipe", "layers", "k", "micro_batch", "seq_len", "prompt_len", "meas_gib",
                  "plan_gib", "err", "plan_peak_at", "recipe_plan_gib", "step_s")
SHARED_COLUMNS = ("mode", "shape", "tokens", "ms", "speed_vs_unshared", "peak_extra_mb",
                  "memory_vs_unshared", "loss_diff")
SHARED_CHECK_COLUMNS = ("name", "max_sum_err", "max_grad_err", "tolerance", "passed", "error")
GOAL_COLUMNS = ("goal", "status", "measured", "target", "where")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A results table for the .md file: the one renderer, in the benchmarks' cell style."""
    from _common import short_value

    from rrhf_lite.utils.report_files import format_table

    return format_table(rows, columns, cell=short_value)


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
        "## Log-probs from hidden states vs from logits (head + log-prob sums, fwd+bwd; peak "
        "extra memory in units of one logits buffer)\n",
        markdown_table(results.get("hidden", []), HIDDEN_COLUMNS),
        markdown_table(results.get("hidden_correctness", []), ("name", "max_sum_err", "sum_err_vs_tol", "max_grad_err", "grad_err_vs_tol", "passed")),
        "## Shared prompt: one training step, packed vs unshared rows (median ms; peak extra "
        "memory of a step)\n", markdown_table(results.get("shared", []), SHARED_COLUMNS),
        markdown_table(results.get("shared_correctness", []), SHARED_CHECK_COLUMNS),
        "## Memory plan vs measured (rrhf-lite plan; err = predicted / measured - 1)\n",
        markdown_table(results.get("plan", []), PLAN_COLUMNS),
        "## The 8 GB recipe's training step vs its plan (GiB; err = plan / measured - 1; "
        "recipe_plan: the recipe's own worst case)\n",
        markdown_table(results.get("recipe_step", []), RECIPE_COLUMNS),
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
    from rrhf_lite.utils.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    results["elapsed_s"] = round(time.monotonic() - results["_start"], 1)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(public, indent=2, default=str) + "\n")
    atomic_write_text(md_path, to_markdown(public))
    return json_path, md_path


def print_summary(results: dict[str, Any], out_dir: Path, stem: str) -> None:
    """The tables, errors and goals on stdout, after the last write."""
    from _common import print_table

    print()
    print_table(results["correctness"], CORRECTNESS_COLUMNS, title="Kernel correctness")
    print()
    print_table(results["kernel"], KERNEL_COLUMNS, title="Kernel fwd+bwd")
    print()
    print_table(results["e2e"], E2E_COLUMNS, title="End-to-end RRHF step")
    print()
    print_table(results.get("hidden", []), HIDDEN_COLUMNS, title="Log-probs from hidden states")
    print_table(results.get("shared", []), SHARED_COLUMNS, title="Shared prompt vs unshared step")
    print_table(results.get("shared_correctness", []), SHARED_CHECK_COLUMNS, title="Shared prompt exactness")
    print_table(results.get("plan", []), PLAN_COLUMNS, title="Memory plan vs measured")
    print_table(results.get("recipe_step", []), RECIPE_COLUMNS, title="8 GB recipe step vs plan")
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
