"""Measure a policy in the tiny world: greedy reward, best-of-k, and how spread-out samples are.

Used to check that the initial policy leaves RRHF something to learn (greedy clearly below
best-of-k, candidates that differ in reward) and, in benchmarks, to compare policies.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from rrhf_lite.builtin.tiny.tasks import reward

MAX_NEW_TOKENS = 12  # the longest tiny-world answer is 6 characters, plus EOS


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], num_return_sequences: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """Responses for each prompt (list of `num_return_sequences` strings per prompt)."""
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                      "top_k": 0} if do_sample else {"do_sample": False}
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS,
                                 num_return_sequences=num_return_sequences,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append(texts[i * num_return_sequences:(i + 1) * num_return_sequences])
    finally:
        tokenizer.padding_side = side
    return out


def measure_policy(model, tokenizer, prompts: Sequence[str], k: int = 8,
                   temperature: float = 1.0, top_p: float = 0.95, seed: int = 0) -> dict:
    """Greedy reward, mean sampled reward, best-of-k, and the share of prompts whose k samples
    do not all tie (a tie gives RRHF's rank loss nothing)."""
    greedy = [r[0] for r in generate(model, tokenizer, prompts)]
    greedy_rewards = reward(prompts, greedy)
    samples = generate(model, tokenizer, prompts, num_return_sequences=k, do_sample=True,
                       temperature=temperature, top_p=top_p, seed=seed)
    sample_rewards = [reward([p] * k, s) for p, s in zip(prompts, samples, strict=True)]
    return {
        "greedy_reward": statistics.fmean(greedy_rewards),
        "greedy_exact": statistics.fmean(r == 1.0 for r in greedy_rewards),
        "sample_reward": statistics.fmean(statistics.fmean(r) for r in sample_rewards),
        "best_of_k_reward": statistics.fmean(max(r) for r in sample_rewards),
        "non_tied_fraction": statistics.fmean(len(set(r)) > 1 for r in sample_rewards),
        "k": k,
        "num_prompts": len(prompts),
    }
