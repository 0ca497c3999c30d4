"""How many candidates each prompt really has, against how many the recipe plans.

Sampling keeps identical candidates once (a duplicate carries no ranking signal: the pair ties
in reward and in the policy's score) and drops empty ones, so a prompt can end with k below
the planned k (the paper's 4 beams + chosen + rejected = 6), where the reference code kept
duplicates. These counts say how often that happens; the sample and score stages print them,
and the run report carries them per round.
"""

from __future__ import annotations

from collections.abc import Sequence


def generated_per_prompt(generator) -> int:
    """Candidates one generator returns per prompt (greedy decoding returns one)."""
    return 1 if generator.method == "greedy" else generator.num_candidates


def planned_k(sampling, dataset_answers: int = 2) -> int:
    """k the sampling section plans per prompt: every generator's candidates, plus the data
    set's answers when included (chosen + rejected of a pairwise set such as rm-static)."""
    k = sum(generated_per_prompt(g) for g in sampling.generators)
    return k + (dataset_answers if sampling.include_dataset_responses else 0)


def k_stats(rows: Sequence[dict], planned: int | None = None, dropped: int = 0) -> dict:
    """Counts over listwise rows: prompts, mean/min k, rows below `planned` (None: each row's
    own count of candidates before de-duplication, sum of its "counts"), duplicates removed.
    `dropped` prompts (left with no non-empty candidate, so not in `rows`) count as k = 0."""
    ks = [len(row.get("responses") or ()) for row in rows] + [0] * dropped
    produced = [sum(row["counts"]) if isinstance(row.get("counts"), list) else k
                for row, k in zip(rows, ks, strict=False)] + [planned or 1] * dropped
    below = sum(k < (planned if planned is not None else p) for k, p in zip(ks, produced, strict=True))
    return {
        "prompts": len(ks),
        "planned_k": planned,
        "mean_k": sum(ks) / len(ks) if ks else None,
        "min_k": min(ks) if ks else None,
        "rows_below_planned": below,
        "fraction_below_planned": below / len(ks) if ks else None,
        "duplicates_removed": sum(produced[:len(rows)]) - sum(ks[:len(rows)]),
        "prompts_dropped": dropped,
    }


def describe(stats: dict) -> str:
    """One line for people: 'k < 6 on 12 of 500 prompts (2.4 %); mean k 5.97, min 3; ...'."""
    if not stats["prompts"]:
        return "no prompts"
    planned = stats["planned_k"]
    target = f"k < {planned}" if planned is not None else "k below the candidates produced"
    dropped = stats.get("prompts_dropped") or 0
    return (f"{target} on {stats['rows_below_planned']} of {stats['prompts']} prompts "
            f"({100 * stats['fraction_below_planned']:.1f} %); mean k {stats['mean_k']:.2f}, "
            f"min {stats['min_k']}; {stats['duplicates_removed']} duplicate candidates removed"
            + (f"; {dropped} prompts dropped, every candidate empty" if dropped else ""))
