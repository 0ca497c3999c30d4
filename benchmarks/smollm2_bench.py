"""The real-model recipe (recipes/smollm2_constraints.yaml) over several seeds: the results
table, differences paired by seed, the share of the initial -> best-of-k gap each variant closes,
time per optimiser step of each trained variant, and the wall time of each stage.

Each seed runs `rrhf-lite run recipes/smollm2_constraints.yaml --set seed=N` in a fresh
subprocess, in its own run directory under --work-dir (kept, so an interrupted benchmark resumes
where it stopped, and a variant added to the recipe's ablations later is trained and evaluated
in the same runs without redoing the rest: see adopt_added_variants). The first seed may use a
fresh model cache (--fresh-cache) so that its wall time includes the one-time conversion of the
GGUF; the others reuse the conversion. The baseline of every difference is the initial policy of
the same seed, measured in the same run.

    python benchmarks/smollm2_bench.py                         # seeds 0 1 2, the recipe as shipped
    python benchmarks/smollm2_bench.py --seeds 0 --set data.max_prompts=8    # quicker
    python benchmarks/smollm2_bench.py --summarise-only        # rebuild the JSON from the runs
    python benchmarks/smollm2_bench.py --recipe recipes/quickstart.yaml --fresh-cache  # the main one

Writes benchmarks/results/<date>-<device>-smollm2.json (another --recipe: -smollm2_<its stem>.json) after every seed (partial results are
kept) and prints the tables. Records CPU load: timings on a shared machine are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from rrhf_lite.utils.io import write_json

try:
    from benchmarks._common import print_table, run_recipe_timed, write_result
    from benchmarks.tiny_world_bench import paired, summarise
except ImportError:
    from _common import print_table, run_recipe_timed, write_result
    from tiny_world_bench import paired, summarise

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_constraints.yaml"
# (first, second): per-seed differences of held-out reward
PAIRS = (("rrhf", "initial"), ("rrhf_round2", "initial"), ("rrhf", "no_rank_loss"),
         ("rrhf_round2", "rrhf"), ("rrhf", "dpo"), ("dpo", "initial"))
# The listwise objectives on the same candidates (ablations named by loss_type, and TRL's DPO
# as "trl_dpo"): each against the initial policy and against RRHF. Pairs missing from a run are
# left out of the tables.
OBJECTIVES = ("pro", "pl_dpo", "lipo", "dpo_pairs", "trl_dpo")
PAIRS += tuple((o, "initial") for o in OBJECTIVES) + tuple(("rrhf", o) for o in OBJECTIVES)
TRAINED = ("round-1", "round-2", "ablations/no_rank_loss", "ablations/dpo")


def adopt_added_variants(run_dir: Path, seed: int, overrides: list[str]) -> list[str]:
    """When run_dir holds this recipe as it was before some ablations were added to it (same
    keys otherwise, the old ablations first), write the current recipe over the saved one, so
    that `rrhf-lite run` reuses every finished stage (and every evaluated variant) and runs only
    the new variants. Returns the names of the added ablations ([] when nothing was adopted)."""
    import yaml

    from rrhf_lite.config.recipe import dump_recipe, load_recipe, parse_recipe
    from rrhf_lite.utils.io import atomic_write_text

    saved = run_dir / "recipe.yaml"
    if not saved.exists():
        return []
    recipe = load_recipe(RECIPE, [f"seed={seed}", *overrides])
    recipe.output_dir = str(run_dir)
    new = yaml.safe_load(dump_recipe(recipe))
    # read as this version reads it: keys added since the run was saved take their defaults
    old = yaml.safe_load(dump_recipe(parse_recipe(yaml.safe_load(saved.read_text("utf-8")))))
    old_ablations, new_ablations = old.pop("ablations", []), new.pop("ablations", [])
    if old != new or new_ablations[:len(old_ablations)] != old_ablations:
        return []
    added = [a["name"] for a in new_ablations[len(old_ablations):]]
    if added:
        atomic_write_text(saved, dump_recipe(recipe))
    return added


def run_seed(seed: int, overrides: list[str], work_dir: Path, cache: Path | None) -> dict:
    out = work_dir / f"seed-{seed}"
    added = adopt_added_variants(out, seed, overrides)
    if added:
        print(f"seed {seed}: adding {', '.join(added)} to the finished run in {out}", flush=True)
    env = dict(os.environ)
    if cache is not None:
        env["RRHF_LITE_CACHE"] = str(cache)
    run = run_recipe_timed(RECIPE, out, [f"seed={seed}", *overrides], env=env,
                           log=work_dir / f"seed-{seed}.log")
    if run["returncode"] != 0:
        raise SystemExit(f"seed {seed}: rrhf-lite run failed with exit code {run['returncode']}; "
                         f"see {work_dir / f'seed-{seed}.log'}")
    timing = {key: run[key] for key in ("wall_s", "cpu_s", "load_avg_1m_before",
                                        "load_avg_1m_after")} | {"added": added}
    # kept beside the run, so --summarise-only (and a benchmark run in parts) still has it
    passes = _read_json(out / TIMING_FILE, []) + [timing]
    write_json(out / TIMING_FILE, passes)
    return {"seed": seed, **timing, **read_run(out)}


TIMING_FILE = "bench_time.json"  # one entry per benchmark pass over the run directory
# stage_times.json as it was before variants outside the recipe were added (--set ablations=...):
# the recipe's own stage times, when a pass added an extra arm afterwards
RECIPE_TIMES = "stage_times_recipe.json"


def _read_json(path: Path, default):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def read_run(run_dir: Path) -> dict:
    """What a finished run directory holds: its metrics, stage times and time per step."""
    document = json.loads((run_dir / "metrics.json").read_text())
    metrics = document["metrics"]
    examples = {h: rows for h, rows in document.get("tables", {}).items()
                if h.startswith("Example answers")}
    return {"run_dir": str(run_dir), "metrics": metrics, "examples": examples,
            "stage_wall_s": _read_json(run_dir / RECIPE_TIMES, None) or metrics.get("wall_s", {}),
            "steps": step_times(run_dir),
            "passes": _read_json(run_dir / TIMING_FILE, [])}


def step_times(run_dir: Path) -> dict[str, dict]:
    """Optimiser steps and wall seconds per step of each trained variant (from the trainer's
    final log line: train_runtime over global steps)."""
    found = {}
    ablations = sorted(p.parent.name for p in (run_dir / "ablations").glob("*/train"))
    for name in dict.fromkeys([*TRAINED, *(f"ablations/{a}" for a in ablations)]):
        log = run_dir / name / "train" / "metrics.jsonl"
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        final = [r for r in rows if "train_runtime" in r]
        if not final:
            continue
        steps = max(int(r.get("step", 0)) for r in rows)
        runtime = float(final[-1]["train_runtime"])
        found[name] = {"steps": steps, "train_runtime_s": runtime,
                       "s_per_step": runtime / steps if steps else None}
    return found


def gap_closed(runs: list[dict], variant: str) -> list[float]:
    """Per seed: (variant - initial) / (best-of-k - initial), held-out reward."""
    shares = []
    for r in runs:
        m = r["metrics"]
        if variant not in m["variants"] or "best_of_n" not in m:
            continue
        initial = m["variants"]["initial"]["reward/held_out"]
        gap = m["best_of_n"]["reward/held_out"] - initial
        shares.append((m["variants"][variant]["reward/held_out"] - initial) / gap
                      if gap > 0 else float("nan"))
    return shares


def pass_totals(run: dict, recipe_variants: set[str] | None = None) -> dict:
    """Wall and CPU seconds of a seed over its benchmark passes (the first run, then one per
    added variant), with the load average before each pass. With `recipe_variants`, only the
    passes that ran the recipe's own variants count (not one that added an extra arm)."""
    passes = run.get("passes") or [{k: run.get(k) for k in ("wall_s", "cpu_s",
                                                            "load_avg_1m_before")}]
    if recipe_variants is not None:
        passes = [p for p in passes if set(p.get("added") or []) <= recipe_variants]
    def total(key):  # None when a pass has no record of it
        values = [p.get(key) for p in passes]
        return None if None in values else sum(values)

    return {"wall_s": total("wall_s"), "cpu_s": total("cpu_s"), "passes": len(passes),
            "load_avg_1m_before": " ".join(
                "?" if p.get("load_avg_1m_before") is None else f"{p['load_avg_1m_before']:.1f}"
                for p in passes)}


# an extra arm some seeds may have (added with --set ablations=[..., {name: lr3e-4, ...}])
ARM_PAIRS = (("lr3e-4", "rrhf"), ("lr3e-4", "initial"))
# the trained variants the tables above name, in the order they are reported
KNOWN_TRAINED = ("rrhf", "rrhf_round2", "no_rank_loss", "dpo", *OBJECTIVES)


def extra_arms(variants: set[str]) -> list[str]:
    """The ablations among `variants` that no table above names (a try added with --set
    ablations=[..., {name: bs1, train: {...}}])."""
    return sorted(variants - {"initial", *KNOWN_TRAINED} - {a for a, _ in ARM_PAIRS})


def extra_arm_pairs(variants: set[str]) -> tuple[tuple[str, str], ...]:
    """Each extra arm against the initial policy and against RRHF."""
    return tuple(pair for arm in extra_arms(variants) for pair in ((arm, "initial"), (arm, "rrhf")))


def report(runs: list[dict], args, fresh_cache: bool) -> Path:
    common = set.intersection(*(set(r["metrics"]["variants"]) for r in runs))
    shared = [{**r, "metrics": {**r["metrics"], "variants": {
        k: v for k, v in r["metrics"]["variants"].items() if k in common}}} for r in runs]
    rows = summarise(shared)
    columns = ["variant"] + [c for c in rows[0] if c.startswith("reward/held_out")]
    columns += [c for c in rows[0] if c.startswith(("reward/train", "ranking/accuracy",
                                                     "general/logprob"))]
    seeds = [r["seed"] for r in runs]
    print_table(rows, columns=columns, title=f"{RECIPE.stem} over seeds {seeds}")
    differences = paired(runs, pairs=PAIRS + extra_arm_pairs(common))
    print_table(differences, title="paired by seed: held-out reward differences")
    for arm, _ in ARM_PAIRS[:1]:
        with_arm = [r for r in runs if arm in r["metrics"]["variants"]]
        if with_arm:
            extra = paired(with_arm, pairs=ARM_PAIRS) + paired(
                with_arm, key="reward/train", pairs=ARM_PAIRS[:1])
            extra[-1]["difference"] += " (training prompts)"
            differences += [{**row, "seeds": [r["seed"] for r in with_arm]} for row in extra]
            print_table(extra, title=f"extra arm {arm}, seeds {[r['seed'] for r in with_arm]}")
    gaps = []
    for variant in (*KNOWN_TRAINED, *extra_arms(common)):
        shares = gap_closed(runs, variant)
        if shares:
            gaps.append({"variant": variant, "mean": statistics.mean(shares),
                         "per seed": " ".join(f"{s:+.2f}" for s in shares)})
    print_table(gaps, title="share of the initial -> best-of-k gap closed (held-out)")
    steps = [{"seed": r["seed"], "variant": name, **info}
             for r in runs for name, info in r["steps"].items()]
    print_table(steps, title="optimiser steps and seconds per step")
    from rrhf_lite.config.recipe import load_recipe

    own = {a.name for a in load_recipe(RECIPE).ablations}
    times = [{"seed": r["seed"], **pass_totals(r, own), **r["stage_wall_s"]} for r in runs]
    print_table(times, title="wall time per seed and per stage (seconds; the recipe's own "
                "variants, not extra arms added with --set)")
    path = write_result(args.result_name or result_name(RECIPE), {
        "recipe": str(RECIPE.relative_to(ROOT) if RECIPE.is_relative_to(ROOT) else RECIPE), "overrides": args.overrides, "seeds": seeds,
        "first_seed_fresh_cache": fresh_cache, "table": rows, "paired": differences,
        "gap_closed": gaps, "runs": runs,
    }, results_dir=args.results_dir)
    print(f"wrote {path}", flush=True)
    return path


def result_name(recipe: Path) -> str:
    """The results file's name: "smollm2" for the comparison recipe (as recorded since
    2026-11-30), "smollm2_<stem>" for any other recipe."""
    return "smollm2" if recipe.stem == "smollm2_constraints" else f"smollm2_{recipe.stem}"


def main(argv: list[str] | None = None) -> int:
    global RECIPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE,
                        help="a SmolLM2 recipe (default: recipes/smollm2_constraints.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="default: runs/smollm2_bench (another recipe: runs/smollm2_bench-<stem>)")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="convert the model anew for the first seed (its time includes it)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="read the finished run directories of --seeds, run nothing")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--result-name", default=None,
                        help="the results file's name (default: smollm2, or smollm2_<recipe stem>)")
    args = parser.parse_args(argv)
    RECIPE = args.recipe.resolve()
    if args.work_dir is None:
        name = result_name(RECIPE).replace("smollm2_", "")
        args.work_dir = ROOT / "runs" / ("smollm2_bench" if name == "smollm2" else f"smollm2_bench-{name}")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    runs = []
    for i, seed in enumerate(args.seeds):
        run_dir = args.work_dir / f"seed-{seed}"
        if args.summarise_only:
            if (run_dir / "metrics.json").exists():
                runs.append({"seed": seed, **read_run(run_dir)})
            continue
        cache = args.work_dir / "fresh-cache" if args.fresh_cache and i == 0 else None
        print(f"seed {seed} ...", flush=True)
        runs.append(run_seed(seed, args.overrides, args.work_dir, cache))
        print(f"seed {seed}: {runs[-1]['wall_s']:.0f} s wall, {runs[-1]['cpu_s']:.0f} s CPU",
              flush=True)
        report(runs, args, args.fresh_cache)  # after every seed: partial results are kept
    if args.summarise_only and runs:
        report(runs, args, args.fresh_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
