"""The trainer with shared-prompt packing (share_prompt) against unshared rows: the same loss and
gradients, micro-batched (two-pass gradient) or not, with gradient checkpointing, on the hidden
and logits paths, eager and sdpa, LoRA on a 4-bit base on both bitsandbytes CPU paths; and the
`auto` decision, said once.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.trainer_steps import (
    first_batch,
    lora_model,
    randomise_lora_b,
    step_grads,
    weighted_trainer,
)

from rrhf_lite.errors import UserInputError
from rrhf_lite.training.shared_prompt import segments_in_use
from rrhf_lite.training.trainer import RRHFConfig


def _trainer(model, tok, out, share, **kw):
    return weighted_trainer(model, tok, out, share_prompt=share, **kw)


def _compare(tmp_path, make, micros=(None, 2, 3), checkpointing=False, **kw):
    runs = {}
    for share in (True, False):
        model, tok = make()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        trainer = _trainer(model, tok, tmp_path / str(share), share, **kw)
        batch = first_batch(trainer)
        runs[share] = [step_grads(trainer, batch, m) for m in micros]
        assert trainer.forward_choices["share_prompt"] is share
        # plain sdpa / eager LLaMA attention: packed rows run rrhf_lite.training.segment_attention
        assert segments_in_use(model) is share
    for (loss_s, grads_s), (loss_u, grads_u), micro in zip(runs[True], runs[False], micros, strict=True):
        assert loss_s == pytest.approx(loss_u, rel=1e-5, abs=1e-6), micro
        assert grads_s.keys() == grads_u.keys() and grads_s
        assert any(g.abs().max() > 0 for g in grads_u.values())
        for name, g in grads_s.items():
            torch.testing.assert_close(g, grads_u[name], rtol=1e-4, atol=1e-5, msg=f"{name} micro={micro}")


@pytest.mark.parametrize("attn,path,checkpointing", [
    ("sdpa", "auto", False), ("eager", "auto", True), ("sdpa", "logits", True), ("eager", "logits", False),
], ids=["sdpa-hidden", "eager-hidden-ckpt", "sdpa-logits-ckpt", "eager-logits"])
def test_shared_step_equals_unshared_fp32_lora(small_lm_dir, tmp_path, attn, path, checkpointing):
    def make():
        model, tok = lora_model(small_lm_dir, load_in_4bit=False, attn_implementation=attn)
        randomise_lora_b(model)
        return model, tok

    _compare(tmp_path, make, checkpointing=checkpointing, logprob_path=path)


def test_shared_step_equals_unshared_nf4_lora(small_lm_dir, tmp_path, cpu_4bit_path):
    def make():
        model, tok = lora_model(small_lm_dir, load_in_4bit=True)
        randomise_lora_b(model)
        return model, tok

    _compare(tmp_path, make, micros=(None, 2), checkpointing=True)


def test_auto_turns_sharing_on_and_says_so_once(small_lm_dir, tmp_path, caplog):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    trainer = _trainer(model, tok, tmp_path, "auto", max_steps=1, candidate_micro_batch_size=2)
    with caplog.at_level(logging.INFO, logger="rrhf_lite.training.trainer"):
        trainer.train()
        trainer.train()  # decided once
    said = [r.message for r in caplog.records if "prompt" in r.message and "share_prompt" in r.message]
    assert len(said) == 1 and "runs once" in said[0] and "unmasked parts only" in said[0]
    assert trainer.forward_choices["share_prompt"] is True


def test_auto_off_with_the_reason_and_true_refuses(small_lm_dir, tmp_path, caplog):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    model.config._attn_implementation = "flash_attention_2"  # decided without running it
    trainer = _trainer(model, tok, tmp_path / "a", "auto")
    batch = trainer._prepare_inputs(first_batch(trainer))
    with caplog.at_level(logging.INFO, logger="rrhf_lite.training.trainer"):
        assert trainer._share_prompt(model, batch) is False
    assert any("share_prompt off" in r.message and "flash_attention_2" in r.message for r in caplog.records)
    strict = _trainer(model, tok, tmp_path / "b", True)
    with pytest.raises(UserInputError, match="share_prompt true is not possible"):
        strict._share_prompt(model, batch)
    off = _trainer(model, tok, tmp_path / "c", False)
    assert off._share_prompt(model, batch) is False


def test_config_accepts_auto_true_false_only(tmp_path):
    assert RRHFConfig(output_dir=str(tmp_path)).share_prompt == "auto"
    assert RRHFConfig(output_dir=str(tmp_path), share_prompt="false").share_prompt is False
    with pytest.raises(UserInputError, match="share_prompt"):
        RRHFConfig(output_dir=str(tmp_path), share_prompt="yes")


def test_recipe_key_reaches_the_config(tmp_path):
    from pydantic import ValidationError

    from rrhf_lite.config.sections import TrainSection

    assert TrainSection().share_prompt == "auto"
    assert TrainSection(share_prompt=False).share_prompt is False
    with pytest.raises(ValidationError, match="share_prompt"):
        TrainSection(share_prompt="sometimes")
    fields = TrainSection(share_prompt=False).model_dump(include={"share_prompt"})
    assert RRHFConfig(output_dir=str(tmp_path), **fields).share_prompt is False
