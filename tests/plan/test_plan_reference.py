"""`rrhf-lite plan` and the DPO family's reference: a frozen copy's weights in full fine-tuning,
no second model with LoRA (the adapter disabled), nothing for rrhf and pro."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_lite.cli import main
from rrhf_lite.config.recipe import load_recipe
from rrhf_lite.plan.memory_parts import GiB
from rrhf_lite.plan.recipe_memory import plan_recipe
from rrhf_lite.plan.reference_copy import POLICY_WEIGHT_PARTS, REFERENCE_PART

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama3_8b_qlora_16gb.yaml"
FULL = ["lora.enabled=false", "quantization.load_in_4bit=false"]


def _train_plan(*overrides):
    return plan_recipe(load_recipe(RECIPE, list(overrides)), 80 * GiB)["stages"]["train"]


def _parts(plan):
    return {p.name: p.bytes for p in plan.parts}


def test_full_finetuning_counts_a_frozen_copy_of_the_weights():
    with_copy = _train_plan(*FULL, "train.loss_type=pl_dpo")
    without = _train_plan(*FULL, "train.loss_type=rrhf")
    parts = _parts(with_copy)
    policy = sum(parts[name] for name in POLICY_WEIGHT_PARTS)
    assert policy > 10 * GiB  # an 8B model's 16-bit weights
    assert parts[REFERENCE_PART] == policy
    assert with_copy.allocated == pytest.approx(without.allocated + policy)
    assert REFERENCE_PART not in _parts(without)
    assert any("frozen copy" in note for note in with_copy.notes)
    assert not any("frozen copy" in note for note in without.notes)


def test_lora_reference_is_the_adapter_disabled_and_adds_no_weights():
    lora = _train_plan("train.loss_type=lipo")
    assert REFERENCE_PART not in _parts(lora)
    assert lora.allocated == pytest.approx(_train_plan().allocated)
    assert any("adapter disabled" in note for note in lora.notes)


def test_plan_command_states_the_copy(capsys):
    args = ["plan", str(RECIPE), "--gpu-memory", "80GB"]
    for item in (*FULL, "train.loss_type=dpo_pairs"):
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert REFERENCE_PART in out and "a frozen copy of the initial model" in out
