"""GPU suite, runner: what runs (the plan of each mode), in which order, within the global
time budget; each item is skipped when it cannot fit, stopped at its cap, and followed by a
write of the results (so a cut-off run still leaves a file).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _suite_checks import check_case, run_gpu_tests


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
    # log-probs from hidden states (benchmarks/hidden_logprob_bench.py): (N, T, H, V) shapes
    hidden_shapes: tuple[tuple[int, int, int, int], ...] = ()
    hidden_dtype: str = "bf16"
    plan_shapes: tuple[str, ...] = ()  # benchmarks/plan_vs_measured.SHAPES measured on the device
    # shared-prompt packing (benchmarks/shared_prompt_bench.py): (prompt, response, k) step
    # shapes, and the attention implementations whose exactness is checked
    shared_shapes: tuple[tuple[int, int, int], ...] = ()
    shared_check_attn: tuple[str, ...] = ()
    # the 8 GB recipe's training step against the plan (benchmarks/recipe_step_bench.py)
    recipe_step: bool = False


def gpu_plan() -> Plan:
    vocabs = (32000, 128256, 151936, 262144)
    cases = [(d, 3, 37, 32000) for d in ("bf16", "fp32", "fp16")]  # odd small shape first
    cases += [(d, 8, 1024, v) for d in ("bf16", "fp32", "fp16") for v in vocabs]
    goal = ((4, 1024, 128256), "bf16", "rrhf_triton")
    rest = (((8, 512, 32000), "bf16"), ((4, 1024, 128256), "fp32"), ((8, 512, 32000), "fp32"),
            ((4, 1024, 262144), "bf16"), ((4, 1024, 128256), "fp16"))
    return Plan(tuple(cases), goal, rest, kernel_repeat=5, kernel_memory=True,
                e2e_models=("llama3-8b", "llama2-7b"), e2e_goal_model="llama3-8b",
                e2e_shape=dict(k=4, seq_len=512, prompt_len=64), e2e_steps=3, budget_s=480.0,
                hidden_shapes=((4, 1024, 4096, 128256), (8, 512, 2048, 49152)),
                plan_shapes=("llama-s", "llama-m", "llama-l"),
                shared_shapes=((200, 100, 6), (30, 30, 2), (30, 30, 4)),
                shared_check_attn=("sdpa", "eager", "flex_attention", "segments-sdpa",
                                   "segments-eager"), recipe_step=True)


def dry_plan() -> Plan:
    # Same structure, tiny: V = 5000 > the kernel's 4096-wide tile gives two tiles per row.
    cases = [(d, 3, 6, v) for d in ("bf16", "fp32", "fp16") for v in (37, 5000)]
    # kernel_bench offers the Triton path on CUDA only; on CPU the goal row is the torch backend.
    goal = ((2, 8, 1000), "bf16", "rrhf_torch")
    return Plan(tuple(cases), goal, (((2, 8, 1000), "fp32"),), kernel_repeat=1,
                kernel_memory=False, e2e_models=("tiny-llama3",), e2e_goal_model="tiny-llama3",
                e2e_shape=dict(k=4, seq_len=16, prompt_len=4), e2e_steps=1, budget_s=900.0,
                hidden_shapes=((2, 8, 16, 300),), hidden_dtype="fp32",
                plan_shapes=("tiny",), shared_shapes=((6, 5, 3),),
                shared_check_attn=("sdpa", "eager", "segments-sdpa"), recipe_step=True)


# --------------------------------------------------------------------------- time budget


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


# --------------------------------------------------------------------------- items


def run_sections(suite: Suite, plan: Plan, device: str, sections: set[str]) -> None:
    """The sections asked for, as items, most important first (benchmarks/README.md)."""
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
            if model == plan.e2e_goal_model and "plan" in sections:
                run_plan_item(suite, plan, device)
            if model == plan.e2e_goal_model and "recipe" in sections:
                run_recipe_item(suite, plan, device)
    elif "tests" in sections:
        run_tests_item()
    if "hidden" in sections:
        def hidden():
            from hidden_logprob_bench import check_against_reference, run_op_bench

            for shape in plan.hidden_shapes:
                row = check_against_reference(shape, plan.hidden_dtype, device)
                results["hidden_correctness"].append(row)
                print(f"  {row['name']}: {'ok' if row['passed'] else 'FAILED'}", flush=True)
                results["hidden"].extend(run_op_bench([shape], plan.hidden_dtype, device,
                                                      repeat=plan.kernel_repeat,
                                                      measure_memory=plan.kernel_memory))
                _free_memory()

        suite.run_item("hidden-state log-probs", 60 if device == "cuda" else 5, hidden,
                       cap_s=150 if device == "cuda" else None)
    if "shared" in sections:
        run_shared_item(suite, plan, device)
    if "plan" in sections and "e2e" not in sections:
        run_plan_item(suite, plan, device)
    if "recipe" in sections and "e2e" not in sections:
        run_recipe_item(suite, plan, device)
    if "kernel" in sections:
        kernel_item(goal_shape, goal_dtype, label=" (all paths)")  # compiled naive, Liger, TRL
        for shape, dtype_name in plan.kernel_rest:
            kernel_item(shape, dtype_name)


def run_plan_item(suite: Suite, plan: Plan, device: str) -> None:
    """`rrhf-lite plan`'s prediction against the measured peak: the plan_vs_measured shapes run
    here (GPU: bf16 autocast, max_memory_allocated; dry: the tiny shape on CPU, profiled), and
    beside every e2e row measured so far."""
    results = suite.results

    def run():
        from plan_vs_measured import GPU_CONFIGS, QUICK, e2e_rows_vs_plan, measure_shape

        shapes = plan.plan_shapes
        configs = GPU_CONFIGS if device == "cuda" else QUICK
        results["plan"].extend(e2e_rows_vs_plan(results["e2e"], plan.e2e_shape["prompt_len"]))
        for name in shapes:
            results["plan"].extend(measure_shape(name, configs, device))
            _free_memory()

    suite.run_item("plan vs measured", 30 if device == "cuda" else 10, run,
                   cap_s=90 if device == "cuda" else None)


def run_recipe_item(suite: Suite, plan: Plan, device: str) -> None:
    """recipes/llama3_8b_qlora_8gb.yaml's training step (all 32 blocks of Llama-3-8B's shape,
    random weights) measured with max_memory_allocated against `rrhf-lite plan` for the same
    shape (dry: a tiny width on the CPU, the step runs, the plan is computed, nothing measured)."""
    if not plan.recipe_step:
        return
    results = suite.results

    def run():
        from recipe_step_bench import run_recipe_step

        run_recipe_step(device=device, dry=device != "cuda", on_row=results["recipe_step"].append)

    suite.run_item("recipe step vs plan", 100 if device == "cuda" else 10, run,
                   cap_s=240 if device == "cuda" else None)


def run_shared_item(suite: Suite, plan: Plan, device: str) -> None:
    """Shared-prompt packing: packed vs unshared exactness per attention implementation, then
    the training step side by side per shape (a random LLaMA of SmolLM2-135M's shape, fp32;
    dry: a tiny one). Rows are kept shape by shape, so a stop keeps what was measured."""
    results = suite.results

    def run():
        from shared_prompt_bench import check_exactness, run_shared_bench

        for attn in plan.shared_check_attn:
            try:
                row = check_exactness(device, attn)
            except Exception as err:  # noqa: BLE001 - e.g. flex attention missing: say so, go on
                row = {"name": f"shared prompt exactness {attn} fp32", "attn": attn, "passed": False,
                       "error": f"{type(err).__name__}: {err}"[:500]}
            results["shared_correctness"].append(row)
            print(f"  {row['name']}: {'ok' if row['passed'] else 'FAILED'}", flush=True)
        for shape in plan.shared_shapes:
            results["shared"].extend(run_shared_bench(
                [shape], device, repeat=plan.kernel_repeat, attn="sdpa", dry=device != "cuda",
                measure_memory=plan.kernel_memory))
            _free_memory()

    suite.run_item("shared prompt", 60 if device == "cuda" else 5, run,
                   cap_s=150 if device == "cuda" else None)


def add_kernel_rows(rows: list[dict], new_rows: Sequence[dict]) -> None:
    """Append benchmark rows, keeping the first row of each (name, shape, dtype): a second run
    of a shape repeats its naive baseline, whose ratios are already in the first."""
    seen = {(r.get("name"), r.get("shape"), r.get("dtype")) for r in rows}
    for row in new_rows:
        key = (row.get("name"), row.get("shape"), row.get("dtype"))
        if key not in seen:
            rows.append(row)
            seen.add(key)

