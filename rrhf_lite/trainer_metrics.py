"""The trainer's logged metrics, reduced over the steps since the last log and over ranks, so that
several processes log what one process with their whole batch would."""

from __future__ import annotations

# metrics averaged with the number of rank pairs as weight (a batch without pairs says nothing)
_PAIR_WEIGHTED = ("rank/accuracy", "rank/margin")
# counts that add up over ranks (the pairs of one global batch), instead of averaging
_SUMMED_OVER_RANKS = ("rank/pairs",)


def metric_totals(stored: dict[str, list]) -> dict[str, tuple[float, float]]:
    """key -> (numerator, denominator) over the steps since the last log."""
    totals = {}
    pairs = stored.get("rank/pairs", [])
    for key, values in stored.items():
        if not values:
            continue
        if key in _PAIR_WEIGHTED and pairs and len(pairs) == len(values):
            weighted = sum(v * w for v, w in zip(values, pairs, strict=True))
            totals[key] = (float(weighted), float(sum(pairs)))
        else:
            totals[key] = (float(sum(values)), float(len(values)))
    return totals

def aggregate_metrics(stored: dict[str, list]) -> dict[str, float]:
    """Mean over the steps since the last log; accuracy and margin weighted by pair count."""
    totals = metric_totals(stored)
    return {key: num / den if den else 0.0 for key, (num, den) in totals.items()}

def combine_rank_totals(every: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Metrics from each rank's metric_totals: weighted means over all ranks' steps, except
    rank/pairs, summed over the ranks (the pairs of one global batch, as one process with
    that batch would count them). One rank gives exactly aggregate_metrics."""
    out = {}
    for key in sorted({k for totals in every for k in totals}):
        parts = [totals[key] for totals in every if key in totals]
        if key in _SUMMED_OVER_RANKS:
            out[key] = sum(num / den for num, den in parts if den)
        else:
            num, den = sum(p[0] for p in parts), sum(p[1] for p in parts)
            out[key] = num / den if den else 0.0
    return out
