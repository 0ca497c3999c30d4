"""`rrhf-lite validate --plan`: the size of the job from the recipe alone (nothing downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from rrhf_lite.builtin.tiny import write_rm_static_like
from rrhf_lite.cli import main
from rrhf_lite.config.recipe import load_recipe
from rrhf_lite.plan.job_size import job_plan

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "hh_paper.yaml"
ITERATED = ROOT / "recipes" / "iterated_two_rounds.yaml"


def _by_stage(plan):
    return {row["stage"]: row for row in plan["stages"]}


def test_paper_recipe_plan_names_downloads_and_counts(tmp_path, capsys):
    assert main(["validate", str(PAPER), "--plan", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the plan is YAML comments: the output stays a recipe
    assert resolved["train"]["gradient_accumulation_steps"] == 64
    assert "#   Dahoas/gptj-rm-static: raw reward checkpoint (*.pt only)" in out
    assert "#   EleutherAI/gpt-j-6B: config.json + tokenizer only (no weights)" in out
    plan = job_plan(load_recipe(PAPER))
    stages = _by_stage(plan)
    prompts = 76256  # Dahoas/rm-static's train split
    assert plan["planned_k"] == 6 and plan["prompts_per_step"] == 64
    assert stages["sample"]["prompts"] == prompts and stages["sample"]["candidates"] == 6 * prompts
    assert stages["score"]["tokens"] == 6 * prompts * 1024
    assert stages["train"]["steps"] == 3 * math.ceil(prompts / 64) == 3576
    assert stages["train"]["tokens"] == 3 * 6 * prompts * 192
    assert stages["evaluate"]["prompts"] == 500
    assert f"{3576:,}" in out


def test_sizes_follow_overrides_and_local_files(tmp_path):
    prompts = write_rm_static_like(tmp_path / "rm_static.jsonl", 10)
    recipe = load_recipe(ITERATED, [f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                                    "data.max_prompts=100", "train.gradient_accumulation_steps=4"])
    plan = job_plan(recipe)
    stages = _by_stage(plan)
    # 10 rows in the file (max_prompts 100 is only a cap); two rounds of 3 steps each
    assert stages["round 1: sample"]["prompts"] == stages["round 2: train"]["prompts"] == 10
    assert stages["round 1: train"]["steps"] == stages["round 2: train"]["steps"] == 3
    assert stages["evaluate"]["prompts"] == 10
    assert stages["merge"]["note"].endswith(f"({recipe.merge.torch_dtype})")
    merged_fp32 = job_plan(load_recipe(ITERATED, [f"data.prompts={prompts}",
                                                  f"data.eval_prompts={prompts}",
                                                  "merge.torch_dtype=float32"]))
    assert _by_stage(merged_fp32)["merge"]["note"].endswith("(float32)")
    assert [d["key"] for d in plan["downloads"]] == ["model.name_or_path", "scoring.reward_model",
                                                    "scoring.reward_base"]
    unknown = job_plan(load_recipe(ITERATED, ["data.prompts=someone/else", "data.max_prompts=null"]))
    assert _by_stage(unknown)["round 1: train"]["steps"] is None  # not known: said, not guessed


def test_given_candidates_are_counted_for_training(tmp_path):
    import json

    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"query": f"q{i}", "responses": ["a", "b"],
                                         "scores": [1, 0]}) + "\n" for i in range(10)))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "model": {"name_or_path": "some/model"}, "stages": ["train"],
        "data": {"candidates": str(cands)},
        "train": {"gradient_accumulation_steps": 4, "num_train_epochs": 2}}))
    plan = job_plan(load_recipe(recipe_file))
    assert plan["stages"] == [{"stage": "train", "prompts": 10, "candidates": None,
                               "steps": 2 * math.ceil(10 / 4), "tokens": None,
                               "note": plan["stages"][0]["note"]}]
    assert plan["downloads"] == [{"name": "some/model", "key": "model.name_or_path",
                                  "what": "model: safetensors weights, config, tokenizer"}]
