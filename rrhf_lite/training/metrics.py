"""The trainer's logged metrics, reduced over the steps since the last log and over ranks, so that
several processes log what one process with their whole batch would."""

from __future__ import annotations

from collections import defaultdict

from rrhf_lite.utils.distributed import all_gather_object

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


class LoggedMetrics:
    """The trainer's side of it (a mixin before transformers.Trainer): each step's metrics are
    stored per mode, and `log` replaces them by their reduction over steps and ranks."""

    @property
    def _metrics(self) -> dict[str, defaultdict[str, list]]:
        if "_stored_metrics" not in self.__dict__:
            self._stored_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        return self._stored_metrics

    def _store_metrics(self, metrics: dict[str, float], mode: str) -> None:
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

    # the reductions, as the trainer's own (tests and callbacks call them there)
    _metric_totals = staticmethod(metric_totals)
    aggregate_metrics = staticmethod(aggregate_metrics)
    combine_rank_totals = staticmethod(combine_rank_totals)

    def _aggregate_across_ranks(self, stored: dict[str, list]) -> dict[str, float]:
        totals = metric_totals(stored)
        if self.accelerator.num_processes == 1:
            return combine_rank_totals([totals])
        # a collective: every rank calls Trainer.log at the same points of training/evaluation
        return combine_rank_totals(all_gather_object(totals))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._metrics[mode]
        aggregated = self._aggregate_across_ranks(stored)
        prefix = "eval_" if mode == "eval" else ""
        # in place: Trainer.evaluate() returns this same dict, so eval metrics reach the caller
        logs.update({prefix + k: v for k, v in aggregated.items()})
        stored.clear()
        super().log(logs, start_time)
