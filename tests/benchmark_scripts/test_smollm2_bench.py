"""The real-model benchmark's measuring functions (not its results): the share of the
initial -> best-of-k gap a variant closes, seconds per optimiser step read from the trainer's
log, and a run directory read back; the shipped recipe stays a valid input."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("smollm2_bench")


def _run(initial, rrhf, best, **more):
    variants = {"initial": {"reward/held_out": initial}, "rrhf": {"reward/held_out": rrhf}}
    variants.update({k: {"reward/held_out": v} for k, v in more.items()})
    return {"metrics": {"variants": variants, "best_of_n": {"reward/held_out": best}}}


def test_gap_closed_per_seed(bench):
    runs = [_run(0.2, 0.3, 0.6), _run(0.4, 0.35, 0.5), _run(0.3, 0.5, 0.3)]
    shares = bench.gap_closed(runs, "rrhf")
    assert shares[0] == pytest.approx(0.25) and shares[1] == pytest.approx(-0.5)
    assert math.isnan(shares[2])  # no gap to close
    assert bench.gap_closed(runs, "dpo") == []  # a variant no run has


def test_paired_rows_include_dpo_only_where_every_run_has_it(bench):
    rows = bench.paired([_run(0.2, 0.3, 0.6, dpo=0.25), _run(0.2, 0.3, 0.6)], pairs=bench.PAIRS)
    assert {r["difference"] for r in rows} == {"rrhf - initial"}
    rows = bench.paired([_run(0.2, 0.3, 0.6, dpo=0.25), _run(0.1, 0.3, 0.6, dpo=0.35)],
                        pairs=bench.PAIRS)
    by_name = {r["difference"]: r for r in rows}
    assert by_name["rrhf - dpo"]["per seed"] == "+0.050 -0.050"
    assert by_name["dpo - initial"]["seeds above 0"] == "2/2"


def test_step_times_and_read_run(bench, tmp_path):
    train = tmp_path / "round-1" / "train"
    train.mkdir(parents=True)
    (train / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5},
        {"step": 4, "train_runtime": 10.0})) + "\n")
    (tmp_path / "ablations" / "dpo" / "train").mkdir(parents=True)  # not finished: no line
    (tmp_path / "ablations" / "dpo" / "train" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert bench.step_times(tmp_path) == {
        "round-1": {"steps": 4, "train_runtime_s": 10.0, "s_per_step": 2.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"metrics": {"variants": {}, "wall_s": {"merge": 3.0}}}))
    got = bench.read_run(tmp_path)
    assert got["stage_wall_s"] == {"merge": 3.0} and "round-1" in got["steps"]


def test_the_recipe_the_benchmark_runs_is_valid(bench):
    from rrhf_lite.config.recipe import load_recipe

    recipe = load_recipe(bench.RECIPE, ["seed=1"])
    assert recipe.seed == 1 and recipe.rounds == 2
    assert {a.name for a in recipe.ablations} >= {"no_rank_loss"}


def test_an_added_ablation_is_adopted_and_nothing_else(bench, tmp_path, monkeypatch):
    import yaml

    from rrhf_lite.config.recipe import dump_recipe, load_recipe

    run = tmp_path / "seed-3"
    run.mkdir()
    shipped = load_recipe(bench.RECIPE, ["seed=3"])
    shipped.output_dir = str(run)
    saved = yaml.safe_load(dump_recipe(shipped))
    first = saved["ablations"][:1]
    (run / "recipe.yaml").write_text(yaml.safe_dump({**saved, "ablations": first}))
    extra = ("ablations=[{name: no_rank_loss, train: {rank_weight: 0.0}}, "
             "{name: sft_only, train: {rank_weight: 0.0, sft_weight: 1.0}}]")
    assert first[0]["name"] == "no_rank_loss"  # the extra list below starts with it
    assert bench.adopt_added_variants(run, 4, [extra]) == []  # another seed: not the same run
    assert bench.adopt_added_variants(run, 3, [extra, "train.learning_rate=0.1"]) == []
    assert bench.adopt_added_variants(run, 3, [extra]) == ["sft_only"]
    now = yaml.safe_load((run / "recipe.yaml").read_text())
    assert [a["name"] for a in now["ablations"]] == ["no_rank_loss", "sft_only"]
    assert bench.adopt_added_variants(run, 3, [extra]) == []  # already adopted
    assert bench.adopt_added_variants(tmp_path / "none", 3, []) == []


def test_pass_totals_add_every_pass(bench):
    run = {"passes": [{"wall_s": 100.0, "cpu_s": 40.0, "load_avg_1m_before": 6.0},
                      {"wall_s": 20.0, "cpu_s": 8.0, "load_avg_1m_before": 2.5}]}
    assert bench.pass_totals(run) == {"wall_s": 120.0, "cpu_s": 48.0, "passes": 2,
                                      "load_avg_1m_before": "6.0 2.5"}
    assert bench.pass_totals({"seed": 0})["wall_s"] is None  # no record of its time
    run["passes"].append({"wall_s": 50.0, "cpu_s": 9.0, "load_avg_1m_before": 1.0,
                          "added": ["lr3e-4"]})  # an extra arm: not the recipe's time
    assert bench.pass_totals(run, {"dpo"})["wall_s"] == 120.0
    assert bench.pass_totals(run)["wall_s"] == 170.0
    run["passes"][0]["cpu_s"] = None  # a pass timed from outside: wall known, CPU not
    assert bench.pass_totals(run)["cpu_s"] is None and bench.pass_totals(run)["wall_s"] == 170.0


def test_an_extra_arm_is_paired_with_initial_and_rrhf(bench):
    pairs = bench.extra_arm_pairs({"initial", "rrhf", "pro", "bs1", "lr3e-4"})
    # pro is a known objective and lr3e-4 has its own table: only the new arm is added
    assert pairs == (("bs1", "initial"), ("bs1", "rrhf"))
    assert bench.extra_arm_pairs({"initial", "rrhf"}) == ()
