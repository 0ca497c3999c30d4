"""Shared-prompt packing (rrhf_lite.training.shared_prompt) against today's unshared rows: the same
per-candidate log-prob sums and gradients (<= 1e-5, fp32) with eager and sdpa attention, on the
logits and hidden-state paths, for variable k, one-token and truncated responses, padding, and a
prompt's candidates split across chunks; the mask itself against its definition.
"""

from __future__ import annotations

import pytest
import torch

from rrhf_lite.builtin.tiny import make_tiny_causal_lm
from rrhf_lite.data.tokenization import IGNORE_INDEX, RRHFCollator
from rrhf_lite.training.logprobs import (
    choose_prompt_sharing,
    chunk_hidden_logprobs,
    chunk_logprob_sums,
)
from rrhf_lite.training.segment_attention import use_segments
from rrhf_lite.training.shared_prompt import pack_chunk, segment_mask, segments_in_use

# the 4-D mask with eager and sdpa attention, and rrhf_lite.training.segment_attention over each
ATTENTION = ["eager", "sdpa", "segments-eager", "segments-sdpa"]


def _features():
    """Prompts of different lengths, k = 3, 1, 4, 2; one-token responses; long and short."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=g).tolist()

    return [
        {"prompt_ids": ids(7), "responses_ids": [ids(5) + [2], [2], ids(9) + [2]], "scores": [1.0, 0.0, 2.0]},
        {"prompt_ids": ids(3), "responses_ids": [ids(11)], "scores": [0.5]},
        {"prompt_ids": [1], "responses_ids": [ids(2) + [2], ids(1), [2], ids(6) + [2]],
         "scores": [3.0, 1.0, 0.0, 2.0]},
        # a truncated response: no EOS, cut to fit max_length as tokenize_example does
        {"prompt_ids": ids(12), "responses_ids": [ids(4), ids(8) + [2]], "scores": [0.0, 1.0]},
    ]


@pytest.fixture(scope="module")
def batch():
    out = RRHFCollator(0)(_features())
    out["groups"] = out["candidate_index"] // out["rewards"].shape[1]
    return out


def _model(attn: str):
    base = attn.removeprefix("segments-")
    model = make_tiny_causal_lm(seed=0, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                                attn_implementation=base)
    assert model.config._attn_implementation == base
    if attn.startswith("segments-"):
        assert use_segments(model.config) and segments_in_use(model)
    return model.float()


def _args(batch, part=slice(None)):
    return batch["input_ids"][part], batch["attention_mask"][part], batch["labels"][part]


def _sums_and_grads(model, batch, part, groups, weights):
    model.zero_grad(set_to_none=True)
    sums, counts = chunk_logprob_sums(model, *_args(batch, part), backend="torch", groups=groups)
    (weights[part] * sums).sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def _parts(n):
    # one chunk; chunks of 2 and 3 split prompts' candidates (a prompt then appears in two chunks)
    return [[slice(0, n)], [slice(i, min(i + 2, n)) for i in range(0, n, 2)],
            [slice(i, min(i + 3, n)) for i in range(0, n, 3)]]


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_sums_and_gradients_equal_unshared(attn, batch):
    model = _model(attn)
    n = len(batch["input_ids"])
    weights = torch.linspace(-1.0, 2.0, n)
    for parts in _parts(n):
        for part in parts:
            plain, plain_counts, plain_grads = _sums_and_grads(model, batch, part, None, weights)
            packed, counts, grads = _sums_and_grads(model, batch, part, batch["groups"][part], weights)
            assert torch.equal(counts, plain_counts)
            torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
            assert any(g.abs().max() > 0 for g in plain_grads.values())
            for name, g in grads.items():
                torch.testing.assert_close(g, plain_grads[name], rtol=0, atol=1e-5, msg=f"{name} {part}")


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_hidden_path_equals_unshared(attn, batch):
    model = _model(attn)
    head = model.lm_head
    n = len(batch["input_ids"])
    coef = torch.linspace(2.0, -1.0, n)
    results = {}
    for name, groups in (("plain", None), ("packed", batch["groups"])):
        sums, counts, lse = chunk_hidden_logprobs(model, head, *_args(batch), backend="torch",
                                                  return_lse=True, groups=groups)
        model.zero_grad(set_to_none=True)
        total, _, _ = chunk_hidden_logprobs(model, head, *_args(batch), backend="torch", coef=coef,
                                            lse=lse, groups=groups)
        total.backward()
        results[name] = (sums, counts, total.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    (s0, c0, t0, g0), (s1, c1, t1, g1) = results["plain"], results["packed"]
    assert torch.equal(c0, c1)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5)
    torch.testing.assert_close(t1, t0, rtol=0, atol=1e-5)
    for key, g in g1.items():
        torch.testing.assert_close(g, g0[key], rtol=0, atol=1e-5, msg=key)


def test_packing_runs_each_prompt_once(batch):
    packed = pack_chunk(*_args(batch), batch["groups"])
    features = _features()
    assert packed.input_ids.shape[0] == len(features)  # one row per prompt
    real = sum(len(f["prompt_ids"]) + sum(len(r) for r in f["responses_ids"]) for f in features)
    assert int((packed.input_ids != 0).sum()) <= real <= packed.tokens
    assert int(batch["attention_mask"].sum()) > real  # unshared repeats the prompts
    # the second response of the third prompt continues positions from the prompt's end
    row = packed.position_ids[2].tolist()
    assert row[:4] == [0, 1, 2, 3] and row[4] == 1  # prompt [1], then responses from position 1


def test_same_group_different_prompt_gets_its_own_row(batch):
    groups = torch.zeros(len(batch["input_ids"]), dtype=torch.long)  # one "prompt" for all
    packed = pack_chunk(*_args(batch), groups)
    assert packed.input_ids.shape[0] == len(_features())  # split by prompt tokens anyway


def test_rows_without_labels_score_zero():
    ids = torch.tensor([[1, 5, 6, 2], [1, 5, 0, 0], [7, 8, 2, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [2], [3]])).long()
    labels = torch.tensor([[-100, -100, 6, 2], [-100, -100, -100, -100], [7, 8, 2, -100]])
    model = _model("eager")
    plain = chunk_logprob_sums(model, ids, mask, labels, backend="torch")
    packed = chunk_logprob_sums(model, ids, mask, labels, backend="torch", groups=torch.tensor([0, 0, 1]))
    assert plain[1].tolist() == packed[1].tolist() == [2, 0, 2]  # label at position 0 never counted
    torch.testing.assert_close(packed[0], plain[0], rtol=0, atol=1e-5)
    assert packed[0][1] == 0
    nothing = chunk_logprob_sums(model, ids[1:2], mask[1:2], labels[1:2], groups=torch.tensor([0]))
    assert nothing[0].tolist() == [0.0] and nothing[1].tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_segment_mask_matches_its_definition(dtype):
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1], [0, 1, 2, 3, -1, -1, -1, -1]])
    mask = segment_mask(segments, dtype)
    assert mask.shape == (2, 1, 8, 8)
    seen = mask if dtype == torch.bool else mask == 0
    for r in range(2):
        for q in range(8):
            for k in range(8):
                sq, sk = int(segments[r, q]), int(segments[r, k])
                expect = k <= q and sk != -1 and (sk == 0 or sk == sq)
                assert bool(seen[r, 0, q, k]) == expect, (r, q, k)
    assert seen[:, 0].any(dim=-1).all()  # every query, padding too, sees a key: no NaN row


def test_an_ignored_mask_would_be_caught(batch, monkeypatch):
    """Guards the tests above: responses that see each other give other sums, and the `auto`
    check notices."""
    import rrhf_lite.training.shared_prompt as shared

    model = _model("eager")
    plain, _ = chunk_logprob_sums(model, *_args(batch), backend="torch")
    original = shared.segment_mask

    def causal_only(segments, dtype):  # what an implementation ignoring the custom mask does
        return original(torch.where(segments > 0, 1, segments), dtype)

    monkeypatch.setattr("rrhf_lite.training.shared_prompt.segment_mask", causal_only)
    monkeypatch.setattr("rrhf_lite.training.logprobs.use_segments", lambda config: False)  # the mask path
    leaky, _ = chunk_logprob_sums(model, *_args(batch), backend="torch", groups=batch["groups"])
    assert (leaky - plain).abs().max() > 1e-3
    share, reason = choose_prompt_sharing(model, *_args(batch), batch["groups"])
    assert not share and "do not reproduce" in reason


def test_leaky_segments_would_be_caught_and_switched_back(batch, monkeypatch):
    import rrhf_lite.training.segment_attention as segments

    model = _model("sdpa")
    plain, _ = chunk_logprob_sums(model, *_args(batch), backend="torch")
    original = segments.segment_attention

    def leaky(module, query, key, value, layout, scaling, dropout):  # responses see each other
        see_all = torch.ones_like(layout.response_mask[:, :, :, :layout.prompt_width])
        wide = layout.response_mask.clone()
        wide[:, :, :, :layout.prompt_width] = see_all
        wide[:, :, :, layout.prompt_width:] = True
        return original(module, query, key, value, type(layout)(**{**vars(layout), "response_mask": wide}),
                        scaling, dropout)

    monkeypatch.setattr(segments, "segment_attention", leaky)
    share, reason = choose_prompt_sharing(model, *_args(batch), batch["groups"])
    assert not share and "do not reproduce" in reason
    assert model.config._attn_implementation == "sdpa"  # switched back
    monkeypatch.setattr(segments, "segment_attention", original)
    assert choose_prompt_sharing(model, *_args(batch), batch["groups"]) == (True, None)
    assert segments_in_use(model)
    again, _ = chunk_logprob_sums(model, *_args(batch), backend="torch")  # unpacked: the base
    assert torch.equal(again, plain)


def test_auto_decision(batch):
    model = _model("sdpa")
    assert choose_prompt_sharing(model, *_args(batch), batch["groups"]) == (True, None)
    assert choose_prompt_sharing(model, *_args(batch), batch["groups"], False) == (False, "share_prompt is false")
    model.config._attn_implementation = "flash_attention_2"
    share, reason = choose_prompt_sharing(model, *_args(batch), batch["groups"])
    assert not share and "flash_attention_2" in reason and "ignores" in reason


def test_labels_after_packing_are_the_responses(batch):
    packed = pack_chunk(*_args(batch), batch["groups"])
    flat_labels = [[t for t in row if t != IGNORE_INDEX] for row in packed.labels.tolist()]
    expected = [[t for t in row if t != IGNORE_INDEX] for row in batch["labels"].tolist()]
    assert [flat_labels[i] for i in packed.scored.argsort().tolist()] == expected
