"""Shared helpers for rrhf-lite benchmark scripts (a stable API).

Every benchmark is a script that runs its baseline side by side in the same process, prints a
table of ratios, and records a JSON file with the machine, date and versions. Use these helpers
so that all result files look alike.

Importing: a script in ``benchmarks/`` run as ``python benchmarks/x.py`` has this folder on
``sys.path``, so ``from _common import ...`` works; run from the repository root as a module
(``python -m benchmarks.x``) use ``from benchmarks._common import ...``. Scripts that want both
can do::

    try:
        from benchmarks._common import environment_info, write_result, print_table
    except ImportError:
        from _common import environment_info, write_result, print_table

Public API (names and meaning kept stable):

``environment_info() -> dict``
    ``machine`` (hostname-free platform string), ``cpu`` (model name), ``cpu_count``,
    ``ram_gb``, ``gpu`` (CUDA device name or None), ``cuda`` (CUDA runtime version or None),
    ``date`` (UTC ISO-8601), ``python``, and versions of ``torch``, ``triton``,
    ``transformers``, ``peft``, ``bitsandbytes``, ``trl``, ``liger_kernel`` (None if absent).
    Collected by ``rrhf_lite.utils.report_files.collect_environment`` (the one environment collector).

``device_tag(device=None) -> str``
    Short file-name-safe tag: ``"cpu"`` or the GPU name, e.g. ``"nvidia-h100-80gb-hbm3"``.

``write_result(name, payload, device=None, results_dir=None) -> pathlib.Path``
    Writes ``benchmarks/results/<YYYY-MM-DD>-<device_tag>-<name>.json`` atomically (temp
    file + ``os.replace``). The file holds ``{"name", "environment": environment_info(),
    **payload}``; returns the path.

``format_table(rows, columns=None, title=None) -> str`` / ``print_table(...) -> str``
    A plain fixed-width text table of ``rows`` (list of dicts; ``columns`` picks and orders
    keys, default: every key, in first-seen order). Floats print with 4 significant digits;
    None as ``-`` (``short_value``). ``print_table`` prints it and returns the same string.
    Both are ``rrhf_lite.utils.report_files.format_table`` (the one table renderer) in its plain style.

``time_fn(fn, warmup=1, repeat=5, device=None) -> dict``
    Calls ``fn()`` ``warmup`` times, then ``repeat`` times, synchronising CUDA around each
    call when ``device`` is a CUDA device. Returns ``{"ms": median, "ms_min", "ms_max",
    "repeat"}`` in milliseconds (wall clock).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rrhf_lite.utils.io import atomic_write_text
from rrhf_lite.utils.report_files import collect_environment, cuda_device
from rrhf_lite.utils.report_files import format_table as render_table

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_VERSIONED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "liger_kernel")


def environment_info() -> dict[str, Any]:
    """Machine, date and library versions, for the header of every result file."""
    return collect_environment(_VERSIONED, machine=True)


def device_tag(device: Any = None) -> str:
    """'cpu', or the CUDA device's name made file-name safe."""
    dev = str(device) if device is not None else None
    if dev is None or dev.startswith("cuda"):
        gpu, _ = cuda_device()
        if gpu is not None:
            return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return "cpu"


def write_result(
    name: str,
    payload: dict[str, Any],
    device: Any = None,
    results_dir: str | Path | None = None,
) -> Path:
    """Write results/<date>-<device>-<name>.json atomically and return its path."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"result name {name!r} must be letters, digits, '_', '-', '.'")
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    path = out_dir / f"{date}-{device_tag(device)}-{name}.json"
    record = {"name": name, "environment": environment_info(), **payload}
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def short_value(value: Any) -> str:
    """A benchmark table cell: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Fixed-width text table of a list of dicts (rrhf_lite.utils.report_files.format_table, plain)."""
    return render_table(rows, columns, plain=True, title=title, cell=short_value)


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    text = format_table(rows, columns, title)
    print(text, flush=True)
    return text


def time_fn(
    fn: Callable[[], Any], warmup: int = 1, repeat: int = 5, device: Any = None
) -> dict[str, float]:
    """Median wall-clock milliseconds of fn(), CUDA-synchronised when device is CUDA."""
    sync = None
    if device is not None and str(device).startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "repeat": len(times),
    }


def run_recipe_timed(recipe: str | Path, out: str | Path, overrides: Sequence[str], *,
                     env: dict | None = None, log: Path | None = None, log_mode: str = "a"
                     ) -> dict[str, Any]:
    """`rrhf-lite run RECIPE --output-dir OUT --set ITEM ...` in a child process, timed.

    Its output goes to `log` (opened with `log_mode`), or is captured and returned as "output".
    Returns {"returncode", "wall_s", "cpu_s" (the child's user + system time: what the run got
    of a shared CPU), "load_avg_1m_before", "load_avg_1m_after"} (+ "output")."""
    cmd = [sys.executable, "-m", "rrhf_lite.cli", "run", str(recipe), "--output-dir", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    load_before = os.getloadavg()[0]
    start, cpu_start = time.time(), os.times()
    if log is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    else:
        with open(log, log_mode, encoding="utf-8") as handle:
            proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - start
    cpu_end = os.times()
    cpu = (cpu_end.children_user - cpu_start.children_user) + (
        cpu_end.children_system - cpu_start.children_system)
    result = {"returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu,
              "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    if log is None:
        result["output"] = proc.stdout + proc.stderr
    return result
