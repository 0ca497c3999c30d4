"""Sampling and beam search from one prefill per prompt (rrhf_lite.generation.prefill) against plain
`model.generate`: the same token ids for the same seed, left padding included, while the prompt
runs once instead of k times."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from rrhf_lite.builtin.tiny import make_tiny_causal_lm
from rrhf_lite.generation.prefill import generate_from_one_prefill

PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def model():
    model = make_tiny_causal_lm(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # peaked enough that beams and samples differ visibly
    return model


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 40, 41]])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def _token_counts(model):
    """Tokens through the embedding per forward call, recorded by a hook."""
    seen: list[int] = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].numel()))
    return seen, handle


SETTINGS = {
    "top_p": (dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0, num_return_sequences=4), 4),
    "top_k_temperature": (dict(do_sample=True, temperature=0.7, top_k=20, num_return_sequences=3), 3),
    "beam": (dict(do_sample=False, num_beams=4, num_return_sequences=3), 4),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_as_plain_generate_with_one_prefill(model, name, seed):
    settings, copies = SETTINGS[name]
    config = GenerationConfig(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, **settings)
    batch = _batch()
    seen, handle = _token_counts(model)
    try:
        torch.manual_seed(seed)
        plain = model.generate(**batch, generation_config=config)
        plain_first = seen[0]
        seen.clear()
        torch.manual_seed(seed)
        shared = generate_from_one_prefill(model, batch, config, copies)
    finally:
        handle.remove()
    assert torch.equal(plain, shared)
    B, P = batch["input_ids"].shape
    assert plain_first == B * copies * P  # generate repeats every prompt before its prefill
    assert seen[0] == B * (P - 1) and seen[1] == B * copies  # once per prompt, then its last token


def test_samples_still_differ_between_copies(model):
    settings, copies = SETTINGS["top_p"]
    config = GenerationConfig(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, **settings)
    torch.manual_seed(0)
    out = generate_from_one_prefill(model, _batch(), config, copies)
    rows = out[:copies, _batch()["input_ids"].shape[1]:].tolist()
    assert len({tuple(r) for r in rows}) > 1  # k independent samples, not k copies of one


def test_nothing_to_share_is_plain_generate(model):
    config = GenerationConfig(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    one_token = {"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    for batch, copies in ((one_token, 1), (one_token, 3), (_batch(), 1)):
        assert torch.equal(generate_from_one_prefill(model, batch, config, copies),
                           model.generate(**batch, generation_config=config))
