"""Supervised warm-up on noisy demonstrations: the tiny world's imperfect initial policy.

A tiny LLaMA learns the tasks of `rrhf_lite.builtin.tiny.tasks` from demonstrations that are right only
part of the time. Wrong demonstrations are of two sorts:
- a habit: the same plausible mistake every time (count one too many, forget the carry, copy
  instead of reversing, drop the last character, write repeated digits once), common enough in
  the demonstrations that the policy's most likely answer often follows it;
- random slips: a wrong character, two characters swapped, one missing, the input echoed.
The result answers roughly right but not reliably, its greedy answer is often the habit, and its
samples differ in reward: the situation RRHF is made for (the reward prefers the right answer
to the habit, and sampling shows the right answer often enough to rank it higher).

The model is cached under ~/.cache/rrhf-lite/tiny-world/<hash of the settings>/ (or
$RRHF_LITE_CACHE/tiny-world/...), so a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rrhf_lite.builtin.tiny.models import make_tiny_causal_lm
from rrhf_lite.builtin.tiny.tasks import DEFAULT_TASKS, parse_prompt, sample_prompts, solve
from rrhf_lite.builtin.tiny.tokenizer import build_char_tokenizer
from rrhf_lite.utils.io import atomic_directory, write_json

# Bump when the tasks, the corruptions or the training loop change, so old caches are not reused.
WORLD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """Everything that decides the initial policy (and so its cache key)."""

    seed: int = 0
    steps: int = 1000  # about 2 CPU-minutes at batch 64
    batch_size: int = 64
    learning_rate: float = 5e-3
    # Right 40 % of the time, the habit 45 %, a random slip 15 %: the habit outweighs the right
    # answer, so greedy decoding tends to follow it while samples still show the right answer.
    p_correct: float = 0.4  # chance that a demonstration is right
    p_habit: float = 0.45  # chance that it shows the task's habitual mistake (else a random slip)
    num_demonstrations: int = 20000  # distinct training prompts the demonstrations come from
    tasks: tuple[str, ...] = DEFAULT_TASKS
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256

    def model_config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 64,
        }

    def key(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- noisy demonstrations -------------------------------------------------------------------

def corrupt(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: close to `answer`, so it still earns partial credit."""
    task, args = parse_prompt(prompt)
    if task == "count":
        return str(max(0, int(answer) + rng.choice((-1, 1))))
    alphabet = "0123456789" if task in ("sort", "add") else "abcdefghijklmnopqrstuvwxyz"
    kinds = ["wrong_char", "swap", "drop"]
    if task in ("reverse", "sort"):
        kinds.append("echo")  # the lazy mistake: hand the input back unchanged
    kind = rng.choice(kinds)
    chars = list(answer)
    if kind == "echo" and args[0] != answer:
        return args[0]
    if kind == "swap" and len(set(chars)) > 1:
        while True:
            i = rng.randrange(len(chars) - 1)
            if chars[i] != chars[i + 1]:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
                return "".join(chars)
    if kind == "drop" and len(chars) > 1:
        del chars[rng.randrange(len(chars))]
        return "".join(chars)
    i = rng.randrange(len(chars))  # wrong_char, and the fallback of the others
    chars[i] = rng.choice([c for c in alphabet if c != chars[i]])
    return "".join(chars)


def habit(prompt: str) -> str:
    """The task's habitual mistake (equal to the right answer where the habit does not bite)."""
    task, args = parse_prompt(prompt)
    answer = solve(prompt)
    if task == "count":
        return str(int(answer) + 1)
    if task == "add":  # add digit by digit and forget the carry
        a, b = args[0].zfill(2), args[1].zfill(2)
        return str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))))
    if task == "reverse":
        return args[0]
    if task == "copy":
        return answer[:-1]
    return "".join(sorted(set(answer)))  # sort: repeated digits written once


def noisy_demonstration(prompt: str, rng: random.Random, p_correct: float,
                        p_habit: float = 0.0) -> str:
    """The right answer with chance p_correct, the habit with chance p_habit, else a slip."""
    answer = solve(prompt)
    draw = rng.random()
    if draw < p_correct:
        return answer
    if draw < p_correct + p_habit:
        return habit(prompt)
    return corrupt(prompt, answer, rng)


# --- training -------------------------------------------------------------------------------

def _batch(prompts: list[str], responses: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """prompt + response + EOS, right-padded; loss on the response and EOS only, as in RRHF."""
    rows, labels = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def train_initial_policy(settings: WarmupSettings = WarmupSettings(), progress: bool = True):
    """Train and return (model, tokenizer): a tiny LLaMA fitted to noisy demonstrations."""
    tokenizer = build_char_tokenizer()
    model = make_tiny_causal_lm(seed=settings.seed, **settings.model_config())
    model.train()
    # Demonstrations come from training-side prompts only; held-out prompts stay unseen.
    pool = sample_prompts(settings.num_demonstrations, seed=settings.seed + 1000,
                          tasks=tuple(settings.tasks))
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=0.01)
    warm = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / settings.steps))
    bar = tqdm(range(settings.steps), desc="tiny world: warm-up", disable=not progress,
               mininterval=1.0)
    for _ in bar:
        prompts = [rng.choice(pool) for _ in range(settings.batch_size)]
        responses = [noisy_demonstration(p, rng, settings.p_correct, settings.p_habit)
                     for p in prompts]
        loss = model(**_batch(prompts, responses, tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval(), tokenizer


def default_cache_dir() -> Path:
    root = os.environ.get("RRHF_LITE_CACHE") or Path.home() / ".cache" / "rrhf-lite"
    return Path(root) / "tiny-world"


def build_initial_policy(cache_dir: str | Path | None = None, seed: int = 0,
                         steps: int | None = None, force: bool = False, progress: bool = True,
                         **settings) -> Path:
    """Directory of the tiny world's initial policy (safetensors + tokenizer), built once.

    `settings` overrides fields of WarmupSettings (model size, noise, ...). The directory name is
    a hash of all settings: a second call with the same settings returns the cached model
    without training; `force=True` trains again.
    """
    if steps is not None:
        settings["steps"] = steps
    config = WarmupSettings(seed=seed, **settings)
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / config.key()
    if (target / "model.safetensors").exists() and not force:
        return target
    model, tokenizer = train_initial_policy(config, progress=progress)
    # Written to a temporary sibling and renamed, so a crash never leaves a half-saved cache.
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "warmup_settings.json",
                   {"version": WORLD_VERSION, **dataclasses.asdict(config)})
    return target
