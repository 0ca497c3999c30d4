"""The loss contract against plain Python loops over pairs, with masks, ties and padding."""

from __future__ import annotations

import math

import pytest
import torch

import rrhf_lite
from rrhf_lite.training.losses import rank_loss, rrhf_loss, sft_loss


def _reference(scores, sums, counts, rewards, mask):
    """Loops straight from the paper: pairs with r_i < r_j, SFT on the first best candidate."""
    B, k = scores.shape
    rank_total, sft_total, correct, n_pairs, margins = 0.0, 0.0, 0, 0, []
    for b in range(B):
        idx = [i for i in range(k) if mask[b, i]]
        rank_b = 0.0
        for i in idx:
            for j in idx:
                if rewards[b, i] < rewards[b, j]:
                    rank_b += max(0.0, float(scores[b, i] - scores[b, j]))
                    n_pairs += 1
                    correct += int(scores[b, i] < scores[b, j])
                    margins.append(float(scores[b, j] - scores[b, i]))
        rank_total += rank_b
        if idx:
            best = idx[0]
            for i in idx:
                if rewards[b, i] > rewards[b, best]:
                    best = i
            sft_total += -float(sums[b, best]) / max(int(counts[b, best]), 1)
    acc = correct / n_pairs if n_pairs else 0.0
    margin = sum(margins) / len(margins) if margins else 0.0
    return rank_total / B, sft_total / B, acc, margin, n_pairs


def _random_batch(seed, B=5, k=6, ties=True):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, k, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 9, (B, k), generator=g)
    sums = -torch.rand(B, k, generator=g, dtype=torch.float64) * counts
    # rewards on a coarse grid so that ties happen often
    rewards = torch.randint(0, 3 if ties else 1000, (B, k), generator=g).double()
    mask = torch.rand(B, k, generator=g) < 0.75
    mask[:, 0] = True
    return scores, sums, counts, rewards, mask


@pytest.mark.parametrize("seed", range(8))
def test_losses_match_loop_reference(seed):
    scores, sums, counts, rewards, mask = _random_batch(seed)
    # padded slots hold garbage that must not matter
    scores = scores.masked_fill(~mask, float("nan"))
    rewards = rewards.masked_fill(~mask, 1e9)
    ref_rank, ref_sft, ref_acc, ref_margin, ref_pairs = _reference(scores, sums, counts, rewards, mask)
    assert float(rank_loss(scores, rewards, mask)) == pytest.approx(ref_rank, rel=1e-12, abs=1e-12)
    assert float(sft_loss(sums, counts, rewards, mask)) == pytest.approx(ref_sft, rel=1e-12, abs=1e-12)
    loss, metrics = rrhf_loss(scores, sums, counts, rewards, mask, rank_weight=2.0, sft_weight=0.5)
    assert float(loss) == pytest.approx(2.0 * ref_rank + 0.5 * ref_sft, rel=1e-12, abs=1e-12)
    assert metrics["loss/rank"] == pytest.approx(ref_rank)
    assert metrics["loss/sft"] == pytest.approx(ref_sft)
    assert metrics["rank/accuracy"] == pytest.approx(ref_acc)
    assert metrics["rank/margin"] == pytest.approx(ref_margin)
    assert metrics["rank/pairs"] == ref_pairs
    assert all(math.isfinite(v) for v in metrics.values())


def test_gradients_match_reference_and_ignore_padding():
    scores, sums, counts, rewards, mask = _random_batch(3, ties=False)
    s = scores.clone().requires_grad_(True)
    t = sums.clone().requires_grad_(True)
    loss, _ = rrhf_loss(s, t, counts, rewards, mask)
    loss.backward()
    assert torch.all(s.grad[~mask] == 0) and torch.all(t.grad[~mask] == 0)
    # autograd through the loop reference gives the same gradient
    s2 = scores.clone().requires_grad_(True)
    t2 = sums.clone().requires_grad_(True)
    total = 0.0
    B, k = scores.shape
    for b in range(B):
        idx = [i for i in range(k) if mask[b, i]]
        for i in idx:
            for j in idx:
                if rewards[b, i] < rewards[b, j]:
                    total = total + torch.relu(s2[b, i] - s2[b, j])
        best = max(idx, key=lambda i: (rewards[b, i], -i))
        total = total - t2[b, best] / max(int(counts[b, best]), 1)
    (total / B).backward()
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(t.grad, t2.grad)


def test_ties_give_no_pairs_and_first_best_wins():
    scores = torch.tensor([[0.0, 5.0, -1.0]])
    rewards = torch.tensor([[1.0, 1.0, 1.0]])
    assert float(rank_loss(scores, rewards)) == 0.0
    _, metrics = rrhf_loss(scores, torch.tensor([[-3.0, -8.0, -1.0]]), torch.tensor([[3, 4, 1]]), rewards)
    assert metrics["rank/pairs"] == 0 and metrics["rank/accuracy"] == 0.0
    # all tied: the first candidate is "best", so the SFT loss is its token mean 3/3
    assert metrics["loss/sft"] == pytest.approx(1.0)


def test_worked_example():
    # rewards order: c0 < c2 < c1; scores put c2 above c1, which costs relu(2 - 1) = 1
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    rewards = torch.tensor([[0.0, 2.0, 1.0]])
    assert float(rank_loss(scores, rewards)) == pytest.approx(1.0)
    _, metrics = rrhf_loss(scores, torch.tensor([[-2.0, -6.0, -1.0]]), torch.tensor([[2, 3, 1]]), rewards)
    assert metrics["loss/sft"] == pytest.approx(2.0)  # best is c1: 6 / 3
    assert metrics["rank/accuracy"] == pytest.approx(2 / 3)
    assert metrics["rank/margin"] == pytest.approx((1 + 2 - 1) / 3)


def test_top_level_exports():
    assert rrhf_lite.rank_loss is rank_loss
    assert rrhf_lite.sft_loss is sft_loss
    assert rrhf_lite.rrhf_loss is rrhf_loss


def test_shape_errors():
    with pytest.raises(ValueError):
        rank_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        rank_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
