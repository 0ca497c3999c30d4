"""The listwise-vs-TRL benchmark's plumbing (not its timings): the expanded pairs TRL trains on,
the ratios to TRL at its best on each measure, the goals' verdicts, and the step's memory probe."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("listwise_vs_trl_dpo")


def test_expanded_pairs_are_every_strict_preference_better_first(bench):
    rows = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [0.5, 1.0, 0.0, 0.5]},
            {"prompt": "q", "responses": ["x", "y", "z", "w"], "scores": [3.0, 2.0, 1.0, 0.0]}]
    pairs = bench.expanded_pairs(rows)
    assert len(pairs) == 5 + 6  # the tie (a, d) carries no preference
    for pair in pairs:
        assert pair["scores"][0] > pair["scores"][1]
    seen = {(p["prompt"], *p["responses"]) for p in pairs}
    assert {("q", hi, lo) for hi, lo in itertools.combinations("xyzw", 2)} <= seen


def _run(wall, cpu, mb):
    return {"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": mb}


class _Variant:
    def __init__(self, name, group, runs, prompts=1, tokens=10):
        self.name, self.group, self.runs, self.prompts, self.tokens = name, group, runs, prompts, tokens


def test_ratios_are_to_trl_at_its_best_and_the_goals_judge_them(bench):
    warm = _run(99.0, 99.0, 9999.0)  # the warm-up round is left out
    variants = [
        _Variant("trl_dpo", "k=4", [warm, _run(10.0, 8.0, 900.0), _run(12.0, 8.0, 900.0)]),
        _Variant("trl_dpo_2x3", "k=4", [warm, _run(20.0, 9.0, 300.0), _run(20.0, 9.0, 300.0)]),
        _Variant("rrhf", "k=4", [warm, _run(2.0, 2.0, 200.0), _run(2.0, 2.0, 250.0)]),
        _Variant("lipo", "k=4", [warm, _run(4.0, 2.0, 100.0), _run(4.0, 2.0, 100.0)]),
        _Variant("trl_dpo", "k=2", [warm, _run(10.0, 10.0, 100.0)]),
        _Variant("dpo_pairs", "k=2", [warm, _run(6.0, 6.0, 60.0)]),
    ]
    rows = {(r["group"], r["variant"]): r for r in bench.summarise(variants, warmup=1)}
    rrhf = rows["k=4", "rrhf"]
    assert rrhf["s_per_prompt"] == pytest.approx(2.0) and rrhf["peak_extra_mb"] == 250.0
    assert rrhf["time_vs_trl"] == pytest.approx(2.0 / 11.0)  # the faster TRL (median 11 s)
    assert rrhf["memory_vs_trl"] == pytest.approx(250.0 / 300.0)  # the leaner TRL
    assert rrhf["goal"].startswith("PASS")
    assert rows["k=4", "lipo"]["goal"].startswith("FAIL")  # 4 / 11 > 0.3
    assert rows["k=4", "trl_dpo_2x3"]["memory_vs_trl"] == 1.0 and rows["k=4", "trl_dpo"]["goal"] == "-"
    assert rows["k=2", "dpo_pairs"]["goal"].startswith("FAIL")  # 0.6x memory > 0.5x


def test_measured_step_sees_the_memory_a_step_adds(bench):
    import torch

    bench.return_freed_memory_to_system()
    small = bench.measured_step(lambda: torch.ones(1024), "cpu")
    big = bench.measured_step(lambda: torch.ones(64 * 2**20 // 4).add_(1), "cpu")  # 64 MiB, touched
    assert big["peak_extra_mb"] >= 60 > small["peak_extra_mb"]
    assert big["wall_s"] >= 0 and big["cpu_s"] >= 0
