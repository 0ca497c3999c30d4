"""Our diverse (group) beam search: equal to transformers' beam search with one group, diverse
with several, and indifferent to batching and left padding."""

from __future__ import annotations

import pytest
import torch

from rrhf_lite.builtin.tiny import make_tiny_causal_lm
from rrhf_lite.generation.diverse_beam import diverse_beam_search

EOS, PAD = 2, 0


def sharp_model(seed: int, eos_boost: bool = False):
    """A tiny random LLaMA with peaked next-token distributions (so beams share prefixes);
    with eos_boost, EOS becomes likely after some tokens so that hypotheses finish early."""
    model = make_tiny_causal_lm(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)
        if eos_boost:
            model.lm_head.weight[EOS] = model.lm_head.weight[5:9].mean(0) * 3
    return model


def left_padded(prompts: list[list[int]]):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41], [70, 12, 33, 9]]


def with_eos(h):
    return h.tokens + ([EOS] if h.finished else [])


@pytest.mark.parametrize(
    "seed,num_beams,length_penalty", [(1, 2, 1.0), (3, 4, 1.0), (1, 3, 0.0), (3, 3, 2.0)]
)
def test_one_group_equals_transformers_beam_search(seed, num_beams, length_penalty):
    model = sharp_model(seed, eos_boost=True)
    ids, mask = left_padded(PROMPTS)
    reference = model.generate(
        input_ids=ids, attention_mask=mask, num_beams=num_beams, num_return_sequences=num_beams,
        max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        length_penalty=length_penalty, return_dict_in_generate=True, output_scores=True,
    )
    ours = diverse_beam_search(
        model, ids, mask, num_beams=num_beams, num_beam_groups=1, diversity_penalty=0.0,
        max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, length_penalty=length_penalty,
    )
    new = reference.sequences[:, ids.shape[1]:].tolist()
    for b in range(len(PROMPTS)):
        assert len(ours[b]) == num_beams
        for k in range(num_beams):
            expected = new[b * num_beams + k]
            if EOS in expected:  # transformers pads finished rows after their EOS
                expected = expected[: expected.index(EOS) + 1]
            assert with_eos(ours[b][k]) == expected
            assert ours[b][k].score == pytest.approx(
                reference.sequences_scores[b * num_beams + k].item(), abs=1e-4
            )


def test_eos_and_max_length_both_occur_and_match():
    """Guard for the test above: the EOS path and the max-length path are both exercised."""
    model = sharp_model(1, eos_boost=True)
    ids, mask = left_padded(PROMPTS)
    ours = diverse_beam_search(model, ids, mask, num_beams=4, max_new_tokens=10,
                               eos_token_id=EOS, pad_token_id=PAD)
    hyps = [h for row in ours for h in row]
    assert any(h.finished for h in hyps) and any(not h.finished for h in hyps)
    for h in hyps:
        assert EOS not in h.tokens and PAD not in h.tokens
        assert len(h.tokens) <= 10 and (h.finished or len(h.tokens) == 10)
    for row in ours:
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)


def test_without_cache_gives_the_same_result():
    model = sharp_model(1, eos_boost=True)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.7, max_new_tokens=8,
                  eos_token_id=EOS, pad_token_id=PAD)
    cached = diverse_beam_search(model, ids, mask, **kwargs)
    recomputed = diverse_beam_search(model, ids, mask, use_cache=False, **kwargs)
    assert [[with_eos(h) for h in row] for row in cached] == \
        [[with_eos(h) for h in row] for row in recomputed]


def test_groups_with_penalty_are_distinct_where_plain_beams_share_prefixes():
    model = sharp_model(0)
    ids, mask = left_padded([PROMPTS[0]])
    plain = diverse_beam_search(model, ids, mask, num_beams=4, max_new_tokens=8,
                                eos_token_id=EOS, pad_token_id=PAD)[0]
    # the premise: plain beam search spends its beams on one prefix
    assert len({tuple(h.tokens[:2]) for h in plain}) == 1
    diverse = diverse_beam_search(model, ids, mask, num_beams=4, num_beam_groups=4,
                                  diversity_penalty=100.0, max_new_tokens=8,
                                  eos_token_id=EOS, pad_token_id=PAD)[0]
    assert len(diverse) == 4
    assert len({h.tokens[0] for h in diverse}) == 4  # every group opened with its own token
    assert len({tuple(h.tokens) for h in diverse}) == 4


def test_hamming_penalty_is_applied_per_earlier_choice():
    """Two groups of one beam, one new token: group 1 picks group 0's token unless the penalty
    exceeds the log-prob gap to the runner-up."""
    model = sharp_model(0)
    ids, mask = left_padded([PROMPTS[0]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    top = log_probs.topk(2)
    assert EOS not in top.indices.tolist()
    gap = (top.values[0] - top.values[1]).item()
    first, second = top.indices.tolist()

    def run(penalty):
        hyps = diverse_beam_search(model, ids, mask, num_beams=2, num_beam_groups=2,
                                   diversity_penalty=penalty, max_new_tokens=1,
                                   eos_token_id=EOS, pad_token_id=PAD)[0]
        return sorted(h.tokens[0] for h in hyps), sorted(h.score for h in hyps)

    tokens, scores = run(gap / 2)
    assert tokens == [first, first]
    # the penalty is part of the penalised group's score
    assert scores[0] == pytest.approx(top.values[0].item() - gap / 2, abs=1e-5)
    tokens, scores = run(gap * 2)
    assert tokens == sorted([first, second])
    assert scores[0] == pytest.approx(top.values[1].item(), abs=1e-5)


def test_batch_of_different_lengths_equals_one_at_a_time():
    model = sharp_model(2, eos_boost=True)
    kwargs = dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=8,
                  eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=3)
    ids, mask = left_padded(PROMPTS)
    batched = diverse_beam_search(model, ids, mask, **kwargs)
    for b, prompt in enumerate(PROMPTS):
        single_ids, single_mask = left_padded([prompt])
        single = diverse_beam_search(model, single_ids, single_mask, **kwargs)[0]
        assert len(batched[b]) == 3
        assert [with_eos(h) for h in batched[b]] == [with_eos(h) for h in single]
        assert [h.score for h in batched[b]] == pytest.approx([h.score for h in single], abs=1e-4)


def test_bad_arguments():
    model = sharp_model(0)
    ids, mask = left_padded([PROMPTS[1]])
    with pytest.raises(ValueError, match="multiple"):
        diverse_beam_search(model, ids, mask, num_beams=4, num_beam_groups=3,
                            max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="num_return_sequences"):
        diverse_beam_search(model, ids, mask, num_beams=2, num_return_sequences=3,
                            max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
