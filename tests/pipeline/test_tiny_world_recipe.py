"""The tiny-world recipe end to end with tiny overrides: the fastest whole pipeline, shrunk.

Runs the real CLI in-process on the built-in tiny world (warm-up, sample, score, 4-bit + LoRA
RRHF training, evaluate, merge) and checks the report's structure and that RRHF beat the
initial policy on the prompts it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from rrhf_lite.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Small enough for the default test run on 2 cores; training prompts are few and seen for
# several epochs, so RRHF must pull the greedy answers towards the best candidates on them.
TINY = [
    "model.builtin.steps=300",
    "rounds=1",
    "ablations=[]",
    "data.max_prompts=48",
    "data.max_eval_prompts=16",
    "evaluate.train_prompts=48",
    "train.num_train_epochs=4",
]


def test_tiny_world_recipe_end_to_end(tmp_path, tiny_world_cache, capsys):
    out = tmp_path / "run"
    args = ["run", str(ROOT / "recipes" / "tiny_world.yaml"), "--output-dir", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out

    for name in ("recipe.yaml", "report.md", "metrics.json", "training_curves.png",
                 "reward_distributions.png", "round-1/candidates.jsonl", "round-1/scored.jsonl",
                 "round-1/train/adapter/adapter_model.safetensors", "merged/config.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "metrics.json").read_text())
    variants = report["metrics"]["variants"]
    assert set(variants) == {"initial", "rrhf"}
    for entry in variants.values():
        for key in ("reward/held_out", "reward/train", "ranking/accuracy", "perplexity",
                    "win_rate/vs_reference"):
            assert key in entry
    best = report["metrics"]["best_of_n"]["reward/held_out"]
    assert 0.0 <= variants["initial"]["reward/held_out"] <= best <= 1.0
    # The claim the tiny world exists to show, on the prompts RRHF trained on.
    assert variants["rrhf"]["reward/train"] > variants["initial"]["reward/train"]
    # People read the table: it is printed and in report.md.
    assert "best-of-k" in printed and "rrhf" in printed
    assert "| variant |" in (out / "report.md").read_text()
    # The adapter records the base as training loaded it, under its builtin name; the merged
    # model's card carries the run's numbers (issue 27)
    record = json.loads((out / "round-1/train/adapter/rrhf_lite.json").read_text())
    assert record["base_model"] == "builtin:tiny-world" and record["quantization"]["load_in_4bit"]
    card = (out / "merged" / "README.md").read_text()
    assert f"| reward/train | {variants['initial']['reward/train']:.4g} | " in card

    # A second run in the same directory resumes: every stage is found and skipped.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "sample skipped" in again and "train skipped" in again

    # Ranking accuracy off (the quickstart's choice), and best-of-n too: only evaluation reruns,
    # neither metric nor its note is reported, and no held-out candidates are sampled.
    assert main([*args, "--set", "evaluate.ranking_accuracy=false",
                 "--set", "evaluate.best_of_n=false"]) == 0
    third = capsys.readouterr().out
    assert "train skipped" in third and "evaluate reruns" in third
    rerun = json.loads((out / "metrics.json").read_text())["metrics"]["variants"]
    assert all("ranking/accuracy" not in entry and "reward/held_out" in entry
               for entry in rerun.values())
    assert "ranking/accuracy" not in (out / "report.md").read_text()
    assert "best_of_n" not in json.loads((out / "metrics.json").read_text())["metrics"]
    assert not (out / "eval" / "initial_candidates.jsonl").exists()
