"""evaluate's metric functions, on numbers worked out by hand (no models)."""

from __future__ import annotations

import math

import pytest

from rrhf_lite.stages.evaluate import best_of_n, pairwise_ranking_accuracy, perplexity, win_rate


def test_ranking_accuracy_counts_reward_ordered_pairs_of_ragged_rows():
    # row 1: rewards 0 < 1 < 2, scores order (0,1) and (0,2) right, (1,2) wrong: 2 of 3
    # row 2: two candidates, tied rewards: no pair at all
    # row 3: one candidate: no pair
    scores = [[0.1, 0.5, 0.3], [0.0, 9.0], [4.0]]
    rewards = [[0.0, 1.0, 2.0], [1.0, 1.0], [3.0]]
    assert pairwise_ranking_accuracy(scores, rewards) == {"accuracy": 2 / 3, "pairs": 3}


def test_ranking_accuracy_without_pairs_is_nan_and_mismatch_is_refused():
    result = pairwise_ranking_accuracy([[1.0, 2.0]], [[0.5, 0.5]])
    assert result["pairs"] == 0 and math.isnan(result["accuracy"])
    assert math.isnan(pairwise_ranking_accuracy([], [])["accuracy"])
    with pytest.raises(ValueError):
        pairwise_ranking_accuracy([[1.0]], [[0.0, 1.0]])


def test_ranking_accuracy_of_the_rewards_themselves_is_one():
    rewards = [[0.3, 0.1, 0.2], [1.0, 2.0]]
    assert pairwise_ranking_accuracy(rewards, rewards) == {"accuracy": 1.0, "pairs": 4}


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.5, 0.0, 2.0], [0.5, 0.5, 1.0, 1.0]) == pytest.approx(0.625)
    assert math.isnan(win_rate([], []))


def test_best_of_n():
    result = best_of_n([[0.0, 1.0], [0.5, 0.25, 0.75]])
    assert result == {"reward/held_out": pytest.approx(0.875),
                      "reward/held_out_mean_candidate": pytest.approx(0.5), "n": 2.5}


def test_perplexity_is_exp_of_minus_the_mean_token_logprob():
    assert perplexity([0.0, 0.0]) == 1.0
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
