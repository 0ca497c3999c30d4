"""The layer above the core: one recipe drives every stage the same way (issue 14's bugs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from rrhf_lite.config.recipe import EvaluateSection, dump_recipe, parse_recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline import run as pipeline
from rrhf_lite.stages import merge as merge_stage
from rrhf_lite.stages.evaluate import pairwise_ranking_accuracy
from rrhf_lite.training.losses import rrhf_loss
from rrhf_lite.utils.io import looks_like_local_path

FP4 = {"load_in_4bit": True, "quant_type": "fp4", "double_quant": False}


class Loaded(Exception):
    """Raised by a patched loader once it has seen what it was asked to load."""


def _recipe(tmp_path, **raw):
    return parse_recipe({"model": {"name_or_path": "some/model"},
                         "output_dir": str(tmp_path / "run"), **raw})


def test_quant_type_reaches_sampling(tmp_path, tiny_lm_dir, monkeypatch):
    """quant_type: fp4 sampled (and evaluated) against an NF4 base: the policy's base must be
    the 4-bit base training used."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "sort 321="}\n')
    recipe = _recipe(tmp_path, model={"name_or_path": str(tiny_lm_dir)}, stages=["sample"],
                     data={"prompts": str(prompts)}, quantization=FP4)
    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded):
        pipeline.run_recipe(recipe)
    config = seen["quantization_config"]
    assert config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_use_double_quant is False
    assert config.bnb_4bit_compute_dtype == torch.float32  # compute_dtype auto, on a CPU


def _fake_adapters(run: Path, names: list[str]) -> dict[str, Path]:
    made = {}
    for name in names:
        path = run / name / "train" / "adapter"
        path.mkdir(parents=True)
        made[name] = path
    return made


def _merge_only(tmp_path, monkeypatch, **raw) -> dict:
    """Run the merge stage of a recipe whose adapters exist; return merge_adapter's arguments."""
    recipe = _recipe(tmp_path, stages=["train", "merge"], data={"candidates": "cands.jsonl"},
                     **raw)
    run = Path(recipe.output_dir)
    run.mkdir(exist_ok=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))  # an existing run directory
    seen = {}

    def merge_adapter(base, adapter, out, **kwargs):
        seen.update(kwargs, adapter=Path(adapter))
        return {"max_abs_diff": 0.0}

    monkeypatch.setattr(merge_stage, "merge_adapter", merge_adapter)
    monkeypatch.setattr(pipeline, "merge_adapter", merge_adapter, raising=False)
    pipeline.run_recipe(recipe, only_stages=["merge"])
    return seen


def test_merge_round_trips_with_the_recipes_4bit_settings(tmp_path, monkeypatch):
    _fake_adapters(tmp_path / "run", ["round-1"])
    seen = _merge_only(tmp_path, monkeypatch, quantization=FP4)
    assert seen["roundtrip_nf4"] is True
    assert (seen["quant_type"], seen["blocksize"], seen["double_quant"]) == ("fp4", 64, False)


def test_merge_takes_the_last_round_never_an_ablation(tmp_path, monkeypatch):
    """An ablation named rrhf_lr_high used to become the merged model (the last adapter whose
    name started with 'rrhf')."""
    run = tmp_path / "run"
    adapters = _fake_adapters(run, ["round-1", "ablations/rrhf_lr_high"])
    seen = _merge_only(tmp_path, monkeypatch,
                       ablations=[{"name": "rrhf_lr_high", "train": {"learning_rate": 1e-3}}])
    assert seen["adapter"] == adapters["round-1"]


@pytest.mark.parametrize("name", ["rrhf", "rrhf_round2", "initial", "../escape", "a/b", "",
                                  ".hidden", "best-of-n"])
def test_ablation_names_that_clash_or_escape_are_refused(tmp_path, name):
    with pytest.raises(UserInputError, match="ablations.0.name"):
        _recipe(tmp_path, stages=["train"], data={"candidates": "c.jsonl"},
                ablations=[{"name": name, "train": {"rank_weight": 0.0}}])


def test_two_ablations_with_one_name_are_refused(tmp_path):
    twice = [{"name": "lr", "train": {"learning_rate": 1e-3}}] * 2
    with pytest.raises(UserInputError, match="share a name"):
        _recipe(tmp_path, stages=["train"], data={"candidates": "c.jsonl"}, ablations=twice)


def test_ranking_accuracy_has_one_definition_a_tie_is_wrong():
    """The trainer's rank/accuracy counted a tied score as wrong, evaluate's as half right."""
    scores, rewards = [[0.5, 0.5, 0.1]], [[0.0, 1.0, 2.0]]  # pairs: (0,1) tie, (0,2), (1,2)
    evaluated = pairwise_ranking_accuracy(scores, rewards)
    assert evaluated == {"accuracy": 0.0, "pairs": 3}
    zeros = torch.zeros(1, 3)
    _, metrics = rrhf_loss(torch.tensor(scores), zeros, zeros, torch.tensor(rewards))
    assert metrics["rank/accuracy"] == evaluated["accuracy"]

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (16, 5), generator=generator).float()  # many ties
    rewards = torch.randint(0, 3, (16, 5), generator=generator).float()
    _, metrics = rrhf_loss(scores, torch.zeros(16, 5), torch.ones(16, 5), rewards)
    evaluated = pairwise_ranking_accuracy(scores.tolist(), rewards.tolist())
    assert metrics["rank/accuracy"] == pytest.approx(evaluated["accuracy"])
    assert metrics["rank/pairs"] == evaluated["pairs"]


def test_default_perplexity_model_is_the_initial_one_in_doc_and_code(tmp_path, monkeypatch):
    """The recipe said "None = the trained policy"; the code scored with the initial model."""
    from rrhf_lite.stages import evaluate
    from rrhf_lite.stages.run_context import RunState

    description = EvaluateSection.model_fields["perplexity_model"].description
    assert "initial model" in description and "trained policy" not in description
    recipe = _recipe(tmp_path, stages=["evaluate"], scoring={"reward_function": "a:b"},
                     data={"eval_prompts": "p.jsonl"})
    state = RunState(recipe, tmp_path, "the/base", ["evaluate"])
    loaded = []
    monkeypatch.setattr(evaluate, "load_causal_lm",
                        lambda name, **kwargs: (loaded.append(name), (None, None))[1])
    scored = []

    def own_scores(state, model, tokenizer, rows, **kwargs):  # -1 for "a", -2 for "b", ...
        scored.extend(rows)
        return [[-1.0 - "abcd".index(r) for r in row["responses"]] for row in rows]

    monkeypatch.setattr(evaluate, "_own_scores", own_scores)
    result = evaluate.perplexities(state, {"initial": ["a", "c"], "rrhf": ["b", "d"]}, ["p", "q"])
    assert loaded == ["the/base"] and result == {"initial": pytest.approx(math.exp(2.0)),
                                                 "rrhf": pytest.approx(math.exp(3.0))}
    # one row per prompt, the variants' answers as its candidates (a prompt runs once for all)
    assert scored == [{"prompt": "p", "responses": ["a", "b"]},
                      {"prompt": "q", "responses": ["c", "d"]}]


@pytest.mark.parametrize("name, local", [
    ("gpt2", False), ("Qwen/Qwen2-0.5B", False), ("./model", True), ("/abs/model", True),
    ("/model", True), ("~/model", True), ("runs/x/merged", True), ("data.jsonl", True),
    ("org/train.parquet", True), ("builtin:tiny-world", False),
])
def test_local_path_or_hub_name(name, local):
    assert looks_like_local_path(name) is local
