"""Peak memory of one run, as the benchmark scripts measure it.

- CUDA: `torch.cuda.max_memory_allocated` minus the allocation before the run (exact).
- CPU: the process's resident-set high-water mark is reset (`echo 5 > /proc/self/clear_refs`),
  the run goes, and `VmHWM - VmRSS_before` is its real peak, allocator caching included; where
  /proc cannot be written, the `ru_maxrss` delta (a lower bound). The high-water mark is the
  whole process's, so a CPU measurement belongs in a fresh process (`in_fresh_process`), where
  nothing earlier has raised it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch


def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_memory(run: Callable[[], Any], device: str) -> tuple[Any, dict]:
    """Run `run()` once; return its result and {"peak_extra_bytes", "memory_method"}."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return out, {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before,
                     "memory_method": "torch.cuda.max_memory_allocated delta"}
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        before = _proc_kb("VmRSS")
    except OSError:
        before = None
    if before is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss delta (lower bound)"
    else:
        out = run()
        peak, method = _proc_kb("VmHWM"), "VmHWM reset via /proc/self/clear_refs"
    return out, {"peak_extra_bytes": max(0, peak - before) * 1024, "memory_method": method}


MEMORY_CASE_OPTION = "--_memory-case"  # how in_fresh_process hands a case to the script


def add_memory_case_option(parser: argparse.ArgumentParser) -> None:
    """The hidden option through which in_fresh_process starts the script on one case."""
    parser.add_argument(MEMORY_CASE_OPTION, dest="memory_case", help=argparse.SUPPRESS)


def answer_memory_case(args: argparse.Namespace, measure: Callable[[dict], dict]) -> bool:
    """In a process started by in_fresh_process: set the case's "threads" (when it has one),
    print `measure(rest of the case)` as the JSON line in_fresh_process reads, and return True;
    False (nothing done) in an ordinary run."""
    if not args.memory_case:
        return False
    case = json.loads(args.memory_case)
    if "threads" in case:
        torch.set_num_threads(case.pop("threads"))
    print(json.dumps(measure(case)))
    return True


def in_fresh_process(script: str, case: dict, *, drop_env: Iterable[str] = ()) -> dict:
    """Run `script --_memory-case JSON(case)` in a new interpreter and return the JSON dict it
    prints last (the script answers through add_memory_case_option and answer_memory_case); a
    failed run gives peak_extra_bytes None and the end of its stderr."""
    env = dict(os.environ)
    for name in drop_env:
        env.pop(name, None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), MEMORY_CASE_OPTION,
                           json.dumps(case)], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"peak_extra_bytes": None, "memory_method": f"failed: {proc.stderr[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
