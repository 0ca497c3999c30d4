"""Whether a stage of `rrhf-lite run` reruns: beside each output lies a record of what it was
made from (rrhf_lite.pipeline.stage_inputs); a rerun compares it with what the stage would read
now. Same inputs: the output is kept. Changed inputs: the output (and a stage's partial work,
such as training checkpoints) is removed, each path said, and the stage runs again, with one log
line naming what changed. A later stage reads the earlier one's output by its bytes, so it
reruns exactly when that output was rewritten differently.

A record is written once its stage has finished. Outputs without one (an older rrhf-lite's, or
a killed command's partial work such as checkpoints) are judged as make judges files: kept
(resumed) when the recipe keys the stage reads are as in the run directory's recipe.yaml and no
file it reads is newer; a kept output's record is then written, so the next run compares
records.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rrhf_lite.config.recipe import Recipe
from rrhf_lite.pipeline.stage_inputs import StageInputs, recipe_values
from rrhf_lite.utils import distributed
from rrhf_lite.utils.console import say
from rrhf_lite.utils.digest import modified_times
from rrhf_lite.utils.io import write_json

RECORD_VERSION = 1
VALUE_CHARS = 40  # a value longer than this is shortened in the log
REASONS_SHOWN = 4  # the rest are counted


@dataclass(frozen=True)
class StageOutput:
    """One stage's output in the run directory: `done` exists once the stage finished; `record`
    holds the inputs it was made from; `partial` is what else a rerun clears (checkpoints)."""

    what: str  # the stage as the log names it: "round 1: score"
    done: Path
    record: Path
    partial: tuple[Path, ...] = ()


# ------------------------------------------------------------------------------ differences


def short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each dotted key whose value differs (absent = not in that recipe)."""
    out = []
    for key in [*old, *(k for k in new if k not in old)]:
        if old.get(key, ...) != new.get(key, ...):
            before = short(old[key]) if key in old else "(absent)"
            after = short(new[key]) if key in new else "(absent)"
            out.append(f"{key}: {before} -> {after}")
    return out


def summary(reasons: list[str], shown: int = REASONS_SHOWN) -> str:
    more = len(reasons) - shown
    return "; ".join(reasons[:shown]) + (f"; and {more} more" if more > 0 else "")


def record_changes(old: dict, new: dict) -> list[str]:
    """What differs between a stage's record and its inputs now. A file that is not there now
    (None) is not held against the output: it may have been deleted to save space."""
    reasons = key_changes(old.get("recipe", {}), new["recipe"])
    before, now = old.get("content", {}), new["content"]
    for label in [*before, *(k for k in now if k not in before)]:
        if label not in now:
            reasons.append(f"{label}: no longer read")
        elif label not in before:
            reasons.append(f"{label}: now read")
        elif None not in (before[label], now[label]) and before[label] != now[label]:
            reasons.append(f"{label} changed")
    return reasons


def _legacy_changes(made: Path, inputs: StageInputs, earlier: Recipe | None) -> list[str]:
    """Why an output (or partial work) without a record cannot be kept; [] = it can. Such an
    output was written by an older rrhf-lite, or by a command that stopped before recording
    it: the run directory's recipe.yaml (as it was before this command) is what made it."""
    if earlier is None:
        return ["no record of its inputs, and no readable recipe.yaml to vouch for it"]
    reasons = key_changes(recipe_values(earlier, inputs.keys), inputs.values)
    times = modified_times(made)
    for path in inputs.files:
        theirs = modified_times(path)
        if times and theirs and theirs[1] > times[0]:
            reasons.append(f"{path} is newer than {made.name}")
    return reasons


# ------------------------------------------------------------------------------ the decision


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def stage_runs(out: StageOutput, inputs: StageInputs, *, runs: bool, earlier: Recipe | None,
               say_skip: bool = True) -> bool:
    """Whether the stage runs now. Kept: its output stands ("skipped"). Changed: the output,
    its partial work and its record are removed, and True returned when this command runs the
    stage (`runs`); otherwise a warning says the output is out of date and it is used as it
    is. Call write_record once the stage has finished."""
    old = _read(out.record)
    done = out.done.exists()
    made = out.done if done else next((p for p in out.partial if p.exists()), None)
    if old is None:
        if made is None:
            return runs
        reasons = _legacy_changes(made, inputs, earlier)
        if not reasons:
            if done:
                say(f"{out.what} skipped, found {out.done} (no record of its inputs: kept, as "
                    "the recipe keys it reads are unchanged and no file it reads is newer; "
                    "recorded now)")
                write_record(out, inputs)
            return runs and not done  # partial work (checkpoints) of these inputs: resumed
    else:
        reasons = record_changes(old, inputs.record())
        if not reasons:
            if done and say_skip:
                say(f"{out.what} skipped, found {out.done}")
            return runs and not done
    if not runs:
        if done:
            say(f"warning: {out.what} is out of date ({summary(reasons)}); this command does "
                "not run that stage, so the old output is used; `rrhf-lite run` redoes it")
        return False
    say(f"{out.what} reruns: {summary(reasons)}")
    _clear(out)
    return True


def _clear(out: StageOutput) -> None:
    every = (out.done, *out.partial)
    # a path inside another one (train/adapter in train/) goes with it: named once
    paths = [p for p in every if p.exists() and not any(o in p.parents for o in every)]
    if paths:
        say(f"{out.what}: removing {', '.join(str(p) for p in paths)}")
    if distributed.is_main_process():
        for path in paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        # a killed rerun leaves partial work without a record: judged by its times, not by
        # the record of what it replaced
        out.record.unlink(missing_ok=True)


def write_record(out: StageOutput, inputs: StageInputs) -> None:
    """Record the inputs a finished stage's output was made from (after it finished: a stage
    that stopped on bad input leaves the run directory as it was)."""
    if distributed.is_main_process():
        write_json(out.record, {"version": RECORD_VERSION, **inputs.record()})
