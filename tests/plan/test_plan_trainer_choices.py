"""The plan counts what the trainer does (issue 30): the log-prob path, prompt sharing, the
first-batch checks and QLoRA's dtypes; the 8 GB recipe's stated figures are the plan's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rrhf_lite.config.recipe import load_recipe
from rrhf_lite.plan import memory_parts
from rrhf_lite.plan.memory_parts import GiB, Regime, TrainSettings, chunk_tokens, training_parts
from rrhf_lite.plan.recipe_memory import logprob_path_for, plan_recipe, regime_for
from rrhf_lite.plan.shapes import KNOWN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
RECIPE_8GB = ROOT / "recipes" / "llama3_8b_qlora_8gb.yaml"
LLAMA3 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]


def _parts(plan):
    return {p.name: p.bytes for p in plan.parts}


def test_8gb_recipe_fits_and_states_the_plans_figures():
    recipe = load_recipe(str(RECIPE_8GB), [])
    assert recipe.train.max_length == 512 and plan_recipe(recipe, 8 * GiB)["settings"].per_prompt >= 4
    result = plan_recipe(recipe, 8 * GiB)
    train = result["stages"]["train"]
    assert train.on_card <= 7.5 * GiB
    assert all(plan.on_card <= 8 * GiB for plan in result["stages"].values() if plan.where == "card")
    header = RECIPE_8GB.read_text()
    stated = re.search(r"training step ([0-9.]+) GiB allocated, ([0-9.]+) GiB on the\s*#?\s*card", header)
    assert stated, "the header states the training step's figures"
    assert float(stated.group(1)) == round(train.allocated / GiB, 2)
    assert float(stated.group(2)) == round(train.on_card / GiB, 2)
    assert f"sampling {result['stages']['sample'].on_card / GiB:.2f} GiB" in header


def test_qlora_dtypes_halve_embeddings_and_follow_the_compute_dtype():
    s = TrainSettings(candidates=4, micro_batch=1, max_length=512)
    old = _parts(training_parts(LLAMA3, s, Regime.gpu(), "logits"))
    new = _parts(training_parts(LLAMA3, s, Regime.qlora("bf16"), "logits"))
    assert new["embeddings + head"] == old["embeddings + head"] / 2  # 16-bit, no fp32 copy
    assert "head weight, autocast copy" in old and "head weight, autocast copy" not in new
    def checkpoints(regime):
        plan = training_parts(LLAMA3, s, regime, "logits")
        return {p.name: p.bytes for p in plan.moments["last block's recompute"]}["checkpointed activations"]

    assert checkpoints(Regime.qlora("bf16")) == checkpoints(Regime.gpu()) / 2  # bf16 stream
    assert checkpoints(Regime.qlora("fp16")) == checkpoints(Regime.gpu())  # fp32 stream


def test_fp16_recipe_plans_an_fp32_residual_stream():
    recipe = load_recipe(str(RECIPE_8GB), ["train.mixed_precision=fp16"])
    assert regime_for(recipe).residual_bytes == 4
    assert regime_for(load_recipe(str(RECIPE_8GB), [])).residual_bytes == 2


def test_hidden_path_has_no_logits_and_is_the_recipes_path():
    recipe = load_recipe(str(RECIPE_8GB), [])
    assert logprob_path_for(recipe, LLAMA3)[0] == "hidden"
    assert logprob_path_for(load_recipe(str(RECIPE_8GB), ["train.logprob_path=logits"]), LLAMA3)[0] == "logits"
    s = TrainSettings(candidates=4, micro_batch=4, max_length=512)
    hidden = training_parts(LLAMA3, s, Regime.qlora(), "hidden")
    logits = training_parts(LLAMA3, s, Regime.qlora(), "logits")
    assert not any("logits" in p.name for p in hidden.parts)
    assert hidden.allocated < logits.allocated


def test_tile_budget_is_the_kernels():
    from rrhf_kernels import _hidden_tiles as tiles

    assert (memory_parts.TILE_SHARE, memory_parts.MIN_TILE, memory_parts.MAX_TILE) == (
        tiles.TILE_SHARE, tiles.MIN_TILE, tiles.MAX_TILE)
    for tokens, dtype in ((2048, torch.bfloat16), (37, torch.float32), (1, torch.bfloat16)):
        rows, cols = tiles.tile_shape(tokens, LLAMA3.vocab_size, None, None, dtype)
        wb = dtype.itemsize
        assert memory_parts.hidden_tile_bytes(tokens, LLAMA3.vocab_size, wb) >= rows * cols * (wb + 8)


def test_prompt_sharing_counts_each_prompt_once_per_chunk():
    base = dict(candidates=6, micro_batch=3, max_length=512, response_tokens=257,
                prompt_tokens=256, per_prompt=6)
    assert chunk_tokens(TrainSettings(**base)) == 3 * 512
    assert chunk_tokens(TrainSettings(**base, share_prompt=True)) == 255 + 3 * 257
    # responses as long as max_length allows: packing saves nothing in the worst case
    assert chunk_tokens(TrainSettings(**{**base, "response_tokens": None}, share_prompt=True)) == 3 * 512


def test_first_batch_checks_are_a_moment_of_the_plan():
    s = TrainSettings(candidates=4, micro_batch=1, max_length=512, prompt_tokens=256,
                      first_batch_checks=True)
    plan = training_parts(LLAMA3, s, Regime.qlora(), "hidden")
    assert "first-batch checks" in plan.notes[0]
    checks = sum(p.bytes for p in memory_parts.first_batch_checks(LLAMA3, s, Regime.qlora()))
    one_logits_buffer = 4 * 512 * LLAMA3.vocab_size * 4  # k = 4 x 512 positions, fp32
    assert 0 < checks <= 0.15 * one_logits_buffer


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_the_plans_dtypes_are_the_loaders(half):
    from rrhf_lite.models.training_loader import kbit_precision_plan

    upcast, _ = kbit_precision_plan(torch.bfloat16 if half == "bf16" else torch.float16)
    regime = Regime.qlora(half)
    assert regime.frozen_bytes == 2
    assert regime.residual_bytes == (4 if upcast else 2)
