"""evaluate: how good is each trained variant, in the measures the paper uses.

For every variant of the run (the initial policy, each RRHF round, each ablation):
- mean reward of its greedy answers to held-out prompts (and optionally to training prompts);
- win rate of those answers against the prompts' reference answers, by reward;
- perplexity of its greedy answers under one fixed LM (default: the initial model), so the
  numbers of all variants are comparable: how natural the outputs are, not how sure of itself
  each variant is;
- ranking accuracy of its own length-normalised scores p_i on held-out candidate sets (the
  paper's "model as a reward model" measure; see rrhf_lite.training.losses.ranking_accuracy);
- optionally (rrhf_lite.stages.eval_extras): success per constraint kind when the task's reward
  module offers a breakdown, and the log-likelihood of the initial model's answers to unrelated
  prompts (general ability).
Plus best-of-n: the mean reward of the best of the initial model's samples, the ceiling that
RRHF learns towards, example answers before and after, and each stage's wall time. Writes
eval/ files, report.md, metrics.json and plots (rrhf_lite.stages.eval_report).

The pipeline hands in the run's state and the prompt sets; nothing here reads the pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

import torch

from rrhf_lite.builtin.sources import load_prompt_rows
from rrhf_lite.data.candidate_stats import k_stats, planned_k
from rrhf_lite.data.listwise import load_listwise
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.adapter_record import FULL_PRECISION, BaseQuantization, choose_quantization
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.stages.eval_extras import (
    GeneralAbility,
    breakdown_function,
    example_rows,
    success_by_kind,
)
from rrhf_lite.stages.eval_report import write_report
from rrhf_lite.stages.generate import generate_texts
from rrhf_lite.stages.run_context import INITIAL, RunState, round_variant
from rrhf_lite.stages.sample import sample_candidates
from rrhf_lite.stages.score import score_candidates
from rrhf_lite.training.logprobs import model_candidate_scores as model_scores
from rrhf_lite.training.losses import ranking_accuracy
from rrhf_lite.utils.console import say
from rrhf_lite.utils.io import read_jsonl, write_json, write_jsonl

REFERENCE_KEYS = ("reference", "chosen")


# ------------------------------------------------------------------------------ the metrics


def pairwise_ranking_accuracy(model_scores: list[list[float]], rewards: list[list[float]]) -> dict:
    """Fraction of pairs with different rewards that the model's scores order the same way
    (a tie in the scores counts as wrong; see rrhf_lite.training.losses.ranking_accuracy).

    Rows may have different lengths. Returns {"accuracy" (NaN without pairs), "pairs"}.
    """
    if len(model_scores) != len(rewards) or any(
        len(s) != len(r) for s, r in zip(model_scores, rewards, strict=True)
    ):
        raise ValueError("model scores and rewards must have one value per candidate")
    width = max((len(r) for r in rewards), default=0)
    if width == 0:
        return {"accuracy": float("nan"), "pairs": 0}
    mask = torch.tensor([[j < len(r) for j in range(width)] for r in rewards])

    def padded(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([list(row) + [0.0] * (width - len(row)) for row in rows],
                            dtype=torch.float64)

    right, pairs = ranking_accuracy(padded(model_scores), padded(rewards), mask)
    return {"accuracy": right / pairs if pairs else float("nan"), "pairs": pairs}


def win_rate(rewards: list[float], reference_rewards: list[float]) -> float:
    """Fraction of prompts where the answer beats the reference by reward (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, reference_rewards, strict=True)]
    return mean(wins) if wins else float("nan")


def best_of_n(candidate_rewards: list[list[float]]) -> dict:
    """Mean reward of the best candidate per prompt, of the average one, and the mean n."""
    return {
        "reward/held_out": mean(max(r) for r in candidate_rewards),
        "reward/held_out_mean_candidate": mean(mean(r) for r in candidate_rewards),
        "n": round(mean(len(r) for r in candidate_rewards), 2),
    }


def perplexity(token_logprob_means: list[float]) -> float:
    """exp of minus the mean (over answers) of each answer's mean per-token log-prob."""
    return math.exp(-mean(token_logprob_means))


def _prompt_text(row: dict):
    return row.get("prompt", row.get("query"))


def _reference(row: dict) -> str | None:
    for key in REFERENCE_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            return value
    return None


class Scorer:
    """Rewards for (prompt, response) pairs through the score stage, so every source works."""

    def __init__(self, state: RunState):
        recipe = state.recipe
        self.spec = recipe.scoring.reward_spec(trust_remote_code=recipe.model.trust_remote_code)
        if self.spec.get("given"):
            raise UserInputError(
                "evaluation needs a reward model or function to score new answers",
                where="recipe key scoring.given",
                hint="set scoring.reward_model or scoring.reward_function, or drop 'evaluate'",
            )

    def rows(self, rows: list[dict]) -> list[dict]:
        return score_candidates(rows, reward=self.spec)

    def pairs(self, prompts: list, responses: list[str]) -> list[float]:
        rows = [{"prompt": p, "responses": [r]} for p, r in zip(prompts, responses, strict=True)]
        return [row["scores"][0] for row in self.rows(rows)]


# ------------------------------------------------------------------------------ the steps


def held_out_candidates(state: RunState, scorer: Scorer, eval_rows: list[dict], out_dir: Path
                        ) -> list[dict]:
    """Scored candidate sets on held-out prompts: the recipe's file, or sampled from the initial
    model with the recipe's sampling settings (these also give best-of-n)."""
    recipe = state.recipe
    if recipe.evaluate.ranking_candidates:
        return load_listwise(recipe.evaluate.ranking_candidates)
    path = out_dir / "initial_candidates.jsonl"
    if path.exists():
        return read_jsonl(path)
    # at evaluation time "the policy" is the policy before training
    generators = [state.generator_spec(g, None, policy_name=INITIAL)
                  for g in recipe.sampling.generators]
    say(f"evaluate: sampling initial-model candidates for {len(eval_rows)} held-out prompts")
    rows = sample_candidates(
        eval_rows, generators=generators, include_dataset_responses=False,
        max_new_tokens=recipe.sampling.max_new_tokens,
        max_prompt_length=recipe.sampling_prompt_length,
        batch_size=recipe.sampling.batch_size, seed=recipe.seed + 1,
        load_kwargs=recipe.policy_load_kwargs(),
    )
    rows = scorer.rows(rows)
    write_jsonl(path, rows)
    return rows


def _own_scores(state: RunState, model, tokenizer, rows: list[dict], length_penalty: float,
                micro_batch_size: int) -> list[list[float]]:
    train = state.recipe.train
    return model_scores(
        model, tokenizer, rows, max_length=train.max_length,
        max_prompt_length=train.max_prompt_length, length_penalty=length_penalty,
        micro_batch_size=micro_batch_size,
    )


@torch.no_grad()
def evaluate_variant(state: RunState, scorer: Scorer, adapter: Path | None,
                     prompt_sets: dict[str, list[dict]], candidates: list[dict],
                     reference_rewards: list[float] | None, files: str,
                     general: GeneralAbility | None = None) -> tuple[dict, dict]:
    """Load one variant; answer every prompt set greedily and score the answers (written to
    `files`.<set>.jsonl); rank the held-out candidates with its own scores (unless
    evaluate.ranking_accuracy is off); with `general`,
    measure its log-likelihood of the initial model's answers to the general prompts.

    Returns (metrics entry, {set name: (responses, rewards)}).
    """
    recipe = state.recipe
    if adapter is not None:  # the recipe decides; said once when it is not how training loaded
        choose_quantization(adapter, requested=BaseQuantization.from_section(recipe.quantization),
                            asked_by="the recipe's quantization section",
                            without_record=FULL_PRECISION)
    model, tokenizer = load_causal_lm(
        state.base_model, adapter_path=str(adapter) if adapter else None,
        **recipe.policy_load_kwargs(),
    )
    entry: dict = {}
    answers: dict[str, tuple[list[str], list[float]]] = {}
    # every set's prompts in one list, so its batches are full: on a CPU a small model's
    # generate call costs nearly as much for 8 prompts as for 32
    every_prompt = [_prompt_text(r) for rows in prompt_sets.values() for r in rows]
    every_response = generate_texts(model, tokenizer, every_prompt,
                                    max_new_tokens=recipe.evaluate.max_new_tokens,
                                    batch_size=recipe.evaluate.batch_size)
    start = 0
    for set_name, rows in prompt_sets.items():
        prompts = every_prompt[start:start + len(rows)]
        responses = every_response[start:start + len(rows)]
        start += len(rows)
        rewards = scorer.pairs(prompts, responses)
        write_jsonl(f"{files}.{set_name}.jsonl", [
            {"prompt": p, "response": a, "reward": w}
            for p, a, w in zip(prompts, responses, rewards, strict=True)
        ])
        entry[f"reward/{set_name}"] = mean(rewards)
        answers[set_name] = (responses, rewards)
        if set_name == "held_out" and reference_rewards is not None:
            entry["win_rate/vs_reference"] = win_rate(rewards, reference_rewards)
    if recipe.evaluate.ranking_accuracy:
        own = _own_scores(state, model, tokenizer, candidates, recipe.train.length_penalty,
                          recipe.train.candidate_micro_batch_size or 8)
        entry["ranking/accuracy"] = pairwise_ranking_accuracy(
            own, [row["scores"] for row in candidates])["accuracy"]
    if general is not None:
        entry["general/logprob"] = general.measure(model, tokenizer, initial=adapter is None)
    return entry, answers


@torch.no_grad()
def perplexities(state: RunState, responses_by_variant: dict[str, list[str]], prompts: list
                 ) -> dict[str, float]:
    """Perplexity of each variant's answers under one fixed LM: evaluate.perplexity_model, or
    the initial model (unquantised), the same scorer for every variant."""
    recipe = state.recipe
    name = recipe.evaluate.perplexity_model or state.base_model
    model, tokenizer = load_causal_lm(
        name, torch_dtype=recipe.model.torch_dtype, trust_remote_code=recipe.model.trust_remote_code
    )
    # one row per prompt with every variant's answer as its candidates: each prompt then runs
    # once for all the variants' answers (model_candidate_scores packs by prompt)
    variants = list(responses_by_variant)
    rows = [{"prompt": p, "responses": [responses_by_variant[v][i] for v in variants]}
            for i, p in enumerate(prompts)]
    per_row = _own_scores(state, model, tokenizer, rows, length_penalty=1.0, micro_batch_size=8)
    return {v: perplexity([scores[j] for scores in per_row]) for j, v in enumerate(variants)}


def training_time(adapter: Path | None) -> dict:
    """{"train/s_per_step": ...} from the train_summary.json beside a trained adapter (RRHF
    and DPO alike), so the report compares the methods' cost per optimiser step; {} without."""
    summary = Path(adapter).parent / "train_summary.json" if adapter else None
    if summary is None or not summary.exists():
        return {}
    seconds = json.loads(summary.read_text(encoding="utf-8")).get("seconds_per_step")
    return {"train/s_per_step": seconds} if isinstance(seconds, int | float) else {}


def evaluate_run(state: RunState, prompt_sets: dict[str, list[dict]]) -> dict:
    """Evaluate every variant of the run on `prompt_sets` ("held_out", optionally "train");
    write eval/, report.md, metrics.json, plots. Returns the metrics."""
    out_dir = state.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(state)
    eval_rows = prompt_sets["held_out"]
    held_out_prompts = [_prompt_text(r) for r in eval_rows]
    wanted = state.recipe.evaluate.best_of_n or state.recipe.evaluate.ranking_accuracy
    # held-out candidates serve best-of-n and the ranking only: with both off none are sampled
    candidates = held_out_candidates(state, scorer, eval_rows, out_dir) if wanted else []
    candidate_rewards = [row["scores"] for row in candidates]
    references = [_reference(r) for r in eval_rows]
    reference_rewards = None
    if references and all(ref is not None for ref in references):
        reference_rewards = scorer.pairs(held_out_prompts, references)

    recipe = state.recipe
    general = _general_ability(state, out_dir)
    hook = breakdown_function(recipe.scoring.reward_function,
                              recipe.scoring.reward_search_dirs())
    metrics: dict = {"variants": {}}
    held_out: dict[str, tuple[list[str], list[float]]] = {}
    for variant, adapter in state.variants().items():  # the initial policy first
        done = out_dir / f"{variant}.entry.json"
        if done.exists():  # evaluated by an earlier command of this run (resume, added variant)
            say(f"evaluate: {variant} skipped, found {done}")
            saved = json.loads(done.read_text(encoding="utf-8"))
            entry = saved["entry"]
            answers = {name: tuple(pair) for name, pair in saved["answers"].items()}
        else:
            say(f"evaluate: {variant}")
            entry, answers = evaluate_variant(state, scorer, adapter, prompt_sets, candidates,
                                              reference_rewards, str(out_dir / variant), general)
            entry.update(training_time(adapter))
            write_json(done, {"entry": entry, "answers": answers})
        metrics["variants"][variant] = entry
        held_out[variant] = answers["held_out"]
        kinds = success_by_kind(hook, held_out_prompts, answers["held_out"][0])
        if kinds is not None:
            metrics.setdefault("success_by_kind", {})[variant] = kinds

    if state.recipe.evaluate.best_of_n and candidate_rewards:
        metrics["best_of_n"] = best_of_n(candidate_rewards)
    if recipe.evaluate.ranking_accuracy:
        metrics["ranking_pairs"] = pairwise_ranking_accuracy(candidate_rewards,
                                                             candidate_rewards)["pairs"]
    responses = {variant: answer[0] for variant, answer in held_out.items()}
    for variant, ppl in perplexities(state, responses, held_out_prompts).items():
        metrics["variants"][variant]["perplexity"] = ppl
    candidates_k = training_candidate_stats(state)
    if candidates_k:
        metrics["candidates"] = candidates_k
    rewards = {variant: answer[1] for variant, answer in held_out.items()}
    final = round_variant(max(state.round_adapters)) if state.round_adapters else INITIAL
    examples = example_rows(held_out_prompts, held_out, INITIAL, final, recipe.evaluate.examples)
    write_report(state, metrics, rewards, candidate_rewards,
                 (f"Example answers (held-out): {INITIAL} and {final}", examples))
    return metrics


def _general_ability(state: RunState, out_dir: Path) -> GeneralAbility | None:
    recipe = state.recipe
    source = recipe.evaluate.general_prompts
    if not source:
        return None
    rows = load_prompt_rows(source, split=recipe.data.eval_split,
                            limit=recipe.evaluate.max_general_prompts, seed=recipe.seed,
                            key="evaluate.general_prompts")
    return GeneralAbility(state, rows, out_dir / "general_answers.jsonl")


def training_candidate_stats(state: RunState) -> dict:
    """k per prompt of each round's training candidates against the planned k (de-duplication
    and empty answers lower it): {"round-1": k_stats, ...}, for the rounds that were scored."""
    recipe = state.recipe
    planned = planned_k(recipe.sampling) if "sample" in recipe.stages else None
    out = {}
    for index in range(1, recipe.rounds + 1):
        for name in ("scored.jsonl", "candidates.jsonl"):
            path = state.round_dir(index) / name
            if path.exists():
                out[f"round-{index}"] = k_stats(read_jsonl(path), planned)
                break
    return out
