"""Recipe validation and the CLI's exit codes (no models are loaded here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rrhf_lite.cli import main
from rrhf_lite.config.recipe import Recipe, apply_overrides, load_recipe
from rrhf_lite.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "model": {"name_or_path": "some/model"},
    "stages": ["train"],
    "data": {"candidates": "cands.jsonl"},
}


def write(tmp_path, obj, name="r.yaml"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.train.length_penalty == 1.0 and recipe.quantization.load_in_4bit
    assert recipe.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"train": {"lerning_rate": 1e-4}}, "did you mean 'learning_rate'"),
        ({"modle": {}}, "did you mean 'model'"),
        ({"model": {"name_or_path": "x", "trust_remot_code": True}}, "model.trust_remot_code"),
        ({"train": {"max_length": "long"}}, "train.max_length"),
        ({"train": {"length_penalty": -1}}, "train.length_penalty"),
        ({"scoring": {"reward_function": "no_colon"}}, "module:function"),
        ({"scoring": {"reward_function": "a:b", "given": True}}, "only one of"),
        ({"stages": ["sample"]}, "needs data.prompts"),
        ({"rounds": 2}, "rounds > 1"),
        ({"ablations": [{"name": "x", "train": {"rank_weigth": 0}}]}, "did you mean 'rank_weight'"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, patch, expected):
    raw = {**MINIMAL, **patch}
    with pytest.raises(UserInputError) as info:
        load_recipe(write(tmp_path, raw))
    assert expected in str(info.value)
    assert str(tmp_path / "r.yaml") in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\ntrain: [unclosed\n")
    with pytest.raises(UserInputError, match=r"line \d+"):
        load_recipe(path)


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"train": {}}, ["train.learning_rate=1e-4", "train.resume=false", "a.b.c=[1, 2]"])
    assert raw["train"]["learning_rate"] == 1e-4 and raw["train"]["resume"] is False
    assert raw["a"]["b"]["c"] == [1, 2]
    with pytest.raises(UserInputError):
        apply_overrides({}, ["no_equals_sign"])


def test_stages_are_put_in_pipeline_order(tmp_path):
    raw = {**MINIMAL, "stages": ["train", "score"], "scoring": {"given": True}}
    assert load_recipe(write(tmp_path, raw)).stages == ["score", "train"]


def test_cli_exit_code_2_on_bad_recipe(tmp_path, capsys):
    path = write(tmp_path, {**MINIMAL, "train": {"lerning_rate": 1}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lerning_rate" in err and "learning_rate" in err and "Traceback" not in err


def test_cli_exit_code_2_on_missing_recipe(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_validate_and_set(tmp_path, capsys):
    # validate reads the named data files (an empty one is refused)
    (tmp_path / "cands.jsonl").write_text(
        json.dumps({"prompt": "Q", "responses": ["a", "b"], "scores": [1, 0]}) + "\n")
    raw = {**MINIMAL, "data": {"candidates": str(tmp_path / "cands.jsonl")},
           "output_dir": str(tmp_path / "run")}
    path = write(tmp_path, raw)
    assert main(["validate", str(path), "--set", "train.learning_rate=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["learning_rate"] == 0.5
    Recipe.model_validate(resolved)  # the printed recipe is itself valid


def test_schema_lists_every_section():
    out = subprocess.run(
        [sys.executable, "-m", "rrhf_lite.cli", "schema"], capture_output=True, text=True, check=True
    ).stdout
    schema = json.loads(out)
    for section in ("model", "quantization", "lora", "data", "sampling", "scoring", "train"):
        assert section in schema["properties"]


def test_set_reaches_into_lists():
    raw = apply_overrides({"sampling": {"generators": [{"method": "top_p"}, {}]}},
                          ["sampling.generators.1.temperature=0.5"])
    assert raw["sampling"]["generators"] == [{"method": "top_p"}, {"temperature": 0.5}]
    # a list the recipe leaves out starts as its default (one diverse-beam generator)
    base = {**MINIMAL, "stages": ["sample"], "data": {"prompts": "p.jsonl"}}
    raw = apply_overrides(dict(base), ["sampling.generators.0.temperature=0.5",
                                       "sampling.generators.1.method=top_p"])  # 1 = append
    recipe = Recipe.model_validate(raw)
    assert [(g.method, g.temperature) for g in recipe.sampling.generators] == [
        ("diverse_beam", 0.5), ("top_p", 0.8)]
    raw = apply_overrides(dict(base), ["ablations.0.name=no_rank",
                                       "ablations.0.train.rank_weight=0"])
    assert Recipe.model_validate(raw).ablations[0].train == {"rank_weight": 0.0}
    for bad, words in (("sampling.generators.3.top_p=0.9", "past its end"),
                       ("sampling.generators.first.top_p=0.9", "must be a position")):
        with pytest.raises(UserInputError, match=words) as err:
            apply_overrides(dict(base), [bad])
        assert "sampling.generators" in str(err.value) and "what to do" in str(err.value)


def test_version_and_help_lines(capsys):
    from rrhf_lite import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"rrhf-lite {__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "builtin:smollm2-135m-instruct" in capsys.readouterr().out


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ holds no YAML recipe"
    for path in recipes:
        load_recipe(path)


def test_the_example_reward_recipe_validates_and_its_reward_ranks_one_word_first(
        monkeypatch, capsys):
    """recipes/examples/synonyms.yaml: validate imports my_reward.py from the recipe's directory
    (not on sys.path) and calls it once; the function itself prefers a one-word synonym."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(ROOT)
    assert main(["validate", "recipes/examples/synonyms.yaml"]) == 0, capsys.readouterr().err
    from rrhf_lite.stages.score import import_reward_function

    reward = import_reward_function("my_reward:reward", [ROOT / "recipes" / "examples"])
    prompt = [{"role": "user", "content": 'Give me a one-word synonym for "happy".'}]
    scores = reward([prompt] * 4, ["Joyful.", "happy", "A joyful feeling", ""])
    assert scores[0] == 1.0 and scores[0] > scores[2] > scores[3] and scores[1] < scores[0]


def _sample_score_recipe(tmp_path, tiny_lm_dir, k: int) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "sort 321="}\n{"prompt": "copy abc="}\n')
    return write(tmp_path, {
        "model": {"name_or_path": str(tiny_lm_dir)},
        "output_dir": str(tmp_path / "run"),
        "stages": ["sample", "score"],
        "data": {"prompts": str(prompts)},
        "quantization": {"load_in_4bit": False},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": k}],
                     "max_new_tokens": 4, "include_dataset_responses": False},
        "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"},
    }, name=f"recipe-{k}.yaml")


def test_rerun_resumes_an_edited_recipe_reruns_another_is_refused(tmp_path, tiny_lm_dir, capsys):
    first = _sample_score_recipe(tmp_path, tiny_lm_dir, k=2)
    assert main(["run", str(first)]) == 0
    scored = tmp_path / "run" / "round-1" / "scored.jsonl"
    before = scored.read_text()
    assert main(["run", str(first)]) == 0  # same recipe: resumes, nothing redone
    assert "score skipped" in capsys.readouterr().out and scored.read_text() == before

    second = _sample_score_recipe(tmp_path, tiny_lm_dir, k=3)
    assert main(["run", str(second)]) == 0  # an edited recipe: what reads the key reruns
    out = capsys.readouterr().out
    assert "sampling.generators.0.num_candidates: 2 -> 3" in out and "score skipped" not in out
    assert "round 1: score reruns: round-1/candidates.jsonl changed" in out, out
    assert "num_candidates: 3" in (tmp_path / "run" / "recipe.yaml").read_text()

    other = yaml.safe_load(second.read_text())
    other["name"] = "another_experiment"  # another experiment's results are protected
    third = write(tmp_path, other, name="other.yaml")
    after = scored.read_text()
    assert main(["run", str(third)]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and '"rrhf" -> "another_experiment"' in err, err
    assert scored.read_text() == after


def test_round_two_waits_for_round_one_adapter(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    """Stage by stage: `sample` alone cannot sample round 2 before round 1 is trained; it says
    so instead of sampling round 2 from the base model (which would make IP-2 a relabelled
    round 1)."""
    from rrhf_lite.pipeline import rounds as pipeline_rounds

    raw = yaml.safe_load(_sample_score_recipe(tmp_path, tiny_lm_dir, k=2).read_text())
    raw.update({"rounds": 2, "stages": ["sample", "score", "train"]})
    recipe = write(tmp_path, raw, name="two-rounds.yaml")
    assert main(["sample", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "round-1" / "candidates.jsonl").exists()
    assert not (tmp_path / "run" / "round-2").exists()
    assert "round 2: not started" in out and "'train' stage" in out

    # The whole cycle, one stage per command; no command fails on round 2's missing inputs.
    run = tmp_path / "run"
    assert main(["score", str(recipe)]) == 0 and not (run / "round-2").exists()
    assert main(["train", str(recipe)]) == 0
    assert (run / "round-1" / "train" / "adapter").exists()
    assert "round 2: stopped, scored.jsonl is not there yet" in capsys.readouterr().out
    sampled_from = []
    real_sample = pipeline_rounds.sample_candidates
    monkeypatch.setattr(pipeline_rounds, "sample_candidates", lambda rows, *, generators, **kwargs: (
        sampled_from.append(generators[0].adapter),
        real_sample(rows, generators=generators, **kwargs))[1])
    for stage in ("sample", "score", "train"):
        assert main([stage, str(recipe)]) == 0
    assert (run / "round-2" / "train" / "adapter").exists()
    assert sampled_from == [str(run / "round-1" / "train" / "adapter")]  # round 2, from round 1's


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_score_stage_reads_given_candidates_in_any_format(tmp_path, fmt):
    """Responses from elsewhere (no scores), rated by the score stage: not only JSON lines."""
    import datasets

    rows = [{"prompt": "sort 321=", "responses": ["123", "321"]},
            {"prompt": "copy ab=", "chosen": "ab", "rejected": "a"}]
    path = tmp_path / f"candidates.{fmt}"
    if fmt == "parquet":
        # one schema per file: the chosen/rejected row becomes a listwise one here
        datasets.Dataset.from_list([rows[0], {"prompt": "copy ab=", "responses": ["ab", "a"]}]
                                   ).to_parquet(str(path))
    else:
        path.write_text(json.dumps(rows))
    recipe = write(tmp_path, {
        "model": {"name_or_path": "unused-for-scoring"},
        "output_dir": str(tmp_path / "run"),
        "stages": ["score"],
        "data": {"candidates": str(path)},
        "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"},
    }, name=f"score-{fmt}.yaml")
    assert main(["run", str(recipe)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "scored.jsonl").open()]
    assert [r["responses"] for r in scored] == [["123", "321"], ["ab", "a"]]
    assert scored[0]["scores"][0] == 1.0 and scored[0]["scores"][1] < 1.0
    assert scored[1]["scores"] == [1.0, 0.5]


def test_run_saved_by_an_older_version_resumes(tmp_path):
    """A key added since the run was saved is filled by its default: the same recipe, resumed;
    another name, or a saved file this version cannot read, is another recipe (refused, the
    changed keys named)."""
    from rrhf_lite.pipeline.run_dir import prepare_run_dir

    recipe = Recipe.model_validate({"output_dir": str(tmp_path / "run"),
                                    "model": {"name_or_path": "some/model"},
                                    "data": {"prompts": "some/prompts"},
                                    "scoring": {"reward_function": "some.module:reward"}})
    run_dir, previous = prepare_run_dir(recipe, force=False)
    assert previous is None
    (run_dir / "round-1").mkdir()
    (run_dir / "round-1" / "scored.jsonl").write_text("{}\n")
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    del saved["train"]["learning_rate"]  # as if saved before this key existed
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert prepare_run_dir(recipe, force=False) == (run_dir, recipe)
    assert (run_dir / "round-1" / "scored.jsonl").exists()

    renamed = recipe.model_copy(update={"name": "other", "seed": recipe.seed + 1})
    with pytest.raises(UserInputError, match=r'different recipe \(name: "rrhf" -> "other"; '
                       r"seed: 0 -> 1\)"):
        prepare_run_dir(renamed, force=False)
    saved["train"]["no_such_key"] = 1  # a file this version cannot read
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(UserInputError, match="different recipe: its recipe.yaml cannot be read"):
        prepare_run_dir(recipe, force=False)
    assert (run_dir / "round-1" / "scored.jsonl").exists()


def test_sampling_and_training_share_one_prompt_truncation(tmp_path):
    both = {**MINIMAL, "stages": ["sample", "train"], "data": {"prompts": "p.jsonl"},
            "train": {"max_prompt_length": 100}}
    recipe = load_recipe(write(tmp_path, both))
    assert recipe.sampling.max_prompt_length is None and recipe.sampling_prompt_length == 100
    same = load_recipe(write(tmp_path, {**both, "sampling": {"max_prompt_length": 100}}))
    assert same.sampling_prompt_length == 100
    with pytest.raises(UserInputError, match=r"sampling.max_prompt_length \(256\) differs from "
                       r"train.max_prompt_length \(100\)"):
        load_recipe(write(tmp_path, {**both, "sampling": {"max_prompt_length": 256}}))
    generator = {"generators": [{"method": "greedy", "max_prompt_length": 64}]}
    with pytest.raises(UserInputError, match=r"sampling.generators.0.max_prompt_length \(64\)"):
        load_recipe(write(tmp_path, {**both, "sampling": generator}))
    # sampling alone (no training to match) keeps its own
    alone = {**both, "stages": ["sample"], "sampling": {"max_prompt_length": 256}}
    assert load_recipe(write(tmp_path, alone)).sampling_prompt_length == 256
