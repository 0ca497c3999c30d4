"""What evaluation reports beyond the paper's measures, each optional and task-agnostic:

- success per kind of instruction, when the task's reward module offers a breakdown: a function
  named `success_by_kind(prompts, responses) -> {kind: share met}` next to the recipe's
  `scoring.reward_function` (rrhf_lite.builtin.constraints has one; any user task may);
- general ability: the initial model answers prompts unrelated to the task greedily
  (evaluate.general_prompts), and every variant's mean per-token log-likelihood of those answers
  is measured. The initial model's own value is the reference; a policy that collapsed onto its
  training task (capitals everywhere, lists everywhere) falls far below it;
- example answers, before (initial policy) and after (the final one), on a few held-out prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import mean

from rrhf_lite.stages.generate import generate_texts
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.stages.score import reward_module
from rrhf_lite.training.logprobs import model_candidate_scores
from rrhf_lite.utils.console import say
from rrhf_lite.utils.io import read_jsonl, write_jsonl

BREAKDOWN_HOOK = "success_by_kind"
EXAMPLE_CHARS = 240  # an example answer longer than this is cut in the report


def breakdown_function(reward_function: str | None, search_dirs=()) -> Callable | None:
    """The task's per-kind breakdown: `success_by_kind` in the module of `reward_function`
    ("module:function" or "file.py:function", found as the score stage finds it), or None when
    there is no reward function or no such hook."""
    if not reward_function:
        return None
    module, _ = reward_module(reward_function, search_dirs)
    hook = getattr(module, BREAKDOWN_HOOK, None)
    return hook if callable(hook) else None


def success_by_kind(hook: Callable | None, prompts: list, responses: list[str]) -> dict | None:
    """{kind: share} from the hook, checked to be numbers; None without a hook."""
    if hook is None:
        return None
    result = hook(prompts, responses)
    if not isinstance(result, dict) or not all(isinstance(v, int | float) for v in result.values()):
        raise TypeError(f"{BREAKDOWN_HOOK} must return {{kind: number}}, got {result!r}")
    return {str(k): float(v) for k, v in result.items()}


class GeneralAbility:
    """The general-ability measure over one evaluation: the initial model's greedy answers to
    the general prompts (made once, cached in eval/general_answers.jsonl), then each variant's
    mean per-token log-prob of them. The initial variant must be measured first."""

    def __init__(self, state: RunState, rows: list[dict], path: Path):
        self.state, self.prompts, self.path = state, [r["prompt"] for r in rows], path
        self.answers: list[dict] | None = read_jsonl(path) if path.exists() else None

    def measure(self, model, tokenizer, *, initial: bool) -> float:
        recipe = self.state.recipe
        if self.answers is None:
            if not initial:
                raise RuntimeError("the general prompts are answered by the initial model, "
                                   "which must be evaluated first")
            say(f"evaluate: the initial model answers {len(self.prompts)} general prompts")
            texts = generate_texts(model, tokenizer, self.prompts,
                                   max_new_tokens=recipe.evaluate.max_new_tokens,
                                   batch_size=recipe.evaluate.batch_size)
            self.answers = [{"prompt": p, "responses": [t]}
                            for p, t in zip(self.prompts, texts, strict=True)]
            write_jsonl(self.path, self.answers)
        scores = model_candidate_scores(
            model, tokenizer, self.answers, max_length=recipe.train.max_length,
            max_prompt_length=recipe.train.max_prompt_length, length_penalty=1.0,
            micro_batch_size=recipe.train.candidate_micro_batch_size or 8,
        )
        return mean(s[0] for s in scores if s and s[0] == s[0])  # NaN: no room for an answer


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."


def _prompt_line(prompt) -> str:
    if isinstance(prompt, list):
        prompt = prompt[-1].get("content", "") if prompt else ""
    return _cut(prompt)


def example_rows(prompts: list, answers: dict[str, tuple[list[str], list[float]]],
                 before: str, after: str, n: int) -> list[dict]:
    """The first `n` held-out prompts with the `before` and `after` variants' answers and
    rewards (answers: {variant: (responses, rewards)}); [] when either variant is missing."""
    if n <= 0 or before not in answers or after not in answers or before == after:
        return []
    (old, old_rewards), (new, new_rewards) = answers[before], answers[after]
    return [{"prompt": _prompt_line(prompts[i]),
             f"{before} answer": _cut(old[i]), f"{before} reward": round(old_rewards[i], 3),
             f"{after} answer": _cut(new[i]), f"{after} reward": round(new_rewards[i], 3)}
            for i in range(min(n, len(prompts)))]
