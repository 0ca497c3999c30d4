"""evaluate: how good is each trained variant, in the measures the paper uses.

For every variant of the run (the initial policy, each RRHF round, each ablation):
- mean reward of its greedy answers to held-out prompts (and optionally to training prompts);
- win rate of those answers against the prompts' reference answers, by reward;
- perplexity of its greedy answers under a chosen LM (default: the initial model);
- ranking accuracy of its own length-normalised scores p_i on held-out candidate sets (the
  paper's "model as a reward model" measure): the fraction of reward-ordered pairs it orders
  the same way.
Plus best-of-n: the mean reward of the best of the initial model's samples, the ceiling that
RRHF learns towards. Writes eval/ files, report.md, metrics.json and plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

from rrhf_lite.errors import UserInputError
from rrhf_lite.io import read_jsonl, write_jsonl
from rrhf_lite.sources import load_prompt_rows

REFERENCE_KEYS = ("reference", "chosen")


def _say(message: str) -> None:
    print(f"[rrhf-lite] {message}", flush=True)


def pairwise_ranking_accuracy(model_scores: list[list[float]], rewards: list[list[float]]) -> dict:
    """Fraction of pairs with different rewards that the model's scores order the same way.

    A tie in the model's scores counts as half right. Returns {"accuracy", "pairs"}.
    """
    right, pairs = 0.0, 0
    for scores, reward in zip(model_scores, rewards, strict=True):
        for i in range(len(reward)):
            for j in range(len(reward)):
                if reward[i] < reward[j]:
                    pairs += 1
                    if scores[i] < scores[j]:
                        right += 1
                    elif scores[i] == scores[j]:
                        right += 0.5
    return {"accuracy": right / pairs if pairs else float("nan"), "pairs": pairs}


def win_rate(rewards: list[float], reference_rewards: list[float]) -> float:
    """Fraction of prompts where the answer beats the reference by reward (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, reference_rewards, strict=True)]
    return mean(wins) if wins else float("nan")


def _prompt_text(row: dict):
    return row.get("prompt", row.get("query"))


def _reference(row: dict) -> str | None:
    for key in REFERENCE_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            return value
    return None


class _Scorer:
    """Rewards for (prompt, response) pairs through the score stage, so every source works."""

    def __init__(self, recipe):
        from rrhf_lite.pipeline import reward_spec

        self.spec = reward_spec(recipe)
        if self.spec.get("given"):
            raise UserInputError(
                "evaluation needs a reward model or function to score new answers",
                where="recipe key scoring.given",
                hint="set scoring.reward_model or scoring.reward_function, or drop 'evaluate'",
            )

    def rows(self, rows: list[dict]) -> list[dict]:
        from rrhf_lite.stages.score import score_candidates

        return score_candidates(rows, reward=self.spec)

    def pairs(self, prompts: list, responses: list[str]) -> list[float]:
        rows = [{"prompt": p, "responses": [r]} for p, r in zip(prompts, responses, strict=True)]
        return [row["scores"][0] for row in self.rows(rows)]


def _load_policy(state, adapter: Path | None):
    from rrhf_lite.inference import load_causal_lm
    from rrhf_lite.pipeline import policy_load_kwargs

    return load_causal_lm(
        state.base_model, adapter_path=str(adapter) if adapter else None,
        **policy_load_kwargs(state.recipe),
    )


def _greedy(state, model, tokenizer, prompts: list) -> list[str]:
    from rrhf_lite.stages.generate import greedy_generate

    evaluate = state.recipe.evaluate
    return greedy_generate(
        model, tokenizer, prompts, max_new_tokens=evaluate.max_new_tokens,
        batch_size=evaluate.batch_size,
    )


def _own_scores(state, model, tokenizer, rows: list[dict]) -> list[list[float]]:
    from rrhf_lite.logprobs import model_candidate_scores as model_scores

    train = state.recipe.train
    return model_scores(
        model, tokenizer, rows, max_length=train.max_length, max_prompt_length=train.max_prompt_length,
        length_penalty=train.length_penalty, micro_batch_size=train.candidate_micro_batch_size or 8,
    )


def _held_out_candidates(state, scorer: _Scorer, eval_rows: list[dict], out_dir: Path) -> list[dict]:
    """Scored candidate sets on held-out prompts: the recipe's file, or sampled from the initial
    model with the recipe's sampling settings (these also give best-of-n)."""
    recipe = state.recipe
    if recipe.evaluate.ranking_candidates:
        from rrhf_lite.data import load_listwise

        return load_listwise(recipe.evaluate.ranking_candidates)
    path = out_dir / "initial_candidates.jsonl"
    if path.exists():
        return read_jsonl(path)
    from rrhf_lite.pipeline import _generator_spec, policy_load_kwargs
    from rrhf_lite.stages.sample import sample_candidates

    generators = []
    for generator in recipe.sampling.generators:
        spec = _generator_spec(state, generator, None)
        if generator.model == "policy":  # at evaluation time "the policy before training"
            spec["name"] = "initial"
        generators.append(spec)
    _say(f"evaluate: sampling initial-model candidates for {len(eval_rows)} held-out prompts")
    rows = sample_candidates(
        eval_rows, generators=generators, include_dataset_responses=False,
        max_new_tokens=recipe.sampling.max_new_tokens,
        max_prompt_length=recipe.sampling.max_prompt_length,
        batch_size=recipe.sampling.batch_size, seed=recipe.seed + 1,
        load_kwargs=policy_load_kwargs(recipe),
    )
    rows = scorer.rows(rows)
    write_jsonl(path, rows)
    return rows


def _perplexity(state, responses_by_variant: dict[str, list[str]], prompts: list) -> dict:
    """exp of minus the mean per-token log-prob of each variant's answers under one LM."""
    import torch

    from rrhf_lite.inference import load_causal_lm

    recipe = state.recipe
    name = recipe.evaluate.perplexity_model or state.base_model
    model, tokenizer = load_causal_lm(
        name, torch_dtype=recipe.model.torch_dtype, trust_remote_code=recipe.model.trust_remote_code
    )
    result = {}
    with torch.no_grad():
        for variant, responses in responses_by_variant.items():
            rows = [{"prompt": p, "responses": [r]} for p, r in zip(prompts, responses, strict=True)]
            from rrhf_lite.logprobs import model_candidate_scores as model_scores

            per_row = model_scores(
                model, tokenizer, rows, max_length=recipe.train.max_length,
                max_prompt_length=recipe.train.max_prompt_length, length_penalty=1.0,
                micro_batch_size=8,
            )
            result[variant] = math.exp(-mean(s[0] for s in per_row))
    del model
    return result


def evaluate_run(state) -> dict:
    """Evaluate every variant of the run; write eval/, report.md, metrics.json, plots."""
    import torch

    from rrhf_lite.report import print_summary_table, write_run_report

    recipe = state.recipe
    out_dir = state.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = _Scorer(recipe)

    source = recipe.data.eval_prompts
    split = recipe.data.eval_split
    if not source:
        source, split = recipe.data.prompts, recipe.data.prompts_split
        _say("evaluate: no data.eval_prompts, so evaluating on training prompts")
    if not source:
        raise UserInputError("nothing to evaluate on", where="recipe key data.eval_prompts",
                             hint="name a held-out prompt file or data set")
    eval_rows = load_prompt_rows(source, split=split, limit=recipe.data.max_eval_prompts,
                                 seed=recipe.seed, key="data.eval_prompts")
    prompt_sets = {"held_out": eval_rows}
    if recipe.evaluate.train_prompts and recipe.data.prompts:
        prompt_sets["train"] = load_prompt_rows(
            recipe.data.prompts, split=recipe.data.prompts_split,
            limit=recipe.evaluate.train_prompts, seed=recipe.seed, key="data.prompts",
        )

    variants: dict[str, Path | None] = {"initial": None, **state.adapters}
    candidates = _held_out_candidates(state, scorer, eval_rows, out_dir)
    candidate_rewards = [row["scores"] for row in candidates]

    metrics: dict = {"variants": {}}
    responses_held_out: dict[str, list[str]] = {}
    rewards_held_out: dict[str, list[float]] = {}
    references = [_reference(r) for r in eval_rows]
    reference_rewards = None
    if all(ref is not None for ref in references) and references:
        reference_rewards = scorer.pairs([_prompt_text(r) for r in eval_rows], references)

    for variant, adapter in variants.items():
        _say(f"evaluate: {variant}")
        model, tokenizer = _load_policy(state, adapter)
        entry: dict = {}
        with torch.no_grad():
            for set_name, rows in prompt_sets.items():
                prompts = [_prompt_text(r) for r in rows]
                responses = _greedy(state, model, tokenizer, prompts)
                rewards = scorer.pairs(prompts, responses)
                write_jsonl(out_dir / f"{variant}.{set_name}.jsonl", [
                    {"prompt": p, "response": a, "reward": w}
                    for p, a, w in zip(prompts, responses, rewards, strict=True)
                ])
                entry[f"reward/{set_name}"] = mean(rewards)
                if set_name == "held_out":
                    responses_held_out[variant], rewards_held_out[variant] = responses, rewards
                    if reference_rewards is not None:
                        entry["win_rate/vs_reference"] = win_rate(rewards, reference_rewards)
            own = _own_scores(state, model, tokenizer, candidates)
        ranking = pairwise_ranking_accuracy(own, candidate_rewards)
        entry["ranking/accuracy"] = ranking["accuracy"]
        metrics["variants"][variant] = entry
        del model

    if recipe.evaluate.best_of_n and candidate_rewards:
        metrics["best_of_n"] = {
            "reward/held_out": mean(max(r) for r in candidate_rewards),
            "reward/held_out_mean_candidate": mean(mean(r) for r in candidate_rewards),
            "n": round(mean(len(r) for r in candidate_rewards), 2),
        }
    metrics["ranking_pairs"] = pairwise_ranking_accuracy(candidate_rewards, candidate_rewards)["pairs"]
    for variant, ppl in _perplexity(
        state, responses_held_out, [_prompt_text(r) for r in eval_rows]
    ).items():
        metrics["variants"][variant]["perplexity"] = ppl

    rows = _summary_rows(metrics)
    plots = _plots(state, out_dir, rewards_held_out, candidate_rewards) if recipe.evaluate.plots else []
    write_run_report(
        state.run_dir, metrics, title=f"rrhf-lite run: {recipe.name}",
        tables=[("Results (held-out prompts unless named)", rows)],
        notes=_notes(state, plots, metrics), images=plots,
    )
    from rich.console import Console

    # A wide console even when piped (CI logs, notebooks): the table stays readable.
    print_summary_table(rows, console=Console(width=160))
    return metrics


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


def _plots(state, out_dir: Path, rewards_by_variant: dict, candidate_rewards) -> list[Path]:
    from rrhf_lite.plots import plot_reward_distributions, plot_training_curves

    made = []
    history = state.round_dir(1) / "train" / "metrics.jsonl"
    if history.exists():
        made.append(plot_training_curves(history, state.run_dir / "training_curves.png"))
    distributions = dict(rewards_by_variant)
    if candidate_rewards:
        distributions["best-of-n"] = [max(r) for r in candidate_rewards]
    made.append(plot_reward_distributions(distributions, state.run_dir / "reward_distributions.png"))
    return made


def _notes(state, plots: list[Path], metrics: dict) -> list[str]:
    recipe = state.recipe
    notes = [
        f"base model: {recipe.model.name_or_path}; rounds: {recipe.rounds}; "
        f"length_penalty {recipe.train.length_penalty}, rank_weight {recipe.train.rank_weight}, "
        f"sft_weight {recipe.train.sft_weight}",
        "ranking/accuracy: fraction of reward-ordered pairs of held-out candidates that the "
        "model's own length-normalised log-probs order the same way (ties count half)",
        "perplexity: exp(-mean per-token log-prob) of each variant's greedy answers under "
        f"{recipe.evaluate.perplexity_model or 'the initial model'}",
    ]
    if "best_of_n" in metrics:
        notes.append(f"best-of-k: k = {metrics['best_of_n']['n']:g} distinct initial-model "
                     "samples per held-out prompt on average (duplicates removed)")
    notes += [f"plot: {p.name}" for p in plots]
    return notes
