"""RRHFTrainer with every loss_type: the micro-batched two-pass gradient equals the full-batch
gradient (fp32, shared prompts on and off, hidden and logits paths); the DPO family's reference is
the model with its LoRA adapter disabled, or in full fine-tuning a frozen copy of the initial
model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers.trainer_steps import (
    first_batch,
    lora_model,
    lora_params,
    randomise_lora_b,
    ranked_rows,
    rrhf_config,
    step_grads,
)

from rrhf_lite.config.recipe import parse_recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.stages.train import training_config
from rrhf_lite.training.objectives import LOSS_TYPES
from rrhf_lite.training.trainer import RRHFTrainer


def _trainer(model, tok, out, loss_type, **kw):
    # every weight away from its default, so that a wrong term shows in the loss and gradients
    settings = dict(loss_type=loss_type, beta=0.7, length_penalty=0.7, sft_weight=0.5, rank_weight=2.0)
    args = rrhf_config(out, **{**settings, **kw})
    return RRHFTrainer(model=model, args=args, train_dataset=ranked_rows(), processing_class=tok)


@pytest.mark.parametrize("share,path", [(True, "auto"), (False, "auto"), (True, "logits"), (False, "logits")],
                         ids=["shared-hidden", "unshared-hidden", "shared-logits", "unshared-logits"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "rrhf"])
def test_micro_batched_equals_full_batch_fp32(small_lm_dir, tmp_path, loss_type, share, path):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    randomise_lora_b(model)  # policy != reference, and lora_A gradients non-zero
    trainer = _trainer(model, tok, tmp_path, loss_type, share_prompt=share, logprob_path=path)
    batch = first_batch(trainer)
    n = len(batch["input_ids"])
    full_loss, full = step_grads(trainer, batch, None)
    assert trainer.forward_choices["share_prompt"] is share
    assert trainer.forward_choices["logprob_path"] == ("hidden" if path == "auto" else "logits")
    assert any(g.abs().max() > 0 for g in full.values())
    for micro in (1, 3, n - 1):
        loss, grads = step_grads(trainer, batch, micro)
        assert loss == pytest.approx(full_loss, rel=1e-6, abs=1e-7), micro
        for name, g in grads.items():
            torch.testing.assert_close(g, full[name], rtol=1e-5, atol=1e-6, msg=f"{name} micro={micro}")


def test_reference_is_the_model_with_its_adapter_disabled(small_lm_dir, tmp_path):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    randomise_lora_b(model)
    trainer = _trainer(model, tok, tmp_path, "pl_dpo", candidate_micro_batch_size=2)
    inputs = trainer._prepare_inputs(dict(first_batch(trainer)))
    chunks = trainer._chunks(len(inputs["input_ids"]))
    trainer._add_reference_sums(trainer.model, inputs, chunks)
    reference = inputs["reference_sums"]
    with torch.no_grad():
        policy, _ = trainer._chunk_sums(trainer.model, inputs, slice(None))
        assert not torch.allclose(policy, reference)  # the adapter is on outside the context
        for name, p in lora_params(trainer.model).items():
            if "lora_B" in name:
                p.zero_()  # now the adapter adds nothing: the policy is the base
        base, _ = trainer._chunk_sums(trainer.model, inputs, slice(None))
    torch.testing.assert_close(reference, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["pl_dpo", "dpo_pairs"])
def test_at_the_first_step_policy_equals_reference(small_lm_dir, tmp_path, loss_type):
    """LoRA B starts at 0, so the policy is the reference: every u_i = 0. dpo_pairs gives log 2
    per prompt; pl_dpo gives sum over positions of log(1 + |strictly worse candidates|)."""
    model, tok = lora_model(small_lm_dir, load_in_4bit=False)
    trainer = _trainer(model, tok, tmp_path, loss_type, sft_weight=0.0, rank_weight=1.0,
                       candidate_micro_batch_size=2)
    batch = first_batch(trainer)
    loss, grads = step_grads(trainer, batch, 2)
    expected = []
    for row, mask in zip(batch["rewards"].tolist(), batch["candidate_mask"].tolist(), strict=True):
        r = [x for x, m in zip(row, mask, strict=True) if m]
        if loss_type == "dpo_pairs":
            expected.append(math.log(2.0))
        else:
            expected.append(sum(math.log(1 + sum(o < x for o in r)) for x in r if any(o < x for o in r)))
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert any(g.abs().max() > 0 for g in grads.values())  # and it still learns


def test_dpo_family_trains_with_lora(small_lm_dir, tmp_path):
    model, tok = lora_model(small_lm_dir)  # 4-bit base + LoRA, a few real optimiser steps
    trainer = _trainer(model, tok, tmp_path / "lora", "dpo_pairs", max_steps=2, learning_rate=5e-2,
                       candidate_micro_batch_size=2)
    assert trainer.ref_model is None  # the reference is the adapter disabled: no second model
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss/rank" in h]
    assert logged and all(math.isfinite(h["loss/rank"]) for h in logged)
    assert logged[0]["loss/rank"] == pytest.approx(math.log(2.0), rel=1e-4)


def _full_finetune_trainer(small_lm_dir, out, **kw):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False, use_lora=False)
    return model, _trainer(model, tok, out, "pl_dpo", sft_weight=0.0, rank_weight=1.0, **kw)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_finetuning_keeps_a_frozen_copy_as_reference(small_lm_dir, tmp_path, caplog):
    """Full fine-tuning + pl_dpo trains; its reference is a frozen copy of the initial model:
    eval mode, no gradient, same dtype, its own storage; its weights never change and its sums
    stay the initial policy's while the policy moves away."""
    with caplog.at_level(logging.INFO, logger="rrhf_lite.training.trainer"):
        model, trainer = _full_finetune_trainer(small_lm_dir, tmp_path, max_steps=3,
                                                learning_rate=5e-2, candidate_micro_batch_size=2)
    said = [r.message for r in caplog.records if "frozen copy" in r.message]
    assert len(said) == 1 and "pl_dpo" in said[0]
    reference = trainer.ref_model
    assert reference is not None and not reference.training
    policy_params = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert not p.requires_grad and p.dtype == policy_params[name].dtype
        assert p.data_ptr() != policy_params[name].data_ptr()  # a copy, not the policy's tensor
    initial, frozen = _weights(model), _weights(reference)
    inputs = trainer._prepare_inputs(dict(first_batch(trainer)))
    with torch.no_grad():
        initial_sums, _ = trainer._chunk_sums(model, inputs, slice(None))
    trainer.train()
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters())  # it trained
    for name, p in reference.named_parameters():
        assert torch.equal(p, frozen[name]), name
    trainer._add_reference_sums(model, inputs, trainer._chunks(len(inputs["input_ids"])))
    with torch.no_grad():
        policy_sums, _ = trainer._chunk_sums(model, inputs, slice(None))
    torch.testing.assert_close(inputs["reference_sums"], initial_sums, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(policy_sums, initial_sums, atol=1e-3)  # the policy moved away
    logged = [h for h in trainer.state.log_history if "loss/rank" in h]
    assert logged and all(math.isfinite(h["loss/rank"]) for h in logged)


@pytest.mark.parametrize("path", ["auto", "logits"], ids=["hidden", "logits"])
def test_full_finetuning_reference_micro_batched_equals_full_batch(small_lm_dir, tmp_path, path):
    model, trainer = _full_finetune_trainer(small_lm_dir, tmp_path, logprob_path=path)
    with torch.no_grad():  # policy != reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    params = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    batch = first_batch(trainer)
    full_loss, full = step_grads(trainer, batch, None, params)
    assert trainer.forward_choices["share_prompt"] is True
    assert any(g.abs().max() > 0 for g in full.values())
    for micro in (1, 3):
        loss, grads = step_grads(trainer, batch, micro, params)
        assert loss == pytest.approx(full_loss, rel=1e-6, abs=1e-7), micro
        for name, g in grads.items():
            torch.testing.assert_close(g, full[name], rtol=1e-5, atol=1e-6, msg=f"{name} micro={micro}")
    assert not any(p.grad is not None for p in trainer.ref_model.parameters())


def test_rrhf_and_pro_need_no_reference(small_lm_dir, tmp_path):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False, use_lora=False)
    assert _trainer(model, tok, tmp_path / "pro", "pro").ref_model is None  # no second model


def _recipe(tmp_path, train=None, ablations=()):
    return parse_recipe({"model": {"name_or_path": "some/model"}, "stages": ["train"],
                         "data": {"candidates": "c.jsonl"}, "output_dir": str(tmp_path / "run"),
                         "train": train or {}, "ablations": list(ablations)})


def test_recipe_keys_reach_the_config_and_bad_values_name_the_key(tmp_path):
    recipe = _recipe(tmp_path, {"loss_type": "lipo", "beta": 0.5},
                     [{"name": "pro", "train": {"loss_type": "pro"}}])
    args = training_config(recipe, tmp_path / "out")
    assert (args.loss_type, args.beta, args.sft_weight) == ("lipo", 0.5, 0.0)  # DPO family: no SFT
    ablation = training_config(recipe, tmp_path / "o2", recipe.ablations[0].train)
    assert (ablation.loss_type, ablation.sft_weight) == ("pro", 1.0)  # PRO: SFT on
    assert _recipe(tmp_path).train.loss_type == "rrhf"
    for train, key in (({"loss_type": "simpo"}, r"train\.loss_type"), ({"beta": 0}, r"train\.beta")):
        with pytest.raises(UserInputError, match=key):
            _recipe(tmp_path, train)
    with pytest.raises(UserInputError, match="train.beta"):  # a TRL DPO ablation has dpo.beta
        _recipe(tmp_path, ablations=[{"name": "d", "method": "dpo", "train": {"beta": 0.2}}])


def _trl_dpo_step(base, tok, peft_config, lora_weights, pairs, out, beta):
    """TRL's DPOTrainer (sigmoid loss) on these pre-tokenised pairs, all in one batch, the base
    wrapped by TRL with `peft_config` and its LoRA weights then set to `lora_weights`: (loss,
    {name: grad} of the LoRA weights). Reference: the model with its adapter disabled (TRL given
    an already wrapped PeftModel would copy the adapter as a "ref" adapter instead)."""
    from datasets import Dataset
    from trl import DPOConfig

    from rrhf_lite.training.dpo_pairs import pretokenized_dpo_trainer

    args = DPOConfig(output_dir=str(out), beta=beta, loss_type=["sigmoid"], bf16=False, fp16=False,
                     per_device_train_batch_size=len(pairs), report_to="none", save_strategy="no",
                     max_length=32, disable_dropout=True, seed=0, disable_tqdm=True,
                     dataloader_pin_memory=False, activation_checkpointing=False)
    trainer = pretokenized_dpo_trainer()(model=base, args=args, train_dataset=Dataset.from_list(pairs),
                                         processing_class=tok, peft_config=peft_config)
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" adapter: reference = disabled
    params = lora_params(trainer.model)
    assert params.keys() == lora_weights.keys()
    with torch.no_grad():
        for name, value in lora_weights.items():
            params[name].copy_(value)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in lora_params(trainer.model).items()}


@pytest.mark.parametrize("loss_type", ["pl_dpo", "dpo_pairs"])
def test_k2_equals_trl_dpo_trainer(small_lm_dir, tmp_path, loss_type):
    """k = 2, same model, adapter and tokens: our loss and LoRA gradients equal TRL's DPOTrainer
    sigmoid loss (its reference: the same model with the adapter disabled), micro-batched too."""
    from rrhf_lite.training.dpo_pairs import best_worst_pairs, tokenize_pairs

    rows = [{"prompt": f"Q{i}: rate me", "responses": [good, bad], "scores": scores}
            for i, (good, bad, scores) in enumerate([("good stuff", "bad", [1.0, 0.0]),
                                                      ("bad!", "fine", [0.0, 2.0]),
                                                      ("fine", "bad", [0.5, -1.0]),
                                                      ("good", "meh", [3.0, 1.0])])]
    ours, tok = lora_model(small_lm_dir, load_in_4bit=False)
    randomise_lora_b(ours)  # away from policy == reference
    base, _ = lora_model(small_lm_dir, load_in_4bit=False, use_lora=False)
    weights = {n: p.detach().clone() for n, p in lora_params(ours).items()}
    pairs, _ = tokenize_pairs(best_worst_pairs(rows)[0], tok, max_length=32, max_prompt_length=16)
    trl_loss, trl_grads = _trl_dpo_step(base, tok, ours.peft_config["default"], weights, pairs,
                                        tmp_path / "trl", beta=0.7)
    assert abs(trl_loss - math.log(2.0)) > 1e-3  # the policy is away from the reference
    trainer = RRHFTrainer(model=ours, args=rrhf_config(tmp_path / "ours", loss_type=loss_type, beta=0.7,
                                                       per_device_train_batch_size=len(rows)),
                          train_dataset=rows, processing_class=tok)
    batch = first_batch(trainer)
    for micro in (None, 3):
        loss, grads = step_grads(trainer, batch, micro)
        assert loss == pytest.approx(trl_loss, rel=1e-5)
        assert grads.keys() == trl_grads.keys() and any(g.abs().max() > 0 for g in grads.values())
        for name, g in grads.items():
            torch.testing.assert_close(g, trl_grads[name], rtol=1e-5, atol=1e-7, msg=f"{name} micro={micro}")
