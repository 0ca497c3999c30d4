"""The tiny world's tasks: short instructions whose answers a plain rule can grade.

Every prompt names its task and ends with "=", and the answer follows with no space:

    copy kqzt=      -> kqzt
    reverse kqzt=   -> tzqk
    sort 31852=     -> 12358
    count b abbcb=  -> 3
    add 47+8=       -> 55     (understood by the reward, not drawn by default: DEFAULT_TASKS)

`reward(prompts, responses)` reads the task and its input back from the prompt text, works out
the right answer, and gives partial credit in [0, 1], so that k samples from an imperfect model
get different rewards and RRHF has something to rank. It is a plain function on purpose: read
it, copy it, replace it (a recipe points the score stage at "rrhf_lite.builtin.tiny.tasks:reward").
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import write_jsonl

TASKS = ("copy", "reverse", "sort", "add", "count")  # every task the reward understands
# The tasks drawn by default. "add" is left out: a model this small does not learn carrying in
# a CPU-minute of warm-up, and a task it cannot do at all gives RRHF nothing to rank.
DEFAULT_TASKS = ("copy", "reverse", "sort", "count")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_LETTERS = "abc"  # few letters, so the counted one shows up several times

# Parses a prompt back into (task, input). The reward must work from the text alone.
_PROMPT = re.compile(
    r"^(?:(copy|reverse) ([a-z]+)|(sort) ([0-9]+)|(add) ([0-9]+)\+([0-9]+)"
    r"|(count) ([a-z]) ([a-z]+))=$"
)


# --- the tasks ------------------------------------------------------------------------------

def _make_one(task: str, rng: random.Random) -> str:
    """One random prompt of `task` (lengths kept small: prompts <= 24 chars, answers <= 8)."""
    if task in ("copy", "reverse"):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return f"{task} {word}="
    if task == "sort":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        return f"sort {digits}="
    if task == "add":
        return f"add {rng.randint(0, 99)}+{rng.randint(0, 99)}="
    if task == "count":
        letter = rng.choice(COUNT_LETTERS)
        text = "".join(rng.choice(COUNT_LETTERS) for _ in range(rng.randint(4, 8)))
        return f"count {letter} {text}="
    raise UserInputError(f"unknown task {task!r}", hint=f"choose from {', '.join(TASKS)}")


def parse_prompt(prompt: str) -> tuple[str, tuple[str, ...]] | None:
    """(task, arguments) read back from a prompt, or None when it is not a tiny-world prompt."""
    match = _PROMPT.match(prompt.strip())
    if match is None:
        return None
    groups = [g for g in match.groups() if g is not None]
    return groups[0], tuple(groups[1:])


def solve(prompt: str) -> str:
    """The right answer to a tiny-world prompt."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise UserInputError(
            f"not a tiny-world prompt: {prompt!r}",
            hint="prompts look like 'sort 3142=' or 'add 12+7='; see rrhf_lite.builtin.tiny.tasks",
        )
    task, args = parsed
    if task == "copy":
        return args[0]
    if task == "reverse":
        return args[0][::-1]
    if task == "sort":
        return "".join(sorted(args[0]))
    if task == "add":
        return str(int(args[0]) + int(args[1]))
    return str(args[1].count(args[0]))  # count


# --- the reward -----------------------------------------------------------------------------

def _positional_credit(answer: str, response: str, align_right: bool = False) -> float:
    """Share of positions that hold the right character; extra or missing characters count
    as wrong, so a longer or shorter answer never scores 1."""
    if not response:
        return 0.0
    if align_right:  # numbers: the units digit lines up with the units digit
        answer, response = answer[::-1], response[::-1]
    hits = sum(a == b for a, b in zip(answer, response, strict=False))
    return hits / max(len(answer), len(response))


def score(prompt: str, response: str) -> float:
    """Reward in [0, 1] of one response; 0 for a prompt that is not from this world."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        return 0.0
    task = parsed[0]
    answer = solve(prompt)
    response = response.strip()
    if task == "count":
        if not response.isdigit():
            return 0.0
        # off by one earns 2/3, by two 1/3: closer counts are better answers
        return max(0.0, 1.0 - abs(int(response) - int(answer)) / 3.0)
    return _positional_credit(answer, response, align_right=(task == "add"))


def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Rule-based reward of each (prompt, response) pair, in [0, 1], with partial credit.

    copy / reverse / sort / add: share of characters in the right place (numbers aligned on
    the units digit; missing or extra characters are wrong). count: 1 if exact, minus 1/3 per
    unit off. Anything unparseable scores 0.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [score(p, r) for p, r in zip(prompts, responses, strict=True)]


# --- prompt sets ----------------------------------------------------------------------------

def is_held_out(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out part of the world (about one in five).

    Fixed by the prompt's text alone, so held-out prompts never appear in any training set
    (RRHF prompts or warm-up demonstrations), whatever the seeds and sizes.
    """
    return zlib.crc32(prompt.encode("utf-8")) % 5 == 0


def sample_prompts(n: int, seed: int, held_out: bool = False,
                   tasks: Sequence[str] = DEFAULT_TASKS) -> list[str]:
    """`n` distinct prompts from the held-out or the training part, tasks in turn."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    tries = 0
    while len(prompts) < n:
        prompt = _make_one(tasks[len(prompts) % len(tasks)], rng)
        tries += 1
        if tries > 100 * n + 1000:
            raise UserInputError(f"cannot draw {n} distinct prompts from tasks {list(tasks)}",
                                 hint="ask for fewer prompts or more tasks")
        if prompt not in seen and is_held_out(prompt) == held_out:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def make_splits(n_train: int, n_eval: int, seed: int = 0,
                tasks: Sequence[str] = DEFAULT_TASKS) -> tuple[list[str], list[str]]:
    """Training and held-out prompts, disjoint by construction and fixed by `seed`."""
    train = sample_prompts(n_train, seed=seed, held_out=False, tasks=tasks)
    held_out = sample_prompts(n_eval, seed=seed, held_out=True, tasks=tasks)
    return train, held_out


def prompt_rows(prompts: Sequence[str]) -> list[dict]:
    """JSONL rows: the prompt, its task, and the right answer as the reference."""
    return [{"prompt": p, "task": parse_prompt(p)[0], "reference": solve(p)} for p in prompts]


def write_prompt_sets(directory: str | Path, n_train: int = 200, n_eval: int = 100,
                      seed: int = 0, tasks: Sequence[str] = DEFAULT_TASKS) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl ({"prompt", "task", "reference"}) under `directory`."""
    directory = Path(directory)
    train, held_out = make_splits(n_train, n_eval, seed, tasks=tasks)
    return {
        "train": write_jsonl(directory / "train.jsonl", prompt_rows(train)),
        "eval": write_jsonl(directory / "eval.jsonl", prompt_rows(held_out)),
    }
