"""The plan's block model (rrhf_lite.plan.block_memory), the reference pass of the DPO family and
the stages besides training (rrhf_lite.plan.stage_memory): every stage a recipe lists is planned,
and the 8 GB recipe fits its card in each."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_lite.cli import main
from rrhf_lite.config.recipe import load_recipe
from rrhf_lite.plan import block_memory
from rrhf_lite.plan.memory_parts import (
    REFERENCE_LOSS_TYPES,
    GiB,
    Regime,
    TrainSettings,
    chunk_layout,
    training_parts,
)
from rrhf_lite.plan.recipe_memory import plan_recipe
from rrhf_lite.plan.shapes import KNOWN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
RECIPE_8GB = ROOT / "recipes" / "llama3_8b_qlora_8gb.yaml"
LLAMA3 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]
SETTINGS = dict(candidates=6, micro_batch=2, max_length=512, response_tokens=256, prompt_tokens=256,
                per_prompt=6, share_prompt=True)


def _names(parts):
    return {p.name: p.bytes for p in parts}


def test_reference_loss_types_are_the_trainers():
    from rrhf_lite.training.objectives import REFERENCE_LOSS_TYPES as trainers

    assert REFERENCE_LOSS_TYPES == trainers


@pytest.mark.parametrize("regime,expected", [
    (Regime.qlora("bf16"), (2, 1, 2, 0)),  # CUDA autocast: peft keeps the bf16 input, 1-byte mask
    (Regime.cpu_qlora("bf16"), (4, 4, 2, 8)),  # CPU autocast: an fp32 copy, fp32 noise, bf16 copy
    (Regime.qlora("fp16"), (4, 1, 2, 4)),  # fp32 stream on CUDA: the fp32 dropout out is cast
    (Regime.cpu(), (4, 4, 4, 0)),  # fp32 on the CPU: the dropout's output itself is kept
])
def test_lora_input_dtypes_follow_peft_and_the_device(regime, expected):
    # (dropout dtype, mask, what lora_A keeps, transient) bytes per input element, q_proj's input
    dt = block_memory.dtypes_of(regime)
    assert dt.lora(regime.residual_bytes, True) == expected


def test_recompute_moment_is_downs_base_matmul_on_a_gpu_and_its_lora_branch_on_the_cpu():
    s = TrainSettings(**SETTINGS)
    layout = chunk_layout(s)
    dequant = 14336 * 4096 * 2
    gpu = block_memory.recompute_moment(LLAMA3, s, block_memory.dtypes_of(Regime.qlora()), layout)
    cpu = block_memory.recompute_moment(LLAMA3, s, block_memory.dtypes_of(Regime.cpu_qlora()), layout)
    assert gpu["recompute transients"] > dequant > 0  # the dequantised weight is among them
    assert cpu["recompute transients"] < cpu["recomputed block"]
    # the CPU's fp32 copies and dropout noise: more saved, more transient
    assert cpu["recomputed block"] > gpu["recomputed block"]


def test_dpo_family_plans_the_reference_pass_with_the_adapter_disabled():
    for loss in ("rrhf", "pro", *REFERENCE_LOSS_TYPES):
        plan = training_parts(LLAMA3, TrainSettings(**SETTINGS, loss_type=loss), Regime.qlora(), "hidden")
        reference = plan.moments.get("reference pass (adapter disabled)")
        assert (reference is not None) == (loss in REFERENCE_LOSS_TYPES), loss
        sums = [name for name, parts in plan.moments.items() if "reference log-prob sums" in _names(parts)]
        if reference is None:
            assert not sums
            continue
        pass_one = _names(plan.moments["no-grad forward (pass 1)"])
        ref = _names(reference)
        assert "LoRA weights, autocast copies" not in ref and "LoRA weights, autocast copies" in pass_one
        assert ref["forward activations (no graph)"] <= pass_one["forward activations (no graph)"]
        # the sums [N] exist from the end of the reference pass on, in every later moment
        assert "reference pass (adapter disabled)" not in sums and len(sums) >= 4
        assert _names(plan.moments["last block's recompute"])["reference log-prob sums"] == 4 * 6


def test_plan_command_says_the_reference_is_the_base_with_the_adapter_disabled(capsys):
    assert main(["plan", str(RECIPE_8GB), "--gpu-memory", "8GB", "--set", "train.loss_type=pl_dpo"]) == 0
    out = capsys.readouterr().out
    assert "reference model (pl_dpo): the base with the LoRA adapter disabled" in out
    assert main(["plan", str(RECIPE_8GB), "--gpu-memory", "8GB"]) == 0
    assert "reference model: none (rrhf needs only the policy's log-probs)" in capsys.readouterr().out


def test_every_stage_the_recipe_lists_is_planned_and_the_8gb_recipe_fits_each():
    recipe = load_recipe(str(RECIPE_8GB), [])
    result = plan_recipe(recipe, 8 * GiB)
    assert list(result["stages"]) == list(recipe.stages) == ["sample", "score", "train", "evaluate", "merge"]
    merge = result["stages"]["merge"]
    assert merge.where == "host" and merge.allocated > 14 * GiB  # the bf16 8B model, on the CPU
    for name, plan in result["stages"].items():
        if plan.where == "card":
            assert plan.on_card <= 8 * GiB, (name, plan.on_card / GiB)
    evaluate = result["stages"]["evaluate"]
    assert any("perplexity under HuggingFaceTB/SmolLM2-135M-Instruct" in note for note in evaluate.notes)


def test_evaluation_counts_the_unquantised_perplexity_model_and_the_policy_beside_the_reward():
    # the recipe's default perplexity model, the initial 8B unquantised, cannot fit 8 GB
    recipe = load_recipe(str(RECIPE_8GB), ["evaluate.perplexity_model=null"])
    evaluate = plan_recipe(recipe, 8 * GiB)["stages"]["evaluate"]
    assert evaluate.peak_phase.startswith("perplexity under meta-llama/Meta-Llama-3-8B-Instruct")
    assert evaluate.allocated > 14.9 * GiB
    # scoring answers with the 4-bit policy still loaded: both models on the card at once
    recipe = load_recipe(str(RECIPE_8GB), ["scoring.batch_size=8"])
    evaluate = plan_recipe(recipe, 8 * GiB)["stages"]["evaluate"]
    assert evaluate.peak_phase == "answers scored, the policy still loaded"
    parts = _names(evaluate.parts)
    assert "reward model weights" in parts and "4-bit weights + constants" in parts
    assert evaluate.on_card > 8 * GiB  # the reason the recipe scores in batches of 4


def test_evaluation_without_ranking_accuracy_plans_no_scoring_of_the_held_out_candidates():
    moment = "the policy's own scores of the held-out candidates"

    def moments(overrides):
        evaluate = plan_recipe(load_recipe(str(RECIPE_8GB), overrides), 8 * GiB)["stages"]["evaluate"]
        return [evaluate.peak_phase, *evaluate.notes]

    assert any(m.startswith(moment) for m in moments([]))
    assert not any(m.startswith(moment) for m in moments(["evaluate.ranking_accuracy=false"]))
    # with best-of-n off too, no held-out candidates are sampled
    sampled = "held-out candidates from the initial model"
    assert any(m.startswith(sampled) for m in moments(["evaluate.ranking_accuracy=false"]))
    assert not any(m.startswith(sampled) for m in moments(["evaluate.ranking_accuracy=false",
                                                           "evaluate.best_of_n=false"]))
