"""QLoRA without fp32 copies of frozen 16-bit weights (training_loader.prepare_4bit_for_lora).

Both CPU 4-bit paths (the cpu_4bit_path fixture). The "fp32" precision is peft's
prepare_model_for_kbit_training, the old path every comparison is against.
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
from rrhf_lite.models import training_loader
from rrhf_lite.models.training_loader import kbit_precision_plan

# bf16 / fp16 against the fp32 up-cast, after one whole step (forward, two-pass backward):
# a few units in the last place of bf16 (2**-8), relative to the gradient's norm.
LOSS_RTOL = 2**-8
GRAD_RTOL = 4 * 2**-8


def _norm_dtype(model):
    return model.base_model.model.model.norm.weight.dtype


def _load(model_dir, dtype, precision):
    model, tok = lora_model(model_dir, load_in_4bit=True, torch_dtype=dtype,
                            bnb_4bit_compute_dtype=dtype, kbit_precision=precision)
    randomise_lora_b(model)
    return model, tok


@pytest.mark.parametrize("dtype,precision,frozen,norm", [
    ("bfloat16", "auto", torch.bfloat16, torch.bfloat16),
    ("float16", "auto", torch.float16, torch.float32),
    ("bfloat16", "fp32", torch.float32, torch.float32),
    ("float32", "auto", torch.float32, torch.float32),
])
def test_frozen_weights_keep_their_load_dtype(small_lm_dir, dtype, precision, frozen, norm):
    model, _ = _load(small_lm_dir, dtype, precision)
    assert model.get_input_embeddings().weight.dtype == frozen
    assert model.get_output_embeddings().weight.dtype == frozen
    assert _norm_dtype(model) == norm
    assert not model.get_input_embeddings().weight.requires_grad
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_plan_per_compute_dtype():
    assert kbit_precision_plan(torch.bfloat16)[0] is False  # residual stream in bf16
    assert kbit_precision_plan(torch.float16)[0] is True  # fp16: norms (and stream) fp32
    assert kbit_precision_plan(torch.float32)[0] is False


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loss_and_lora_grads_within_16bit_tolerance_of_the_upcast(small_lm_dir, tmp_path, dtype,
                                                                  cpu_4bit_path, caplog, monkeypatch):
    monkeypatch.setattr(training_loader, "_logged_reasons", set())
    results = {}
    with caplog.at_level(logging.INFO, logger="rrhf_lite.models.training_loader"):
        for precision in ("fp32", "auto"):
            model, tok = _load(small_lm_dir, dtype, precision)
            trainer = weighted_trainer(model, tok, tmp_path / precision)
            results[precision] = step_grads(trainer, first_batch(trainer), 2)
            assert trainer.forward_choices["logprob_path"] == "hidden"
        _load(small_lm_dir, dtype, "auto")  # a second load does not log again
    (loss_up, grads_up), (loss, grads) = results["fp32"], results["auto"]
    assert abs(loss - loss_up) <= LOSS_RTOL * abs(loss_up)
    assert grads.keys() == grads_up.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert float((g - grads_up[name]).norm()) <= GRAD_RTOL * float(grads_up[name].norm()) + 1e-8, name
    said = [r.getMessage() for r in caplog.records if f"{dtype} compute" in r.getMessage()]
    assert len(said) == 1, said


def test_unknown_precision_is_a_user_error(small_lm_dir):
    with pytest.raises(UserInputError, match="kbit_precision"):
        lora_model(small_lm_dir, load_in_4bit=True, kbit_precision="fp8")
