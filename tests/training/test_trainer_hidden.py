"""The trainer's log-probs straight from hidden states (no [N, T, V] logits) against its logits
path: same loss and gradients on a tiny LLaMA (fp32 LoRA, 4-bit base + LoRA, full fine-tuning
with tied embeddings), micro-batched or not; and the automatic fall-back to logits.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.trainer_steps import (
    first_batch,
    lora_model,
    lora_params,
    randomise_lora_b,
    step_grads,
    weighted_trainer,
)

from rrhf_lite.errors import UserInputError


def _trainer(model, tok, out, path, **kw):
    return weighted_trainer(model, tok, out, logprob_path=path, **kw)


def _compare(make, tmp_path, params_of, micros=(None, 2, 3)):
    """Build the same model twice, train one step on each path, compare loss and gradients."""
    runs = {}
    for path in ("hidden", "logits"):
        model, tok = make()
        trainer = _trainer(model, tok, tmp_path / path, path)
        batch = first_batch(trainer)
        runs[path] = [step_grads(trainer, batch, m, params_of) for m in micros]
        assert (trainer._output_head(model, batch) is None) == (path == "logits")
    for (loss_h, grads_h), (loss_l, grads_l), micro in zip(runs["hidden"], runs["logits"], micros, strict=True):
        assert loss_h == pytest.approx(loss_l, rel=1e-5), micro
        assert grads_h.keys() == grads_l.keys() and grads_h
        assert any(g.abs().max() > 0 for g in grads_h.values())
        for name, g in grads_h.items():
            torch.testing.assert_close(g, grads_l[name], rtol=1e-4, atol=1e-6, msg=f"{name} micro={micro}")


@pytest.mark.parametrize("load_in_4bit,small_tiles", [(False, False), (True, False), (False, True)],
                         ids=["fp32-lora", "nf4-lora", "fp32-lora-small-tiles"])
def test_hidden_path_same_loss_and_lora_grads_as_logits(small_lm_dir, tmp_path, load_in_4bit, small_tiles,
                                                        monkeypatch):
    if small_tiles:  # many token chunks and vocabulary tiles: pass 3 reuses pass 1's logsumexp
        import rrhf_kernels._hidden_tiles as tiles

        monkeypatch.setattr(tiles, "MIN_TILE", 64)
        monkeypatch.setattr(tiles, "MAX_TILE", 64)
        monkeypatch.setattr(tiles, "ROW_TARGET", 4)
        assert tiles.tile_shape(40, 100, None, None) == (4, 16)

    def make():
        model, tok = lora_model(small_lm_dir, load_in_4bit=load_in_4bit)
        randomise_lora_b(model)
        return model, tok

    _compare(make, tmp_path, lora_params)


def test_hidden_path_full_finetune_with_tied_embeddings(small_lm_dir, tmp_path):
    def make():
        model, tok = lora_model(small_lm_dir, load_in_4bit=False, use_lora=False)
        model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
        return model, tok

    def params(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    _compare(make, tmp_path, params, micros=(None, 2))


def test_auto_picks_hidden_path_and_says_so(small_lm_dir, tmp_path, caplog):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    trainer = _trainer(model, tok, tmp_path, "auto", max_steps=1, candidate_micro_batch_size=2)
    with caplog.at_level(logging.INFO, logger="rrhf_lite.training.trainer"):
        trainer.train()
        trainer.train()  # decided once
    said = [r.message for r in caplog.records if "candidate log-probs" in r.message]
    assert len(said) == 1 and "straight from hidden states" in said[0]
    assert trainer._head is model.get_output_embeddings()


def test_falls_back_to_logits_when_the_head_carries_lora(small_lm_dir, tmp_path, caplog):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False, lora_target_modules=["q_proj", "lm_head"])
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    trainer = _trainer(model, tok, tmp_path / "a", "auto")
    batch = trainer._prepare_inputs(first_batch(trainer))
    with caplog.at_level(logging.INFO, logger="rrhf_lite.training.trainer"):
        assert trainer._output_head(model, batch) is None
    assert any("from [N, T, V] logits" in r.message for r in caplog.records)
    strict = _trainer(model, tok, tmp_path / "b", "hidden")
    with pytest.raises(UserInputError, match="not a plain Linear"):
        strict._output_head(model, batch)


def test_falls_back_when_logits_are_post_processed(small_lm_dir, tmp_path):
    # e.g. Gemma 2's final-logit softcapping: the head alone would give other numbers
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    base = model.get_base_model()

    def softcap(module, args, kwargs, output):
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    base.register_forward_hook(softcap, with_kwargs=True)
    trainer = _trainer(model, tok, tmp_path, "auto")
    batch = trainer._prepare_inputs(first_batch(trainer))
    assert trainer._output_head(model, batch) is None


def test_hidden_path_chosen_under_bf16_mixed_precision_with_a_16bit_head(small_lm_dir):
    # QLoRA under bf16: the head stays bf16 while accelerate's wrapper returns fp32 outputs
    # (the hidden states, with the head bypassed); the check must compare, not fail on dtypes.
    # The two wrappers Accelerator.prepare_model puts on forward, without accelerate's global
    # state (another test may have set up an Accelerator without mixed precision)
    from accelerate.utils import convert_outputs_to_fp32

    from rrhf_lite.training.logprobs import choose_output_head

    model, _ = lora_model(small_lm_dir, load_in_4bit=True, torch_dtype="bfloat16",
                          bnb_4bit_compute_dtype="bfloat16")
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    ids = torch.randint(3, 60, (1, 12))
    assert model(input_ids=ids).logits.dtype == torch.float32
    head, reason = choose_output_head(model, ids, torch.ones_like(ids))
    assert head is model.get_output_embeddings() and reason is None
