"""The RRHF objective (paper Eq. 2-4) on per-candidate scores: rank loss + SFT on the best.

Shapes: B prompts, up to k candidates each. `mask` [B, k] marks real candidates, so prompts with
fewer candidates sit in one padded tensor; padded slots may hold any value (even NaN) and never
reach the loss or its gradient. Only torch is imported here, so the losses stay quick to import.
"""

from __future__ import annotations

import torch

__all__ = ["rank_loss", "sft_loss", "rrhf_loss", "best_candidate_index", "ranking_accuracy"]


def _valid_mask(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != rewards shape {tuple(rewards.shape)}")
    return mask.to(torch.bool)


def _pair_mask(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, k, k] bool: entry (b, i, j) is a pair when r_i < r_j and both candidates are real."""
    # where() first, so padded NaN rewards cannot leak through comparisons
    safe = torch.where(valid, rewards, torch.zeros_like(rewards))
    lower = safe.unsqueeze(2) < safe.unsqueeze(1)
    return lower & valid.unsqueeze(2) & valid.unsqueeze(1)


def rank_loss(
    scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over prompts of the sum over pairs (i, j) with r_i < r_j of relu(s_i - s_j).

    Args:
        scores: [B, k] candidate scores p_i (length-normalised log-probs), differentiable.
        rewards: [B, k] rewards; tied rewards give no pair.
        mask: optional [B, k] bool, True for real candidates.

    Returns a 0-dim tensor. A prompt with no pair (k = 1, all tied) contributes 0 to the mean.
    """
    if scores.shape != rewards.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and rewards {tuple(rewards.shape)} must be [B, k]")
    valid = _valid_mask(rewards, mask)
    pairs = _pair_mask(rewards, valid)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [B, i, j] = s_i - s_j
    hinge = torch.where(pairs, torch.relu(diff), torch.zeros_like(diff))
    return hinge.sum(dim=(1, 2)).mean()


def best_candidate_index(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B] index of the first highest-reward real candidate of each prompt."""
    valid = _valid_mask(rewards, mask)
    masked = torch.where(valid, rewards, torch.full_like(rewards, float("-inf")))
    # torch.argmax returns the first maximal index, which is the tie rule of the contract
    return masked.argmax(dim=1)


def sft_loss(
    token_logprob_sums: torch.Tensor,
    token_counts: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over prompts of -(sum of token log-probs of the best candidate) / (its token count).

    Args:
        token_logprob_sums: [B, k] sum over response tokens of log pi(y_t | ...), differentiable.
        token_counts: [B, k] number of response tokens (clamped to >= 1 here).
        rewards: [B, k]; the best candidate is the first argmax among real candidates.
        mask: optional [B, k] bool, True for real candidates.

    This is the token mean of the paper's Eq. 4 (the reference code's intent, without its
    padded-length bug). A prompt with no real candidate contributes 0.
    """
    valid = _valid_mask(rewards, mask)
    best = best_candidate_index(rewards, valid).unsqueeze(1)
    sums = token_logprob_sums.gather(1, best).squeeze(1)
    counts = token_counts.gather(1, best).squeeze(1).to(sums.dtype).clamp(min=1)
    per_prompt = -sums / counts
    has_any = valid.any(dim=1)
    per_prompt = torch.where(has_any, per_prompt, torch.zeros_like(per_prompt))
    return per_prompt.mean()


@torch.no_grad()
def ranking_accuracy(
    scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """(pairs ordered right, pairs): the one definition of RRHF's ranking accuracy.

    Pairs are (i, j) of real candidates with r_i < r_j (tied rewards give no pair); a pair is
    ordered right when s_i < s_j. A tie in the scores counts as wrong, not half right: the
    paper's "model as a reward model" accuracy asks whether the model prefers the better
    response, and a tie prefers neither (a model that scores every candidate alike has
    learnt no ranking and gets 0, not 0.5). It is also what the rank loss asks for: it only
    reaches 0 when s_i <= s_j, and a score that cannot separate two responses does not rank.
    The trainer's rank/accuracy and evaluate's ranking/accuracy both come from here.
    """
    valid = _valid_mask(rewards, mask)
    pairs = _pair_mask(rewards, valid)
    s = torch.where(valid, scores.detach().float(), torch.zeros_like(scores, dtype=torch.float))
    right = (s.unsqueeze(2) < s.unsqueeze(1)) & pairs  # [B, i, j]: s_i < s_j
    return int(right.sum()), int(pairs.sum())


@torch.no_grad()
def _ranking_metrics(scores: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> dict:
    right, n_pairs = ranking_accuracy(scores, rewards, valid)
    if n_pairs:
        s = scores.detach().float()
        margin = s.unsqueeze(1) - s.unsqueeze(2)  # [B, i, j] = s_j - s_i: positive when right
        accuracy, mean_margin = right / n_pairs, float(margin[_pair_mask(rewards, valid)].mean())
    else:
        accuracy, mean_margin = 0.0, 0.0
    return {"rank/accuracy": accuracy, "rank/margin": mean_margin, "rank/pairs": float(n_pairs)}


def rrhf_loss(
    scores: torch.Tensor,
    token_logprob_sums: torch.Tensor,
    token_counts: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RRHF loss = rank_weight * rank_loss + sft_weight * sft_loss, plus metrics.

    Args:
        scores: [B, k] length-normalised candidate scores p_i.
        token_logprob_sums, token_counts: [B, k] as in `sft_loss`.
        rewards: [B, k]. mask: optional [B, k] bool of real candidates.
        rank_weight, sft_weight: weights of the two parts (the paper uses 1 and 1).

    Returns (loss, metrics) with float metrics:
        "loss/total", "loss/rank", "loss/sft" (unweighted parts),
        "rank/accuracy": fraction of reward-ordered pairs (r_i < r_j) with s_i < s_j
            (0.0 when the batch has no pair; see "rank/pairs"),
        "rank/margin": mean of s_j - s_i over those pairs,
        "rank/pairs": number of pairs in the batch,
        "scores/best", "scores/mean": mean score of the best / of all real candidates.
    """
    valid = _valid_mask(rewards, mask)
    rank = rank_loss(scores, rewards, valid)
    sft = sft_loss(token_logprob_sums, token_counts, rewards, valid)
    loss = rank_weight * rank + sft_weight * sft
    metrics = {"loss/total": float(loss.detach()), "loss/rank": float(rank.detach()),
               "loss/sft": float(sft.detach())}
    metrics.update(_ranking_metrics(scores, rewards, valid))
    with torch.no_grad():
        s = scores.detach().float()
        best = s.gather(1, best_candidate_index(rewards, valid).unsqueeze(1)).squeeze(1)
        has_any = valid.any(dim=1)
        metrics["scores/best"] = float(best[has_any].mean()) if has_any.any() else 0.0
        metrics["scores/mean"] = float(s[valid].mean()) if valid.any() else 0.0
    return loss, metrics
