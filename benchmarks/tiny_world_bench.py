"""The tiny-world recipe (recipes/tiny_world.yaml; called quickstart.yaml until 2026-12-03) over several seeds: its results table (mean and spread) and its wall time.

Each seed runs `rrhf-lite run recipes/tiny_world.yaml` in a fresh subprocess with its own run
directory and its own tiny-world cache (so the warm-up is part of the time, as on a fresh
machine). The baseline is the initial policy of the same seed, measured in the same run.

    python benchmarks/tiny_world_bench.py                   # seeds 0 1 2, the full recipe
    python benchmarks/tiny_world_bench.py --seeds 0 --set data.max_prompts=32   # quicker

Writes benchmarks/results/<date>-<device>-tiny_world.json and prints the table. Also
records CPU load while it ran: timings on a busy machine are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

try:
    from benchmarks._common import print_table, run_recipe_timed, write_result
except ImportError:
    from _common import print_table, run_recipe_timed, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_world.yaml"


def run_seed(seed: int, overrides: list[str], workdir: Path) -> dict:
    out = workdir / f"seed-{seed}"
    env = {**os.environ, "RRHF_LITE_CACHE": str(workdir / f"cache-{seed}")}
    run = run_recipe_timed(RECIPE, out, [f"seed={seed}", *overrides], env=env)
    if run["returncode"] != 0:
        sys.stderr.write(run["output"][-6000:])
        raise SystemExit(f"seed {seed}: rrhf-lite run failed with exit code {run['returncode']}")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {"seed": seed, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
            "load_avg_1m_before": run["load_avg_1m_before"],
            "load_avg_1m_after": run["load_avg_1m_after"], "metrics": metrics}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant: mean and spread (sample std) of each measure over seeds."""
    variants = list(runs[0]["metrics"]["variants"])
    rows = []
    for variant in variants + ["best_of_n"]:
        row = {"variant": variant}
        keys = (runs[0]["metrics"].get(variant) if variant == "best_of_n"
                else runs[0]["metrics"]["variants"][variant]) or {}
        for key in keys:
            if key == "n":
                continue
            values = [
                (r["metrics"][variant] if variant == "best_of_n"
                 else r["metrics"]["variants"][variant])[key] for r in runs
            ]
            row[f"{key} mean"] = statistics.mean(values)
            row[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


# (first, second): the paper's directions, as per-seed differences of held-out reward
PAIRS = (("rrhf", "initial"), ("rrhf", "no_rank_loss"), ("rrhf_round2", "rrhf"))


def paired(runs: list[dict], key: str = "reward/held_out", pairs=PAIRS) -> list[dict]:
    """Per-seed differences first - second: mean, spread, and on how many seeds it is > 0.
    Seeds share their initial policy within a pair, so this is less noisy than the means.
    A pair missing from some run is left out."""
    rows = []
    for first, second in pairs:
        if not all({first, second} <= set(r["metrics"]["variants"]) for r in runs):
            continue
        diffs = [r["metrics"]["variants"][first][key] - r["metrics"]["variants"][second][key]
                 for r in runs]
        rows.append({
            "difference": f"{first} - {second}", "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "seeds above 0": f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
            "per seed": " ".join(f"{d:+.3f}" for d in diffs),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory(prefix="rrhf-tiny-world-bench-") as tmp:
        for seed in args.seeds:
            print(f"seed {seed} ...", flush=True)
            runs.append(run_seed(seed, args.overrides, Path(tmp)))
            print(f"seed {seed}: {runs[-1]['wall_s']:.0f} s wall, {runs[-1]['cpu_s']:.0f} s CPU",
                  flush=True)
    rows = summarise(runs)
    columns = ["variant"] + [c for c in rows[0] if c.startswith("reward/held_out")]
    columns += [c for c in rows[0] if c.startswith(("reward/train", "ranking/accuracy"))]
    print_table(rows, columns=columns, title="tiny world over seeds " + str(args.seeds))
    differences = paired(runs)
    print_table(differences, title="paired by seed: held-out reward differences")
    times = [{"seed": r["seed"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
              "load_avg_1m_before": r["load_avg_1m_before"]} for r in runs]
    print_table(times, title="time per seed (whole run: warm-up, 2 rounds, ablation, eval, merge)")
    path = write_result("tiny_world", {
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": args.overrides, "seeds": args.seeds,
        "table": rows, "paired": differences, "runs": runs,
    }, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
