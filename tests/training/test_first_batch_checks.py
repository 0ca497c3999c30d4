"""The trainer's first-batch checks (choose_output_head, the share_prompt check) cost a small
fraction of one logits buffer, and still catch what they are there to catch."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer_steps import first_batch, lora_model, weighted_trainer
from torch.utils._python_dispatch import TorchDispatchMode

from rrhf_lite.data.tokenization import IGNORE_INDEX
from rrhf_lite.training import logprobs
from rrhf_lite.training.logprobs import (
    choose_prompt_sharing,
    first_response_tokens,
    linear_output_head,
)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op makes while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        known = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                self.largest = max(self.largest, t.untyped_storage().nbytes())  # new memory only
        return out


def test_first_response_tokens_keeps_the_prompt_and_n_labels():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8, IGNORE_INDEX],
                           [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    cut_mask, cut_labels = first_response_tokens(mask, labels, tokens=2)
    assert cut_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
    assert cut_labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 5, 6] + [IGNORE_INDEX] * 3,
                                   labels[1].tolist()]


@pytest.mark.parametrize("setting", ["auto", True])
def test_checks_make_nothing_logits_sized(benchmark_module, tmp_path, setting, monkeypatch):
    """Llama 3's vocabulary: no tensor of the checks comes near one [k, R, V] logits buffer;
    the check as it was (whole candidates, logits) made one of 3/4 of it, which this would see."""
    bench = benchmark_module("first_batch_bench")
    prompt, response, k = 16, 48, 4
    trainer, batch = bench.build(prompt, response, k, setting, out_dir=tmp_path)
    inputs = trainer._prepare_inputs(dict(batch))
    logits_bytes = k * response * bench.MODEL["vocab_size"] * 4
    with _LargestTensor() as seen:
        trainer._output_head(trainer.model, inputs)
        trainer._share_prompt(trainer.model, inputs)
    assert trainer.forward_choices["logprob_path"] == "hidden"
    assert trainer.forward_choices["share_prompt"] is True
    assert seen.largest <= 0.05 * logits_bytes, seen.largest / logits_bytes
    with _LargestTensor() as old:  # the check before: whole candidates through the logits
        logprobs.packing_agrees(trainer.model, inputs["input_ids"], inputs["attention_mask"],
                                inputs["labels"], trainer._prompt_groups(inputs), tokens=10**9)
    assert old.largest >= 0.5 * logits_bytes


def _leaky_mask(monkeypatch):
    """Packed responses see each other, as with an attention that ignores custom 4-D masks."""
    import rrhf_lite.training.shared_prompt as shared

    original = shared.segment_mask

    def causal_only(segments, dtype):
        return original(torch.where(segments > 0, 1, segments), dtype)

    monkeypatch.setattr(shared, "segment_mask", causal_only)
    monkeypatch.setattr(logprobs, "use_segments", lambda config: False)  # the mask path


@pytest.mark.parametrize("through", ["hidden", "logits"])
def test_a_leak_is_still_caught_on_the_first_tokens(small_lm_dir, tmp_path, monkeypatch, through):
    model, tok = lora_model(small_lm_dir, attn_implementation="eager")
    trainer = weighted_trainer(model, tok, tmp_path)
    inputs = trainer._prepare_inputs(first_batch(trainer))
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["labels"], trainer._prompt_groups(inputs))
    head = linear_output_head(model) if through == "hidden" else None
    _leaky_mask(monkeypatch)
    share, reason = choose_prompt_sharing(model, *args, head=head)
    assert not share and "do not reproduce" in reason
    monkeypatch.undo()  # the same check passes the honest mask
    assert choose_prompt_sharing(model, *args, head=head) == (True, None)
