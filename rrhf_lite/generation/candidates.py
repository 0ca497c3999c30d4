"""Candidate responses for a batch of prompts, by any method: greedy, beam, our diverse beam
search, or top-p sampling. The one entry point the sample, evaluate and generate stages call."""

from __future__ import annotations

import torch

from rrhf_lite.generation.diverse_beam import diverse_beam_search
from rrhf_lite.generation.prefill import generate_from_one_prefill
from rrhf_lite.models.inference_loader import (
    decode_new_tokens,
    encode_prompts,
    eos_token_ids,
    model_device,
)

METHODS = ("greedy", "beam", "diverse_beam", "top_p")


@torch.no_grad()
def generate_candidates(
    model,
    tokenizer,
    prompts: list,
    *,
    method: str = "greedy",
    num_candidates: int = 1,
    num_beams: int | None = None,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    max_prompt_length: int | None = None,
    length_penalty: float = 1.0,
) -> list[list[str]]:
    """Generate candidate responses for one batch of prompts.

    Args:
        model, tokenizer: from rrhf_lite.models.inference_loader.load_causal_lm (left padding, pad token set).
        prompts: strings or chat-message lists (see rrhf_lite.data.tokenization.format_prompt).
        method: "greedy" (one candidate, whatever num_candidates says), "beam" (transformers'
            beam search), "diverse_beam" (rrhf_lite.generation.diverse_beam) or "top_p" (sampling with
            temperature and nucleus top_p; top_k 0 = off). Seed torch beforehand for sampling.
        num_candidates: responses per prompt.
        num_beams: beams for beam methods (default num_candidates; at least num_candidates).
        num_beam_groups, diversity_penalty: diverse beam search only (diversity is per group).
        temperature, top_p, top_k: sampling only; beam methods rank by plain log-probs.
        max_new_tokens: the most tokens per response (its EOS included).
        max_prompt_length: longer prompts keep their last tokens.
        length_penalty: exponent of the length normalisation of beam scores.

    Returns:
        For each prompt, its responses as text (cut at the first EOS), best first for beams.
    """

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    eos = eos_token_ids(model, tokenizer)
    batch = encode_prompts(tokenizer, prompts, max_prompt_length, device=model_device(model))
    width = batch["input_ids"].shape[1]
    k = 1 if method == "greedy" else num_candidates
    beams = max(num_beams or k, k)

    if method == "diverse_beam":
        hypotheses = diverse_beam_search(
            model, batch["input_ids"], batch["attention_mask"], num_beams=beams,
            num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            length_penalty=length_penalty, num_return_sequences=k,
        )
        return [[tokenizer.decode(h.tokens, skip_special_tokens=True) for h in row]
                for row in hypotheses]

    from transformers import GenerationConfig

    settings = dict(max_new_tokens=max_new_tokens, eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id, num_return_sequences=k)
    if method == "top_p":
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        settings.update(do_sample=False, num_beams=1 if method == "greedy" else beams,
                        length_penalty=length_penalty)

    # each prompt's prefill runs once for its k samples / its beams (same tokens, see prefill)
    copies = k if method == "top_p" else (1 if method == "greedy" else beams)
    output = generate_from_one_prefill(model, batch, GenerationConfig(**settings), copies)
    texts = [decode_new_tokens(tokenizer, row[width:].tolist(), eos) for row in output]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
