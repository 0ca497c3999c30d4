"""evaluate's report: the results table and its companions in report.md and metrics.json, the
plots, and the console table. Only formatting and files; evaluate.py measures."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from rrhf_lite.data.candidate_stats import describe
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.stages.stage_times import read_stage_times, stage_time_rows
from rrhf_lite.utils.plots import plot_reward_distributions, plot_training_curves
from rrhf_lite.utils.report_files import print_summary_table, update_run_report, write_run_report

RESULTS = "Results (held-out prompts unless named)"
KINDS = "Success per constraint kind (held-out: share of prompts stating it that meet it in full)"
TIMES = "Wall time per stage (seconds)"


def write_report(state: RunState, metrics: dict, rewards_by_variant: dict,
                 candidate_rewards: list[list[float]], examples: tuple[str, list[dict]] | None = None
                 ) -> None:
    """report.md, metrics.json and the plots in the run directory; the table on the console.

    examples: (heading, rows) of before/after answers, shown after the results."""
    rows = _summary_rows(metrics)
    plots = _plots(state, rewards_by_variant, candidate_rewards) if state.recipe.evaluate.plots else []
    tables = [(RESULTS, rows)]
    if metrics.get("success_by_kind"):
        tables.append((KINDS, [{"variant": variant, **{k: round(v, 3) for k, v in kinds.items()}}
                               for variant, kinds in metrics["success_by_kind"].items()]))
    if examples and examples[1]:
        tables.append(examples)
    times = read_stage_times(state.run_dir)
    if times:
        metrics["wall_s"] = times
        tables.append((TIMES, stage_time_rows(times)))
    write_run_report(
        state.run_dir, metrics, title=f"rrhf-lite run: {state.recipe.name}",
        tables=tables, notes=_notes(state, plots, metrics), images=plots,
    )
    # A wide console even when piped (CI logs, notebooks): the table stays readable.
    print_summary_table(rows, console=Console(width=160))


def refresh_stage_times(run_dir: Path) -> bool:
    """Put the complete stage times (evaluate's and merge's included) into an existing report;
    False when the run has no report or no times."""
    times = read_stage_times(run_dir)
    if not times:
        return False
    return update_run_report(run_dir, {"wall_s": times}, [(TIMES, stage_time_rows(times))])


def _summary_rows(metrics: dict) -> list[dict]:
    rows = []
    for variant, entry in metrics["variants"].items():
        row = {"variant": variant}
        row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()})
        rows.append(row)
    if "best_of_n" in metrics:
        best = metrics["best_of_n"]
        rows.append({"variant": "best-of-k (initial samples)",
                     "reward/held_out": round(best["reward/held_out"], 4)})
    return rows


def _plots(state: RunState, rewards_by_variant: dict, candidate_rewards) -> list[Path]:
    made = []
    history = state.round_dir(1) / "train" / "metrics.jsonl"
    if history.exists():
        made.append(plot_training_curves(history, state.run_dir / "training_curves.png"))
    distributions = dict(rewards_by_variant)
    if candidate_rewards:
        distributions["best-of-n"] = [max(r) for r in candidate_rewards]
    made.append(plot_reward_distributions(distributions, state.run_dir / "reward_distributions.png"))
    return made


def _notes(state: RunState, plots: list[Path], metrics: dict) -> list[str]:
    recipe = state.recipe
    notes = [
        f"base model: {recipe.model.name_or_path}; rounds: {recipe.rounds}; "
        f"length_penalty {recipe.train.length_penalty}, rank_weight {recipe.train.rank_weight}, "
        f"sft_weight {recipe.train.sft_weight}, loss_type {recipe.train.loss_type}",
        "perplexity: exp(-mean per-token log-prob) of each variant's greedy answers under one "
        f"fixed LM, {recipe.evaluate.perplexity_model or 'the initial model'}",
    ]
    if recipe.evaluate.ranking_accuracy:
        notes.insert(1, "ranking/accuracy: fraction of reward-ordered pairs of held-out "
                     "candidates that the model's own length-normalised log-probs order the same "
                     "way (a tie counts as wrong)")
    if any("general/logprob" in e for e in metrics["variants"].values()):
        notes.append(
            "general/logprob: mean per-token log-likelihood, under each variant, of the initial "
            f"model's greedy answers to {recipe.evaluate.general_prompts} (prompts unrelated to "
            "the task); far below the initial value = general ability collapsed")
    if "best_of_n" in metrics:
        notes.append(f"best-of-k: k = {metrics['best_of_n']['n']:g} distinct initial-model "
                     "samples per held-out prompt on average (duplicates removed)")
    notes += _dpo_notes(state)
    notes.append("train/s_per_step: wall time per optimiser step of each trained variant")
    for name, stats in metrics.get("candidates", {}).items():
        notes.append(f"training candidates, {name}: {describe(stats)} (identical candidates "
                     "are kept once: a duplicate carries no ranking signal)")
    notes += [f"plot: {p.name}" for p in plots]
    return notes


def _dpo_notes(state: RunState) -> list[str]:
    """What each DPO ablation trained on, from its train_summary.json."""
    notes = []
    for ablation in state.recipe.ablations:
        summary = state.ablation_dir(ablation.name) / "train" / "train_summary.json"
        if ablation.method != "dpo" or not summary.exists():
            continue
        done = json.loads(summary.read_text(encoding="utf-8"))
        data = done.get("data", {})
        notes.append(
            f"{ablation.name}: DPO ({ablation.dpo.loss_type}, beta {ablation.dpo.beta}) on "
            f"{data.get('pairs')} best-vs-worst pairs of round 1's candidates "
            f"({data.get('skipped_tied_prompts')} prompts skipped: all scores tied), "
            f"{done.get('global_step')} optimiser steps ({done.get('optimizer_steps_from')})")
    return notes
