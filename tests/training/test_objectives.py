"""The listwise objectives (rrhf_lite.training.objectives) against plain-torch references written
from each paper's formula with loops over prompts, positions and pairs: forward and backward, on
random inputs with tied rewards, masks, NaN in padded slots, variable k and k = 1 rows; and the
k = 2 identities (pl_dpo = dpo_pairs = DPO's sigmoid loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rrhf_lite.training.losses import rrhf_loss
from rrhf_lite.training.objectives import (
    LOSS_TYPES,
    default_sft_weight,
    dpo_pairs_loss,
    lipo_loss,
    listwise_loss,
    pl_dpo_loss,
    pro_loss,
)

BETA = 0.3


def _batch(seed, B=7, K=5):
    """Rewards with ties (drawn from few values), variable k (rows of 1..K real candidates,
    one k = 1 row, one all-tied row), NaN in every padded slot."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (B, K), generator=g).double()
    rewards[0] = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])[:K]  # no tie, full k
    rewards[1] = 1.0  # all tied
    k_per_row = torch.randint(2, K + 1, (B,), generator=g)
    k_per_row[2] = 1
    mask = torch.arange(K).unsqueeze(0) < k_per_row.unsqueeze(1)
    sums = -torch.rand(B, K, generator=g, dtype=torch.double) * 20
    ref = sums + torch.randn(B, K, generator=g, dtype=torch.double) * 2
    counts = torch.randint(1, 12, (B, K), generator=g).double()
    scores = sums / counts ** 0.8
    for t in (rewards, sums, ref, counts, scores):
        t[~mask] = float("nan")
    return scores, sums, counts, rewards, mask, ref


def _real(mask, b):
    return [i for i in range(mask.shape[1]) if mask[b, i]]


def _reward_order(rewards, mask, b):
    """Real candidates best first (stable: the first of tied candidates comes first)."""
    return sorted(_real(mask, b), key=lambda i: -float(rewards[b, i]))


def ref_pro(scores, rewards, mask):
    """PRO, Song et al. 2023 Eq. 5-6: per rank position k of the reward order,
    -log(exp(s_k / T_k^k) / sum_{i >= k} exp(s_i / T_k^i)), T_k^i = 1 / (r_k - r_i),
    T_k^k = min_{i > k} T_k^i; candidates tied with position k carry no preference (left out)."""
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        order = _reward_order(rewards, mask, b)
        for pos, k in enumerate(order):
            rest = [i for i in order[pos + 1:] if rewards[b, i] < rewards[b, k]]
            if not rest:
                continue
            temps = {i: 1.0 / float(rewards[b, k] - rewards[b, i]) for i in rest}
            t_k = min(temps.values())
            numerator = torch.exp(scores[b, k] / t_k)
            denominator = numerator + sum(torch.exp(scores[b, i] / temps[i]) for i in rest)
            total = total - torch.log(numerator / denominator)
    return total / scores.shape[0]


def ref_pl_dpo(sums, ref, rewards, mask, beta):
    """Plackett-Luce DPO, Rafailov et al. 2023 A.3: -log prod_k exp(u_(k)) / sum_{j >= k} exp(u_(j))
    over the reward order, u = beta (log pi - log pi_ref); tied candidates left out of each other's
    denominators."""
    total = sums.new_zeros(())
    for b in range(sums.shape[0]):
        order = _reward_order(rewards, mask, b)
        u = {i: beta * (sums[b, i] - ref[b, i]) for i in order}
        for pos, k in enumerate(order):
            rest = [i for i in order[pos + 1:] if rewards[b, i] < rewards[b, k]]
            if rest:
                denominator = torch.exp(u[k]) + sum(torch.exp(u[i]) for i in rest)
                total = total - torch.log(torch.exp(u[k]) / denominator)
    return total / sums.shape[0]


def ref_dpo_pairs(sums, ref, rewards, mask, beta):
    """All-pairs DPO: per prompt the mean over pairs r_i > r_j of -log sigmoid(u_i - u_j)."""
    total = sums.new_zeros(())
    for b in range(sums.shape[0]):
        idx = _real(mask, b)
        pairs = [(i, j) for i in idx for j in idx if rewards[b, i] > rewards[b, j]]
        if pairs:
            u = {i: beta * (sums[b, i] - ref[b, i]) for i in idx}
            total = total + sum(-torch.log(torch.sigmoid(u[i] - u[j])) for i, j in pairs) / len(pairs)
    return total / sums.shape[0]


def ref_lipo(sums, ref, rewards, mask, beta):
    """LiPO-lambda, Liu et al. 2024 Eq. 7-8: sum over pairs psi_i > psi_j of
    -Delta_ij log sigmoid(s_i - s_j), Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|,
    G = 2^psi - 1, D(tau) = log2(1 + tau), tau the rank under s (no gradient), psi = rewards."""
    total = sums.new_zeros(())
    for b in range(sums.shape[0]):
        idx = _real(mask, b)
        s = {i: beta * (sums[b, i] - ref[b, i]) for i in idx}
        v = {i: float(s[i].detach()) for i in idx}
        tau = {i: 1 + sum(1 for j in idx if v[j] > v[i] or (v[j] == v[i] and j < i))
               for i in idx}
        for i in idx:
            for j in idx:
                if rewards[b, i] > rewards[b, j]:
                    gain = abs((2 ** float(rewards[b, i]) - 1) - (2 ** float(rewards[b, j]) - 1))
                    disc = abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                    total = total - gain * disc * torch.log(torch.sigmoid(s[i] - s[j]))
    return total / sums.shape[0]


def _check(fast, slow, leaves):
    """Same value, and the same gradient w.r.t. every leaf (zero in padded slots)."""
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    fast_grads = torch.autograd.grad(fast, leaves, allow_unused=True)
    slow_grads = torch.autograd.grad(slow, leaves, allow_unused=True)
    for leaf, gf, gs in zip(leaves, fast_grads, slow_grads, strict=True):
        gf = torch.zeros_like(leaf) if gf is None else gf
        gs = torch.zeros_like(leaf) if gs is None else gs
        assert torch.isfinite(gf).all()
        torch.testing.assert_close(gf, gs, rtol=1e-9, atol=1e-12)


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("seed", range(4))
def test_pro_matches_paper_loops(seed):
    scores, _, _, rewards, mask, _ = _batch(seed)
    (s,) = _leaves(scores)
    _check(pro_loss(s, rewards, mask), ref_pro(s, rewards, mask), [s])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fast,slow", [(pl_dpo_loss, ref_pl_dpo), (dpo_pairs_loss, ref_dpo_pairs),
                                       (lipo_loss, ref_lipo)], ids=["pl_dpo", "dpo_pairs", "lipo"])
def test_dpo_family_matches_paper_loops(seed, fast, slow):
    _, sums, _, rewards, mask, ref = _batch(seed)
    S, R = _leaves(sums, ref)
    _check(fast(S, R, rewards, mask, beta=BETA), slow(S, R, rewards, mask, BETA), [S, R])


def test_lipo_lambda_weights_follow_the_current_ranking():
    """Delta_ij depends on tau under s: swapping two candidates' s changes the weights."""
    rewards = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.double)
    ref = torch.zeros(1, 3, dtype=torch.double)
    ordered = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.double)
    swapped = torch.tensor([[2.0, 3.0, 1.0]], dtype=torch.double)
    for sums in (ordered, swapped):
        torch.testing.assert_close(lipo_loss(sums, ref, rewards, beta=1.0),
                                   ref_lipo(sums, ref, rewards, torch.ones(1, 3, dtype=torch.bool), 1.0))
    assert lipo_loss(ordered, ref, rewards, beta=1.0) < lipo_loss(swapped, ref, rewards, beta=1.0)


def test_k2_pl_dpo_equals_dpo_pairs_equals_dpo_sigmoid():
    g = torch.Generator().manual_seed(3)
    sums, ref = -torch.rand(6, 2, generator=g) * 30, -torch.rand(6, 2, generator=g) * 30
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3)
    chosen = rewards.argmax(dim=1, keepdim=True)
    rejected = 1 - chosen
    logits = BETA * ((sums.gather(1, chosen) - ref.gather(1, chosen))
                     - (sums.gather(1, rejected) - ref.gather(1, rejected)))
    dpo = -F.logsigmoid(logits).mean()
    torch.testing.assert_close(pl_dpo_loss(sums, ref, rewards, beta=BETA), dpo)
    torch.testing.assert_close(dpo_pairs_loss(sums, ref, rewards, beta=BETA), dpo)
    # policy == reference: log 2 per prompt
    torch.testing.assert_close(pl_dpo_loss(ref, ref, rewards, beta=BETA), torch.tensor(math.log(2.0)))
    # and through the dispatcher, with the DPO family's default sft_weight (0): plain DPO
    loss, _ = listwise_loss("pl_dpo", sums / 4, sums, torch.full_like(sums, 4), rewards,
                            ref_sums=ref, beta=BETA)
    torch.testing.assert_close(loss, dpo)


def test_no_preference_gives_zero_and_no_gradient():
    """k = 1 rows and all-tied rows: every objective's preference term is 0 with zero gradient."""
    rewards = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    sums = torch.randn(2, 3, requires_grad=True)
    ref = torch.randn(2, 3)
    for loss in (pro_loss(sums, rewards, mask), pl_dpo_loss(sums, ref, rewards, mask),
                 dpo_pairs_loss(sums, ref, rewards, mask), lipo_loss(sums, ref, rewards, mask)):
        assert float(loss) == 0.0
        (grad,) = torch.autograd.grad(loss, sums, allow_unused=True)
        assert grad is None or float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dispatcher_weights_defaults_and_metrics(loss_type):
    scores, sums, counts, rewards, mask, ref = _batch(11)
    pref = {"rrhf": lambda: rrhf_loss(scores, sums, counts, rewards, mask, sft_weight=0.0)[0],
            "pro": lambda: ref_pro(scores, rewards, mask),
            "pl_dpo": lambda: ref_pl_dpo(sums, ref, rewards, mask, BETA),
            "lipo": lambda: ref_lipo(sums, ref, rewards, mask, BETA),
            "dpo_pairs": lambda: ref_dpo_pairs(sums, ref, rewards, mask, BETA)}[loss_type]()
    sft = rrhf_loss(scores, sums, counts, rewards, mask, rank_weight=0.0)[0]
    loss, metrics = listwise_loss(loss_type, scores, sums, counts, rewards, mask, ref,
                                  beta=BETA, rank_weight=2.0, sft_weight=0.5)
    torch.testing.assert_close(loss, 2.0 * pref + 0.5 * sft)
    assert metrics["loss/rank"] == pytest.approx(float(pref))
    assert metrics["loss/sft"] == pytest.approx(float(sft))
    assert metrics["rank/pairs"] > 0 and 0.0 <= metrics["rank/accuracy"] <= 1.0
    default, _ = listwise_loss(loss_type, scores, sums, counts, rewards, mask, ref, beta=BETA)
    torch.testing.assert_close(default, pref + default_sft_weight(loss_type) * sft)
    assert default_sft_weight(loss_type) == (1.0 if loss_type in ("rrhf", "pro") else 0.0)


def test_dispatcher_errors():
    scores, sums, counts, rewards, mask, _ = _batch(0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        listwise_loss("simpo", scores, sums, counts, rewards, mask)
    with pytest.raises(ValueError, match="ref_sums"):
        listwise_loss("pl_dpo", scores, sums, counts, rewards, mask)
