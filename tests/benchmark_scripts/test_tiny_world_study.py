"""The tiny-world study's and benchmark's measuring functions (not their results): answer
kinds, per-token log-probs checked against the library's own candidate scores, the
right-vs-habit measures, training trends, and the paired-by-seed tables."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def study(benchmark_module):
    return benchmark_module("tiny_world_study")


def test_answer_kind(study):
    assert study.answer_kind("copy abcd=", "abcd") == "right"
    assert study.answer_kind("copy abcd=", "abc") == "habit"  # copy's habit drops the last char
    assert study.answer_kind("reverse abc=", "abc") == "habit"  # reverse's habit echoes
    assert study.answer_kind("count a aab=", "3") == "habit"  # one too many
    assert study.answer_kind("count a aab=", "1") == "other"


@pytest.fixture(scope="module")
def tiny_model(tiny_lm_dir):
    from rrhf_lite.models.inference_loader import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_lm_dir), torch_dtype="float32")
    return model.eval(), tokenizer


def test_token_logprobs_match_library_scores(study, tiny_model):
    from rrhf_lite.training.logprobs import model_candidate_scores

    model, tokenizer = tiny_model
    prompt, answers = "copy abcd=", ["abcd", "abc", "x"]
    per_token = study.token_logprobs(model, tokenizer, prompt, answers)
    assert [len(t) for t in per_token] == [5, 4, 2]  # characters + EOS
    sums = model_candidate_scores(model, tokenizer, [{"prompt": prompt, "responses": answers,
                                                "scores": None}], length_penalty=0.0)[0]
    for ours, theirs in zip(per_token, sums, strict=True):
        assert math.isclose(float(ours.sum()), theirs, rel_tol=1e-4, abs_tol=1e-4)


def test_mechanism_measures(study, tiny_model):
    model, tokenizer = tiny_model
    prompts = ["copy abcd=", "copy xy=", "sort 3112=", "count a aab=", "sort 123="]
    got = study.mechanism_measures(model, tokenizer, prompts)
    # "sort 123=" has no habit distinct from the answer, so it is skipped; count has no prefix
    assert set(got) == {f"{t}.{k}" for t in ("copy", "sort", "count")
                        for k in ("prefix_logprob", "decision_margin", "right_logprob")}
    assert got["count.prefix_logprob"] is None
    assert got["copy.prefix_logprob"] < 0 and got["sort.prefix_logprob"] < 0
    # copy abcd -> right "abcd", habit "abc": they part at "d" vs EOS
    lp_right, lp_habit = study.token_logprobs(model, tokenizer, "copy abcd=", ["abcd", "abc"])
    lp_right2, lp_habit2 = study.token_logprobs(model, tokenizer, "copy xy=", ["xy", "x"])
    expected = ((lp_right[3] - lp_habit[3]) + (lp_right2[1] - lp_habit2[1])) / 2
    assert math.isclose(got["copy.decision_margin"], float(expected), rel_tol=1e-5)
    assert math.isclose(float(lp_right[:3].mean()), float(lp_habit[:3].mean()), rel_tol=1e-5)


def _fake_run(seed: int, rewards: dict[str, float]) -> dict:
    def measures(reward):
        return {"reward": reward, "right": 0.5, "habit": 0.2, "other": 0.3,
                **{f"reward.{t}": reward for t in ("copy", "reverse", "sort", "count")}}

    return {"arm": "paper", "seed": seed, "best_of_k": 0.8, "candidates": {"round-1": {
        "best": 0.8, "mean": 0.5, "distinct": 5.5, "all_tied": 0.1}}, "variants": {
        name: {"held_out": measures(r), "train": measures(r), "ranking_accuracy": 0.6,
               "mechanism": {"copy.prefix_logprob": -0.5, "copy.decision_margin": 0.1},
               "training": {"best_nll_start": 0.7, "best_nll_end": 0.5}}
        for name, r in rewards.items()}}


def test_paired_table(study):
    runs = [_fake_run(0, {"initial": 0.5, "rrhf": 0.6, "no_rank_loss": 0.65}),
            _fake_run(1, {"initial": 0.5, "rrhf": 0.7, "no_rank_loss": 0.65})]
    tables = study.tables(runs)
    paired = {row["variant - rrhf"]: row for row in tables["paired"]}
    assert paired["no_rank_loss"]["seeds above rrhf"] == "1/2"
    assert paired["no_rank_loss"]["mean diff"].startswith("0.000")
    assert paired["initial"]["mean diff"].startswith("-0.150")
    assert tables["held_out"][-1]["variant"] == "best-of-k (initial samples)"
    likelihood = {row["variant"]: row for row in tables["likelihood"]}
    assert likelihood["rrhf"]["best nll end"].startswith("0.500")
    assert tables["candidates"] == [{"arm": "paper", "round": "round-1", "best": "0.800 ± 0.000",
                                     "mean": "0.500 ± 0.000", "distinct": "5.500 ± 0.000",
                                     "all_tied": "0.100 ± 0.000"}]


def test_training_trend(study, tmp_path):
    from rrhf_lite.utils.io import write_jsonl

    logs = [{"loss": 1.0}] + [{"rank/accuracy": a, "loss/sft": s}
                              for a, s in [(0.6, 0.9), (0.7, 0.8), (0.8, 0.6), (0.9, 0.5)]]
    write_jsonl(tmp_path / "metrics.jsonl", logs)
    trend = study.training_trend(tmp_path / "metrics.jsonl")
    assert math.isclose(trend["train_rank_acc_start"], 0.65)
    assert math.isclose(trend["train_rank_acc_end"], 0.85)
    assert math.isclose(trend["best_nll_start"], 0.85) and math.isclose(trend["best_nll_end"], 0.55)


def test_candidate_measures(study, tmp_path):
    from rrhf_lite.utils.io import write_jsonl

    write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": "copy ab=", "responses": ["ab", "a", "b"], "scores": [1.0, 0.5, 0.0]},
        {"prompt": "copy cd=", "responses": ["x", "y"], "scores": [0.0, 0.0]},
    ])
    got = study.candidate_measures(tmp_path / "scored.jsonl")
    assert got == {"best": 0.5, "mean": 0.25, "distinct": 2.5, "all_tied": 0.5}


def test_tiny_world_bench_paired_differences(benchmark_module):
    bench = benchmark_module("tiny_world_bench")

    def run(initial, rrhf, ablation):
        return {"metrics": {"variants": {"initial": {"reward/held_out": initial},
                                         "rrhf": {"reward/held_out": rrhf},
                                         "no_rank_loss": {"reward/held_out": ablation}}}}

    rows = bench.paired([run(0.5, 0.6, 0.55), run(0.6, 0.65, 0.7)])
    by_name = {row["difference"]: row for row in rows}
    assert set(by_name) == {"rrhf - initial", "rrhf - no_rank_loss"}  # no IP-2 in these runs
    assert math.isclose(by_name["rrhf - initial"]["mean"], 0.075)
    assert by_name["rrhf - initial"]["seeds above 0"] == "2/2"
    assert by_name["rrhf - no_rank_loss"]["seeds above 0"] == "1/2"
    assert by_name["rrhf - no_rank_loss"]["per seed"] == "+0.050 -0.050"


def test_every_arm_is_a_valid_tiny_world_recipe(study):
    """The arms are --set overrides of the shipped recipe; they must stay valid as it changes,
    and the arms recorded at the first learning rate must keep it."""
    from rrhf_lite.config.recipe import load_recipe

    for arm, overrides in study.ARMS.items():
        recipe = load_recipe(study.RECIPE, [*overrides, study.VARIANT_ABLATIONS])
        assert [a.name for a in recipe.ablations] == [
            "no_rank_loss", "rank_only", "sum_scores", "rank_w0.2"], arm
        expected = 5e-4 if arm.startswith("lr5e-4") else 2e-3
        assert recipe.train.learning_rate == expected, arm
