"""Reruns that notice changed inputs (issue 27 item 5): each stage records what it read; a rerun
keeps a stage whose inputs are unchanged and redoes one whose inputs changed, with everything
that reads what it rewrote, and says why in one line per stage.

One small run (sample, score, 1 training step, evaluate) is made once per module on a tiny
random model; each test copies it, with its data files, and reruns the copy in its own working
directory (the recipe's paths are relative, so the copies hold the same recipe)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from rrhf_lite.cli import main
from rrhf_lite.pipeline.reruns import key_changes, record_changes, short
from rrhf_lite.pipeline.stage_inputs import recipe_values
from rrhf_lite.utils.digest import content_digest, stat_digest

REWARD = """def reward(prompts, responses):
    return [sum(map(ord, r)) % 7 / 7 for r in responses]


def shortest(prompts, responses):
    return [-float(len(r)) for r in responses]
"""


def _recipe(model_dir, **changes) -> dict:
    recipe = {
        "name": "edits", "output_dir": "run", "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "stages": ["sample", "score", "train", "evaluate", "merge"],
        "quantization": {"load_in_4bit": False},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"prompts": "prompts.jsonl", "eval_prompts": "eval.jsonl"},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": 2}],
                     "max_new_tokens": 3, "include_dataset_responses": False},
        "scoring": {"reward_function": "my_reward.py:reward"},
        "train": {"max_steps": 1, "gradient_checkpointing": False, "logprob_backend": "torch",
                  "max_length": 64, "max_prompt_length": 32, "gradient_accumulation_steps": 1,
                  "warmup_ratio": 0.0, "learning_rate": 1e-4, "allow_sft_only": True},
        "evaluate": {"max_new_tokens": 3, "plots": False, "examples": 1},
        "merge": {"torch_dtype": "float32", "roundtrip_nf4": False},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = recipe
        for part in parents:
            node = node[part]
        node[last] = value
    return recipe


def _write_recipe(root: Path, model_dir, **changes) -> Path:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(model_dir, **changes)), encoding="utf-8")
    return path


def _forget_reward_module() -> None:
    """Each CLI command is a new process; in-process, forget the imported reward file as a new
    process would (its module is cached by path)."""
    for name in [n for n in sys.modules if n.startswith("_rrhf_reward_my_reward")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_lm_dir):
    """A directory with the data files, the recipe and its finished run."""
    root = tmp_path_factory.mktemp("reruns")
    (root / "prompts.jsonl").write_text('{"prompt": "sort 321="}\n{"prompt": "copy abc="}\n')
    (root / "eval.jsonl").write_text('{"prompt": "sort 21="}\n{"prompt": "copy ab="}\n')
    (root / "my_reward.py").write_text(REWARD)
    recipe = _write_recipe(root, tiny_lm_dir)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _forget_reward_module()
        assert main(["run", str(recipe)]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def rerun(finished_run, tmp_path, monkeypatch, capsys, tiny_lm_dir):
    """A copy of the finished run (file times kept); returns run(args, **recipe changes) ->
    (exit code, printed lines)."""
    root = tmp_path / "copy"
    shutil.copytree(finished_run, root)  # copy2: modification times kept
    monkeypatch.chdir(root)

    def run(*args, **changes) -> tuple[int, str]:
        recipe = _write_recipe(root, tiny_lm_dir, **changes)
        _forget_reward_module()
        capsys.readouterr()
        code = main([*(args or ["run"]), str(recipe)])
        out, err = capsys.readouterr()
        return code, out + err

    run.root = root
    return run


def _bytes(root: Path) -> dict[str, bytes]:
    names = ("round-1/candidates.jsonl", "round-1/scored.jsonl",
             "round-1/train/adapter/adapter_model.safetensors", "eval/initial.entry.json",
             "eval/rrhf.entry.json")
    return {name: (root / "run" / name).read_bytes() for name in names}


def _perplexity(root: Path, variant: str) -> float:
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return metrics["metrics"]["variants"][variant]["perplexity"]


# ------------------------------------------------------------------------------ reruns


def test_an_unchanged_rerun_skips_every_stage(rerun):
    before = _bytes(rerun.root)
    code, out = rerun()
    assert code == 0, out
    for stage in ("sample", "score", "train"):
        assert f"round 1: {stage} skipped" in out, out
    assert "evaluate: initial skipped" in out and "evaluate: rrhf skipped" in out, out
    assert "merge skipped" in out, out
    assert "reruns" not in out and "removing" not in out, out
    assert _bytes(rerun.root) == before


def test_edited_prompts_rerun_sample_and_what_reads_it(rerun):
    before = _bytes(rerun.root)
    initial_perplexity = _perplexity(rerun.root, "initial")
    (rerun.root / "prompts.jsonl").write_text('{"prompt": "sort 4321="}\n{"prompt": "copy xy="}\n')
    code, out = rerun()
    assert code == 0, out
    assert "round 1: sample reruns: data.prompts (file content) changed" in out, out
    assert "round 1: score reruns: round-1/candidates.jsonl changed" in out, out
    assert "round 1: train reruns: round-1/scored.jsonl changed" in out, out
    assert "round 1: train: removing run/round-1/train" in out, out
    assert "evaluate: rrhf reruns: round-1/train/adapter changed" in out, out
    # the initial model's evaluation reads no training prompt: kept, and its numbers with it
    assert "evaluate: initial skipped" in out, out
    after = _bytes(rerun.root)
    assert after["eval/initial.entry.json"] == before["eval/initial.entry.json"]
    for name in ("round-1/candidates.jsonl", "round-1/scored.jsonl", "eval/rrhf.entry.json"):
        assert after[name] != before[name], name
    assert "sort 4321=" in after["round-1/candidates.jsonl"].decode()
    assert _perplexity(rerun.root, "initial") == pytest.approx(initial_perplexity)


def test_a_changed_reward_keeps_the_candidates_and_reruns_from_score(rerun):
    before = _bytes(rerun.root)
    reward = rerun.root / "my_reward.py"
    reward.write_text(REWARD.replace("% 7 / 7", "% 5 / 5", 1))
    code, out = rerun()
    assert code == 0, out
    assert "round 1: sample skipped" in out, out
    assert "round 1: score reruns: scoring.reward_function (its module's source) changed" in out
    assert "round 1: train reruns: round-1/scored.jsonl changed" in out, out
    assert "evaluate reruns: scoring.reward_function (its module's source) changed" in out, out
    assert "merge reruns: round-1/train/adapter changed" in out, out
    after = _bytes(rerun.root)
    assert after["round-1/candidates.jsonl"] == before["round-1/candidates.jsonl"]
    assert after["round-1/scored.jsonl"] != before["round-1/scored.jsonl"]

    # the key alone (another function of the same file): the same stages, the key named
    code, out = rerun(scoring__reward_function="my_reward.py:shortest")
    assert code == 0, out
    assert "round 1: sample skipped" in out, out
    key = 'scoring.reward_function: "my_reward.py:reward" -> "my_reward.py:shortest"'
    assert f"round 1: score reruns: {key}" in out and f"evaluate reruns: {key}" in out, out
    assert "round 1: train reruns: round-1/scored.jsonl changed" in out, out


def test_changed_eval_prompts_rerun_only_evaluation(rerun):
    before = _bytes(rerun.root)
    (rerun.root / "eval.jsonl").write_text('{"prompt": "sort 312="}\n{"prompt": "copy ba="}\n')
    code, out = rerun()
    assert code == 0, out
    for stage in ("sample", "score", "train"):
        assert f"round 1: {stage} skipped" in out, out
    assert "evaluate reruns: data.eval_prompts (file content) changed" in out, out
    assert "evaluate: removing run/eval" in out, out
    after = _bytes(rerun.root)
    for name in ("round-1/candidates.jsonl", "round-1/scored.jsonl",
                 "round-1/train/adapter/adapter_model.safetensors"):
        assert after[name] == before[name], name
    assert after["eval/initial.entry.json"] != before["eval/initial.entry.json"]
    assert "sort 312=" in (rerun.root / "run" / "eval" / "initial.held_out.jsonl").read_text()


# ------------------------------------------------------------------ recipe changes, --force


def test_an_edited_recipe_names_the_key_and_reruns_only_what_reads_it(rerun):
    code, out = rerun(train__learning_rate=2e-4)
    assert code == 0, out
    assert "the recipe changed since the last run in run: train.learning_rate: 0.0001 -> 0.0002" \
        in out, out
    assert "round 1: sample skipped" in out and "round 1: score skipped" in out, out
    assert "round 1: train reruns: train.learning_rate: 0.0001 -> 0.0002" in out, out
    # a key only training reads, changed again; `evaluate` alone does not retrain: it warns
    code, out = rerun("evaluate", train__learning_rate=3e-4)
    assert code == 0, out
    assert "warning: round 1: train is out of date (train.learning_rate: 0.0002 -> 0.0003)" \
        in out, out


def test_another_experiment_is_refused_naming_its_keys_and_force_keeps_what_is_valid(rerun):
    before = _bytes(rerun.root)
    code, out = rerun(name="other", seed=1)
    assert code == 2, out
    assert "different recipe" in out and 'name: "edits" -> "other"' in out, out
    assert "seed: 0 -> 1" in out and "--force" in out, out
    assert _bytes(rerun.root) == before

    code, out = rerun("run", "--force", name="other", train__learning_rate=2e-4)
    assert code == 0, out
    assert "round 1: sample skipped" in out and "round 1: score skipped" in out, out
    assert "round 1: train reruns: train.learning_rate: 0.0001 -> 0.0002" in out, out
    removed = [line.removeprefix("[rrhf-lite] ") for line in out.splitlines() if "removing" in line]
    assert removed == ["round 1: train: removing run/round-1/train",  # and what read its adapter
                       "evaluate: rrhf: removing run/eval/rrhf.entry.json, "
                       "run/eval/rrhf.held_out.jsonl", "merge: removing run/merged"], removed
    after = _bytes(rerun.root)
    assert after["round-1/candidates.jsonl"] == before["round-1/candidates.jsonl"]
    assert after["eval/initial.entry.json"] == before["eval/initial.entry.json"]


def test_a_run_without_records_is_kept_unless_an_input_is_newer(rerun):
    """Outputs an older rrhf-lite wrote (no records): kept while the recipe keys match and no
    input file is newer; then recorded."""
    run_dir = rerun.root / "run"
    records = [*run_dir.rglob("*.inputs.json"), run_dir / "eval" / "inputs.json"]
    assert len(records) == 7, records  # sample, score, train; evaluate, initial, rrhf; merge
    for path in records:
        path.unlink()
    code, out = rerun()
    assert code == 0, out
    assert out.count("(no record of its inputs: kept") == 7, out
    assert "reruns" not in out, out
    assert all(path.exists() for path in records)

    for path in records:
        path.unlink()
    prompts = rerun.root / "prompts.jsonl"
    prompts.write_text(prompts.read_text().replace("321", "4321"))
    code, out = rerun()
    assert code == 0, out
    assert "round 1: sample reruns: prompts.jsonl is newer than candidates.jsonl" in out, out
    assert "round 1: score reruns: run/round-1/candidates.jsonl is newer than scored.jsonl" in out


# ------------------------------------------------------------------------------ the parts


def test_changed_values_are_named_and_shortened():
    assert key_changes({"a": 1, "b": "x"}, {"a": 2, "c": True}) == [
        "a: 1 -> 2", 'b: "x" -> (absent)', "c: (absent) -> true"]
    assert short("y" * 100).endswith('..."'[:-1]) and len(short("y" * 100)) == 40
    old = {"recipe": {"k": 1}, "content": {"f": "sha256:1", "gone": "sha256:2", "kept": "s"}}
    new = {"recipe": {"k": 1}, "content": {"f": "sha256:3", "kept": None, "new": "sha256:4"}}
    assert record_changes(old, new) == ["f changed", "gone: no longer read", "new: now read"]


def test_recipe_values_flatten_lists_and_ablations(tiny_lm_dir):
    from rrhf_lite.config.recipe import parse_recipe

    recipe = parse_recipe({**_recipe(tiny_lm_dir),
                           "ablations": [{"name": "no_rank", "train": {"rank_weight": 0.0}}]})
    values = recipe_values(recipe, ("sampling", "ablations.no_rank", "train"))
    assert values["sampling.generators.0.method"] == "top_p"
    assert values["ablations.no_rank.train.rank_weight"] == 0.0
    assert "train.learning_rate" in values and "train.logging_steps" not in values  # bookkeeping


def test_fingerprints_see_bytes_or_file_times(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"12")
    (folder / ".w.bin.tmp").write_bytes(b"partial")  # an atomic write's temporary: not content
    first, stat = content_digest(folder), stat_digest(folder)
    (folder / ".w.bin.tmp").unlink()
    assert content_digest(folder) == first and stat_digest(folder) == stat
    (folder / "w.bin").write_bytes(b"13")
    assert content_digest(folder) != first
    os.utime(folder / "w.bin", ns=(1, 1))
    assert stat_digest(folder) != stat
    assert content_digest(tmp_path / "missing") is None


def _train_output(tmp_path) -> tuple:
    from rrhf_lite.pipeline.reruns import StageOutput

    train = tmp_path / "round-1" / "train"
    (train / "checkpoint-1").mkdir(parents=True)
    (train / "checkpoint-1" / "trainer_state.json").write_text("{}")
    return StageOutput("round 1: train", train / "adapter", tmp_path / "train.inputs.json",
                       (train,)), train


def test_a_killed_stages_partial_work_resumes_only_under_the_same_recipe(tmp_path, tiny_lm_dir,
                                                                         capsys):
    """Checkpoints without a record (the command was killed before the stage finished) are
    resumed when the recipe.yaml they were made under reads the same; else cleared."""
    from rrhf_lite.config.recipe import parse_recipe
    from rrhf_lite.pipeline.reruns import stage_runs
    from rrhf_lite.pipeline.stage_inputs import StageInputs

    made_under = parse_recipe(_recipe(tiny_lm_dir))
    now = parse_recipe(_recipe(tiny_lm_dir, train__learning_rate=5e-4))
    out, train = _train_output(tmp_path)
    same = StageInputs(("train",), recipe_values(made_under, ("train",)))
    assert stage_runs(out, same, runs=True, earlier=made_under) is True
    assert (train / "checkpoint-1").exists()  # resumed from

    changed = StageInputs(("train",), recipe_values(now, ("train",)))
    assert stage_runs(out, changed, runs=True, earlier=made_under) is True
    said = capsys.readouterr().out
    assert "round 1: train reruns: train.learning_rate: 0.0001 -> 0.0005" in said, said
    assert f"removing {train}" in said and not train.exists()


def test_a_stage_this_command_does_not_run_is_only_warned_about(tmp_path, tiny_lm_dir, capsys):
    from rrhf_lite.config.recipe import parse_recipe
    from rrhf_lite.pipeline.reruns import stage_runs, write_record
    from rrhf_lite.pipeline.stage_inputs import StageInputs

    out, train = _train_output(tmp_path)
    (train / "adapter").mkdir()
    before = parse_recipe(_recipe(tiny_lm_dir))
    write_record(out, StageInputs(("train",), recipe_values(before, ("train",))))
    now = parse_recipe(_recipe(tiny_lm_dir, train__max_steps=2))
    assert stage_runs(out, StageInputs(("train",), recipe_values(now, ("train",))), runs=False,
                      earlier=before) is False
    said = capsys.readouterr().out
    assert "warning: round 1: train is out of date (train.max_steps: 1 -> 2)" in said, said
    assert (train / "adapter").exists()
