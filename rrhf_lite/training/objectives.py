"""Listwise preference objectives beside RRHF, each a plain function of the [B, K] per-candidate
numbers the trainer already has: scores p_i = S_i / |y_i|^lambda, log-prob sums S_i, token counts,
rewards r_i, the mask of real candidates, and (DPO family) reference sums R_i = log pi_ref(y_i|x).

Every objective is loss = rank_weight * preference term + sft_weight * SFT term, where the SFT
term is `sft_loss` (token mean of the best candidate's log-probs, best = first argmax of the
reward). The SFT weight defaults to each paper's own: on (1.0) for RRHF and PRO, off (0.0) for
the DPO family, so that `pl_dpo` at k = 2 is plain DPO.

Shared conventions (the same as `rrhf_loss`):
- `mask` [B, K] marks real candidates; padded slots may hold anything (even NaN) and never reach
  the loss or its gradient; prompts may have different k (k = 1 included).
- Tied rewards carry no preference. In the list objectives, candidate i's "remaining set" is i
  itself and every real candidate with a strictly lower reward; without ties this is exactly the
  papers' "candidates from rank position i on" in the reward order; with ties no tied candidate is
  ever pushed above another.
- Each prompt's preference term is summed over its positions/pairs (dpo_pairs: averaged over its
  pairs), then averaged over all prompts of the batch; a prompt with no preference adds 0.

Objectives (`LOSS_TYPES`):
- rrhf (Yuan et al. 2023, arXiv 2304.05302): sum over pairs r_i < r_j of relu(p_i - p_j).
- pro, Preference Ranking Optimisation (Song et al. 2023, arXiv 2306.17492, Eq. 5-6): for each
  candidate k with a remaining set, -log( exp(p_k / T_k^k) / sum_{i in set} exp(p_i / T_k^i) ),
  with T_k^i = 1 / (r_k - r_i) for i != k and T_k^k = min_i T_k^i, i.e. p_i is multiplied by the
  reward gap and p_k by the largest gap. PRO's code scales its SFT term with the list length;
  here the SFT weight is `sft_weight` (default 1.0), unscaled, so objectives compare at one weight.
- pl_dpo, Plackett-Luce DPO (Rafailov et al. 2023, arXiv 2305.18290, appendix A.3): with
  u_i = beta * (S_i - R_i), for each candidate k with a remaining set,
  -log( exp(u_k) / sum_{i in set} exp(u_i) ). At k = 2: -log sigmoid(u_best - u_worst), DPO.
- lipo, LiPO-lambda (Liu et al. 2024, arXiv 2402.01878, Eq. 7-8): s_i = beta * (S_i - R_i),
  sum over pairs r_i > r_j of -Delta_ij * log sigmoid(s_i - s_j), with the lambda weight
  Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, gain G_i = 2^{r_i} - 1 (the labels psi are
  the rewards as given: rescale rewards on a large scale, 2^r grows fast), discount
  D(tau) = log2(1 + tau), tau_i the 1-based rank of candidate i under the current s among the
  prompt's real candidates (descending, ties broken by position; no gradient through the sort).
- dpo_pairs, all-pairs DPO: the mean over the prompt's pairs r_i > r_j of
  -log sigmoid(u_i - u_j). At k = 2 it is DPO, the same as pl_dpo.
Only torch is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rrhf_lite.training.losses import (
    _pair_mask,
    _ranking_metrics,
    _valid_mask,
    best_candidate_index,
    rank_loss,
    sft_loss,
)

__all__ = ["LOSS_TYPES", "REFERENCE_LOSS_TYPES", "default_sft_weight", "pro_loss", "pl_dpo_loss",
           "lipo_loss", "dpo_pairs_loss", "listwise_loss"]

LOSS_TYPES = ("rrhf", "pro", "pl_dpo", "lipo", "dpo_pairs")
# objectives on beta * (log pi - log pi_ref): they need reference sums
REFERENCE_LOSS_TYPES = ("pl_dpo", "lipo", "dpo_pairs")


def default_sft_weight(loss_type: str) -> float:
    """Each paper's own: SFT on the best candidate for RRHF and PRO, none for the DPO family."""
    return 0.0 if loss_type in REFERENCE_LOSS_TYPES else 1.0


def _safe(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Padded slots set to 0 first, so that NaN there reaches neither the loss nor a gradient."""
    return torch.where(valid, values, torch.zeros_like(values))


def _remaining(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, k, i] bool: candidate i is in the remaining set below k (r_i < r_k, both real)."""
    return _pair_mask(rewards, valid).transpose(1, 2)


def _list_softmax_loss(head: torch.Tensor, others: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of sum over k with a non-empty set of -log(e^head_k / (e^head_k +
    sum_{i below k} e^others_{k,i})). head [B, K], others [B, K, K], below [B, K, K] bool."""
    neg_inf = torch.full_like(others, float("-inf"))
    logits = torch.cat([head.unsqueeze(2), torch.where(below, others, neg_inf)], dim=2)
    per_position = torch.logsumexp(logits, dim=2) - head
    has_set = below.any(dim=2)
    return torch.where(has_set, per_position, torch.zeros_like(per_position)).sum(dim=1).mean()


def pro_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PRO's ranking term (no SFT) on length-normalised scores p_i; see the module docstring."""
    valid = _valid_mask(rewards, mask)
    s, r = _safe(scores, valid), _safe(rewards, valid)
    below = _remaining(r, valid)
    gap = r.unsqueeze(2) - r.unsqueeze(1)  # [B, k, i] = r_k - r_i (1 / T_k^i)
    gap = torch.where(below, gap, torch.zeros_like(gap))
    top_gap = gap.amax(dim=2)  # 1 / T_k^k = max_i (r_k - r_i)
    return _list_softmax_loss(s * top_gap, s.unsqueeze(1) * gap, below)


def _implicit_rewards(sums, ref_sums, valid, beta):
    if ref_sums is None:
        raise ValueError("this objective needs ref_sums, the reference model's log-prob sums")
    return beta * (_safe(sums, valid) - _safe(ref_sums, valid))


def pl_dpo_loss(sums, ref_sums, rewards, mask=None, beta: float = 0.1) -> torch.Tensor:
    """Plackett-Luce DPO on u_i = beta (S_i - R_i); see the module docstring."""
    valid = _valid_mask(rewards, mask)
    u = _implicit_rewards(sums, ref_sums, valid, beta)
    below = _remaining(_safe(rewards, valid), valid)
    return _list_softmax_loss(u, u.unsqueeze(1).expand_as(below), below)


def dpo_pairs_loss(sums, ref_sums, rewards, mask=None, beta: float = 0.1) -> torch.Tensor:
    """All-pairs DPO: per prompt the mean over pairs r_i > r_j of -log sigmoid(u_i - u_j)."""
    valid = _valid_mask(rewards, mask)
    u = _implicit_rewards(sums, ref_sums, valid, beta)
    better = _remaining(_safe(rewards, valid), valid)  # [B, i, j]: r_i > r_j
    pair_loss = -F.logsigmoid(u.unsqueeze(2) - u.unsqueeze(1))
    total = torch.where(better, pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2))
    n_pairs = better.sum(dim=(1, 2))
    return (total / n_pairs.clamp(min=1).to(total.dtype)).mean()


@torch.no_grad()
def _ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, K] 1-based rank of each real candidate under `values`, descending; ties by position."""
    keyed = torch.where(valid, values, torch.full_like(values, float("-inf")))
    order = torch.argsort(keyed, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, values.shape[1] + 1, device=values.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def lipo_loss(sums, ref_sums, rewards, mask=None, beta: float = 0.1) -> torch.Tensor:
    """LiPO-lambda on s_i = beta (S_i - R_i) with lambda weights; see the module docstring."""
    valid = _valid_mask(rewards, mask)
    s = _implicit_rewards(sums, ref_sums, valid, beta)
    r = _safe(rewards, valid)
    better = _remaining(r, valid)  # [B, i, j]: r_i > r_j
    with torch.no_grad():
        gain = torch.pow(2.0, r) - 1
        discount = 1.0 / torch.log2(1.0 + _ranks(s.detach(), valid).to(s.dtype))
        delta = ((gain.unsqueeze(2) - gain.unsqueeze(1)).abs()
                 * (discount.unsqueeze(2) - discount.unsqueeze(1)).abs())
    pair_loss = -delta * F.logsigmoid(s.unsqueeze(2) - s.unsqueeze(1))
    return torch.where(better, pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2)).mean()


def listwise_loss(
    loss_type: str,
    scores: torch.Tensor,
    token_logprob_sums: torch.Tensor,
    token_counts: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_sums: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    rank_weight: float = 1.0,
    sft_weight: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = rank_weight * (the objective's preference term) + sft_weight * sft_loss, and metrics.

    Args:
        loss_type: one of LOSS_TYPES. scores, token_logprob_sums, token_counts, rewards: [B, K]
            as in `rrhf_loss`. mask: optional [B, K] bool of real candidates.
        ref_sums: [B, K] reference log-prob sums, needed by REFERENCE_LOSS_TYPES.
        beta: temperature of the DPO family's implicit reward beta * (S - R).
        sft_weight: None = `default_sft_weight(loss_type)`.

    Metrics: "loss/total", "loss/rank" (the unweighted preference term, whatever the objective),
    "loss/sft", "rank/accuracy", "rank/margin", "rank/pairs" on the objective's own scores (p_i
    for rrhf and pro, the implicit rewards u_i for the DPO family), "scores/best", "scores/mean"
    (of p_i).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if sft_weight is None:
        sft_weight = default_sft_weight(loss_type)
    valid = _valid_mask(rewards, mask)
    own = scores
    if loss_type == "rrhf":
        pref = rank_loss(scores, rewards, valid)
    elif loss_type == "pro":
        pref = pro_loss(scores, rewards, valid)
    else:
        objective = {"pl_dpo": pl_dpo_loss, "lipo": lipo_loss, "dpo_pairs": dpo_pairs_loss}[loss_type]
        pref = objective(token_logprob_sums, ref_sums, rewards, valid, beta=beta)
        own = _implicit_rewards(token_logprob_sums, ref_sums, valid, beta)
    loss = rank_weight * pref
    sft = None
    if sft_weight != 0.0:
        sft = sft_loss(token_logprob_sums, token_counts, rewards, valid)
        loss = loss + sft_weight * sft
    metrics = {"loss/total": float(loss.detach()), "loss/rank": float(pref.detach())}
    if sft is None:
        with torch.no_grad():
            sft = sft_loss(token_logprob_sums.detach(), token_counts, rewards, valid)
    metrics["loss/sft"] = float(sft.detach())
    metrics.update(_ranking_metrics(_safe(own, valid), rewards, valid))
    with torch.no_grad():
        s = _safe(scores.detach().float(), valid)
        best = s.gather(1, best_candidate_index(rewards, valid).unsqueeze(1)).squeeze(1)
        has_any = valid.any(dim=1)
        metrics["scores/best"] = float(best[has_any].mean()) if has_any.any() else 0.0
        metrics["scores/mean"] = float(s[valid].mean()) if valid.any() else 0.0
    return loss, metrics
