"""Run reports: metrics.json for machines, report.md for people, a rich table for the terminal.

metrics.json layout (stable; checks outside the project read it):

    {
      "title": str,
      "created": ISO-8601 UTC time,
      "versions": {"python": ..., "rrhf-lite": ..., "torch": ..., ...},
      "metrics": nested dict whose leaves are numbers (or null for NaN/inf/missing),
      "tables": {heading: [row dict, ...]},   # the same rows report.md shows
      "notes": [str, ...],
      "images": [path relative to the run directory, ...]
    }

Only the standard library is imported here (rich, and torch for a machine's CUDA device, on
demand), so writing a report is cheap. It also holds the one table renderer and the one
environment collector the benchmarks use.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rrhf_lite.utils.io import atomic_write_text

PACKAGES = ("rrhf-lite", "torch", "transformers", "peft", "bitsandbytes", "trl", "triton",
            "datasets", "accelerate")


def package_version(dist: str) -> str | None:
    """Installed version of `dist` (tried as given and with '_' as '-'), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in dict.fromkeys((dist, dist.replace("_", "-"))):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def cuda_device() -> tuple[str | None, str | None]:
    """(CUDA device name, CUDA runtime version), or (None, None) without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.get_device_name(), torch.version.cuda


def _cpu_name() -> str:
    # /proc/cpuinfo names the model on Linux; platform.processor() is often empty there.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def collect_environment(packages: Iterable[str] = PACKAGES, *, missing: str | None = None,
                        machine: bool = False) -> dict[str, Any]:
    """The one environment collector (run reports, merge reports, every benchmark file).

    Python and package versions from installed metadata (a package absent reads `missing`);
    with `machine`, first the platform, CPU model and count, RAM in GB, CUDA device and runtime
    (torch is imported for those, on demand) and the UTC date.
    """
    info: dict[str, Any] = {}
    if machine:
        gpu, cuda = cuda_device()
        info.update({
            "machine": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "ram_gb": _ram_gb(),
            "gpu": gpu,
            "cuda": cuda,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        })
    info["python"] = platform.python_version()
    for package in packages:
        found = package_version(package)
        info[package] = missing if found is None else found
    return info


def environment_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Python and package versions, read from installed metadata (nothing is imported)."""
    return collect_environment(packages, missing="not installed")


# ----------------------------------------------------------------------------- values


def _number(value: Any, where: str) -> int | float | None:
    """A JSON-safe number: bools stay bools, NaN/inf become None (strict JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return value
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {where!r} is {type(value).__name__}, expected a number")


def clean_metrics(metrics: Mapping, prefix: str = "") -> dict:
    """Copy `metrics` with every leaf made a JSON-safe number; a non-number names its key path."""
    out = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out[str(key)] = clean_metrics(value, prefix=f"{path}.")
        else:
            out[str(key)] = _number(value, path)
    return out


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}. Dots join levels; names may themselves contain '/'."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _cell_json(value: Any) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    try:
        return _number(value, "table cell")
    except TypeError:
        return str(value)


def format_value(value: Any) -> str:
    """How a number reads in a table: 4 decimals in the usual range, scientific outside it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:.4f}".rstrip("0").rstrip(".")
        return f"{value:.3e}"
    return str(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _columns(rows: Sequence[Mapping], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(str(k) for k in row))
    return list(seen)


# ----------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    # A pipe would end the cell and a newline the row.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, *,
                 plain: bool = False, title: str | None = None,
                 cell: Callable[[Any], str] = format_value) -> str:
    """The one table renderer: rows (dicts; keys may differ between rows) as a table.

    Columns are the union of the keys in first-seen order unless `columns` names them; a missing
    cell is `cell(None)`. Markdown by default (GitHub; numeric columns right-aligned, pipes and
    newlines escaped); `plain` gives fixed-width text for a terminal, left-aligned, under a
    dashed rule. `title` goes on a line of its own above; `cell` turns a value into text
    (format_value, or a benchmark's shorter style).
    """
    rows = list(rows)
    cols = _columns(rows, columns)
    head = [title] if title else []
    if not rows or not cols:
        return "\n".join([*head, "(no rows)"]) if plain else "_(no rows)_\n"
    cells = [[cell(row.get(c)) for c in cols] for row in rows]
    if plain:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = [*head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)
    numeric = {
        c: all(_is_numeric(r[c]) for r in rows if r.get(c) is not None)
        and any(r.get(c) is not None for r in rows)
        for c in cols
    }
    lines = [*head, *([""] if head else []),
             "| " + " | ".join(_md_cell(c) for c in cols) + " |",
             "|" + "|".join("---:" if numeric[c] else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in cells]
    return "\n".join(lines) + "\n"


def render_markdown(document: Mapping) -> str:
    """report.md from the metrics.json document, so the two always hold the same numbers."""
    parts = [f"# {document['title']}\n"]
    versions = document["versions"]
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v != "not installed")
    parts.append(f"Created {document['created']} ({shown}).\n")
    for heading, rows in document["tables"].items():
        parts.append(f"## {heading}\n\n{format_table(rows)}")
    flat = flatten_metrics(document["metrics"])
    if flat:
        rows = [{"metric": k, "value": v} for k, v in flat.items()]
        parts.append(f"## All metrics\n\n{format_table(rows)}")
    if document["images"]:
        parts.append("## Plots\n\n" + "\n".join(
            f"![{Path(p).stem}]({p})\n" for p in document["images"]
        ))
    if document["notes"]:
        parts.append("## Notes\n\n" + "".join(f"- {note}\n" for note in document["notes"]))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the writer


def write_run_report(
    run_dir: str | Path,
    metrics: Mapping,
    *,
    title: str,
    tables: Sequence[tuple[str, Sequence[Mapping]]] = (),
    notes: Sequence[str] = (),
    images: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Write run_dir/metrics.json and run_dir/report.md (each atomically); return their paths.

    metrics: nested dict of numbers (torch/numpy scalars accepted; NaN/inf stored as null).
    tables: (heading, rows) pairs shown first in report.md and kept under "tables".
    images: plot files, linked from report.md relative to run_dir.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    named_tables: dict[str, list[dict]] = {}
    for heading, rows in tables:
        name, n = str(heading), 2
        while name in named_tables:  # two tables with one heading must not overwrite each other
            name, n = f"{heading} ({n})", n + 1
        named_tables[name] = [{str(k): _cell_json(v) for k, v in row.items()} for row in rows]
    document = {
        "title": title,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        "metrics": clean_metrics(metrics),
        "tables": named_tables,
        "notes": [str(n) for n in notes],
        "images": [_relative(p, run_dir) for p in images],
    }
    metrics_path = atomic_write_text(
        run_dir / "metrics.json", json.dumps(document, indent=2, allow_nan=False) + "\n"
    )
    report_path = atomic_write_text(run_dir / "report.md", render_markdown(document))
    return {"metrics": metrics_path, "report": report_path}


def update_run_report(run_dir: str | Path, metrics: Mapping,
                      tables: Sequence[tuple[str, Sequence[Mapping]]] = ()) -> bool:
    """Add or replace top-level metrics and tables (by heading) of an existing report: rewrite
    metrics.json and report.md from the updated document, both atomically. For results known
    only after the report was written (the wall time of the stage that wrote it, and of later
    ones). Returns False, writing nothing, when run_dir has no metrics.json."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.exists():
        return False
    document = json.loads(path.read_text(encoding="utf-8"))
    document["metrics"].update(clean_metrics(metrics))
    for heading, rows in tables:
        document["tables"][str(heading)] = [{str(k): _cell_json(v) for k, v in row.items()}
                                            for row in rows]
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    atomic_write_text(run_dir / "report.md", render_markdown(document))
    return True


def _relative(path: str | Path, run_dir: Path) -> str:
    """A link report.md can follow: relative to run_dir (paths are taken as given from cwd,
    unless they already name a file inside run_dir)."""
    path = Path(path)
    if not path.is_absolute() and (run_dir / path).exists():
        return path.as_posix()
    return Path(os.path.relpath(path.resolve(), run_dir.resolve())).as_posix()


# ----------------------------------------------------------------------------- terminal


def print_summary_table(
    rows: Sequence[Mapping],
    *,
    title: str | None = None,
    columns: Sequence[str] | None = None,
    console=None,
):
    """Print rows as a rich table (numbers right-aligned, same formatting as report.md)."""
    from rich.console import Console
    from rich.table import Table

    rows = list(rows)
    cols = _columns(rows, columns)
    table = Table(title=title, show_lines=False)
    for col in cols:
        numeric = any(_is_numeric(r.get(col)) for r in rows)
        table.add_column(col, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(format_value(row.get(c)) for c in cols))
    (console or Console()).print(table)
    return table
