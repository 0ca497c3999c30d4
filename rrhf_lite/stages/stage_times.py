"""Wall time of each stage of a run, kept in the run directory so a resumed run still reports
the stages an earlier command ran: each stage's seconds are summed over the commands that ran
it (a stage skipped by a command adds nothing; a training resumed from its checkpoint, or an
evaluation that only adds a new variant, adds its own time to the first command's).

    run_dir/stage_times.json   {"model": 41.2, "round-1/sample": 63.0, "round-1/train": 95.1, ...}

Names: "model" (resolving the base model: a built-in's first conversion or warm-up, else ~0),
"round-<N>/<stage>", "ablation/<name>/train", "evaluate", "merge". Written atomically after
each stage; evaluate and merge copy the whole record into metrics.json and report.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rrhf_lite.utils.io import atomic_write_text

FILE_NAME = "stage_times.json"


def read_stage_times(run_dir: str | Path) -> dict[str, float]:
    """The recorded times (seconds), in the order the stages first ran; {} when none."""
    path = Path(run_dir) / FILE_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # a hand-edited or foreign file: the times are only a report
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}


# Times measured before any stage wrote a result (the model's resolution): held in memory and
# written with the first stage's, so a run stopped by bad input leaves no file behind (its run
# directory keeps only recipe.yaml and may be reused by a corrected recipe).
_pending: dict[str, dict[str, float]] = {}


def record_stage_time(run_dir: str | Path, name: str, seconds: float) -> dict[str, float]:
    """Add `seconds` to one stage's time (a new stage starts at 0); return the whole record."""
    times = read_stage_times(run_dir)
    for early, value in _pending.pop(str(run_dir), {}).items():
        times[early] = round(times.get(early, 0.0) + value, 2)
    times[name] = round(times.get(name, 0.0) + float(seconds), 2)
    atomic_write_text(Path(run_dir) / FILE_NAME, json.dumps(times, indent=2) + "\n")
    return times


@contextmanager
def timed_stage(run_dir: str | Path | None, name: str, enabled: bool = True,
                defer: bool = False) -> Iterator[None]:
    """Record the wall time of the block under `name` when it finishes without an error (a
    failed stage has no time to report). run_dir None (no directory yet) or not `enabled`
    (another process than the main one): nothing is written. `defer`: keep the time in memory
    until the next stage's is recorded (for work that writes no result of its own)."""
    start = time.perf_counter()
    yield
    if run_dir is None or not enabled:
        return
    seconds = time.perf_counter() - start
    if defer:
        pending = _pending.setdefault(str(run_dir), {})
        pending[name] = pending.get(name, 0.0) + seconds
    else:
        record_stage_time(run_dir, name, seconds)


def stage_time_rows(times: dict[str, float]) -> list[dict]:
    """Rows for a report table: each stage, its seconds, and a total over all of them."""
    rows = [{"stage": name, "wall_s": round(seconds, 1)} for name, seconds in times.items()]
    if rows:
        rows.append({"stage": "total", "wall_s": round(sum(times.values()), 1)})
    return rows
