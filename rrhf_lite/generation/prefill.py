"""The k samples (or beams) of a prompt start from one prefill of that prompt.

`model.generate` with num_return_sequences=k (sampling) or num_beams=n (beam search) repeats each
prompt k (n) times before its first forward, so every prompt token runs k times. Here the prompt
minus its last token runs once per prompt into a DynamicCache, whose rows are then repeated
(`reorder_cache`, row b -> rows b*k .. b*k+k-1) and handed to `generate`. Generate expands the
prompts itself in that same order (repeat_interleave), sees a cache holding all but the last
prompt token, and runs only that token at its first step. Everything after it (the logits
processors, the random draws, beam bookkeeping) is generate's own, unchanged: with the same seed
the same tokens come out, up to float rounding of the prompt's keys and values computed in a
batch of B rows instead of B*k (tests/generation/test_generation_prefill.py checks the texts are equal).

Our diverse beam search (rrhf_lite.generation.diverse_beam) already prefills once per prompt.
"""

from __future__ import annotations

import inspect

import torch


def cache_argument(model) -> str | None:
    """Name of the forward argument that takes a KV cache ("cache" in recent transformers 5
    releases, "past_key_values" in earlier ones), or None when the model takes neither."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate makes them for left-padded rows: real tokens count from 0, the
    padding before them gets 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def generate_from_one_prefill(model, batch: dict, generation_config, copies: int):
    """`model.generate(**batch, generation_config=...)`, each prompt prefilled once for its
    `copies` rows (num_return_sequences for sampling, num_beams for beam search).

    Falls back to plain generate where there is nothing to share (one copy, one-token prompts)
    or the model's forward takes no cache.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    cache_name = cache_argument(model)
    if copies < 2 or input_ids.shape[1] < 2 or cache_name is None:
        return model.generate(**batch, generation_config=generation_config)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    head_ids, head_mask = input_ids[:, :-1], attention_mask[:, :-1]
    model(input_ids=head_ids, attention_mask=head_mask, position_ids=left_padded_positions(head_mask),
          use_cache=True, logits_to_keep=1, **{cache_name: cache})
    rows = torch.arange(len(input_ids), device=input_ids.device).repeat_interleave(copies)
    cache.reorder_cache(rows)
    return model.generate(**batch, generation_config=generation_config, **{cache_name: cache})
