"""Bad input through the real CLI entry point: exit code 2, a message naming the file and line
(or the recipe key) and what to do, no traceback, and nothing written or overwritten.

Each table row is one mistake a user makes. The recipe trains (`stages: [train]`) on the tiny
model from `data.candidates`, so a data error must surface before any model is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.recipes import train_recipe

from rrhf_lite.cli import main

GOOD = {"prompt": "Q: hi", "responses": ["good answer", "bad"], "scores": [1.0, 0.0]}
GOOD_LINE = json.dumps(GOOD)


# ------------------------------------------------------------------------------------ helpers


def _recipe(tmp_path: Path, model_dir, candidates, name="recipe.yaml", **sections) -> Path:
    """A train-only recipe on the tiny model, writing its run to tmp_path / "run"."""
    return train_recipe(tmp_path / name, model_dir, candidates, tmp_path / "run", **sections)


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed earlier
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code: int, err: str, *names: str) -> None:
    """Exit 2, each of `names` in the message, a 'what to do' line, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert "rrhf-lite: error:" in err, err
    assert "what to do:" in err, f"the message does not say what to do:\n{err}"
    for name in names:
        assert name in err, f"{name!r} not named in:\n{err}"


def _no_results(run_dir: Path) -> None:
    """No stage wrote anything: the run directory is absent or holds only the recipe copy."""
    if run_dir.exists():
        assert {p.name for p in run_dir.iterdir()} <= {"recipe.yaml"}, sorted(run_dir.rglob("*"))


def _lines(*items) -> str:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items)


def _row(**changes) -> dict:
    row = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


_DROP = object()

# ------------------------------------------------------------------------------ data: errors

# (id, file contents with the bad row on line 3 (line 2 is blank, so numbering must count it),
#  words the message must contain)
DATA_ERRORS = [
    ("malformed_json", '{"prompt": "a", "responses": ["x", "y"', "malformed JSON"),
    ("trailing_garbage", GOOD_LINE + " x", "malformed JSON"),
    ("not_an_object", "[1, 2, 3]", "expected a JSON object"),
    ("missing_scores", _row(scores=_DROP), 'missing field "scores"'),
    ("missing_prompt", _row(prompt=_DROP), '"prompt"'),
    ("misspelled_responses", {"prompt": "a", "respones": ["x", "y"], "scores": [1, 0]},
     "respones"),
    ("misspelled_prompt", {"promt": "a", "responses": ["x", "y"], "scores": [1, 0]}, "prompt"),
    ("rejected_missing", {"prompt": "a", "chosen": "x"}, "missing field"),
    ("prompt_is_number", _row(prompt=3), "prompt must be"),
    ("responses_is_string", _row(responses="xy"), '"responses" must be'),
    ("responses_empty", _row(responses=[], scores=[]), '"responses" must be a non-empty list'),
    ("response_is_number", _row(responses=[1, "b"]), "responses[0]"),
    ("response_is_empty", _row(responses=["", "b"]), "responses[0] is empty"),
    ("scores_is_number", _row(scores=1.0), '"scores" must be a list'),
    ("fewer_scores", _row(scores=[1.0]), "2 responses but 1 scores"),
    ("more_scores", _row(scores=[1.0, 0.0, 2.0]), "2 responses but 3 scores"),
    ("nan_score", '{"prompt": "a", "responses": ["x", "y"], "scores": [NaN, 0]}', "not finite"),
    ("inf_score", '{"prompt": "a", "responses": ["x", "y"], "scores": [0, Infinity]}', "not finite"),
    ("overflow_score", '{"prompt": "a", "responses": ["x", "y"], "scores": [1e999, 0]}',
     "not finite"),
    ("string_score", _row(scores=["1.0", 0.0]), "is not a number"),
    ("null_score", _row(scores=[None, 0.0]), "is not a number"),
    ("bool_score", _row(scores=[True, False]), "is not a number"),
    pytest.param(
        "huge_int_score", '{"prompt": "a", "responses": ["x", "y"], "scores": [1' + "0" * 400
        + ", 0]}", "scores[0]"),
    ("deeply_nested", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("no_shared_prefix", {"chosen": "abc", "rejected": "xyz"}, "share no prompt prefix"),
    ("invalid_utf8", b'{"prompt": "caf\xe9", "responses": ["x", "y"], "scores": [1, 0]}',
     "invalid UTF-8"),
]


def _params(table):
    """Table rows -> pytest params; a row may itself be a pytest.param carrying marks."""
    out = []
    for row in table:
        marks = ()
        if hasattr(row, "values"):  # a pytest.param
            row, marks = row.values, row.marks
        out.append(pytest.param(*row[1:], id=row[0], marks=marks))
    return out


@pytest.mark.parametrize("bad, words", _params(DATA_ERRORS))
def test_bad_data_row(tmp_path, tiny_lm_dir, capsys, bad, words):
    data = tmp_path / "cands.jsonl"
    head = (GOOD_LINE + "\n\n").encode()
    data.write_bytes(head + (bad if isinstance(bad, bytes) else _lines(bad).encode()))
    recipe = _recipe(tmp_path, tiny_lm_dir, data)
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, f"{data} line 3", words)
    _no_results(tmp_path / "run")


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty_file", "blank_lines"])
def test_empty_data_set(tmp_path, tiny_lm_dir, capsys, content):
    data = tmp_path / "cands.jsonl"
    data.write_text(content)
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    _assert_user_error(code, err, str(data), "empty")
    _no_results(tmp_path / "run")


def test_train_subcommand_reports_the_same_error(tmp_path, tiny_lm_dir, capsys):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD, _row(scores=[1.0])))
    code, _, err = _cli(["train", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    _assert_user_error(code, err, f"{data} line 2", "2 responses but 1 scores")
    _no_results(tmp_path / "run")


def test_score_stage_given_scores_name_the_file(tmp_path, tiny_lm_dir, capsys):
    """A NaN among given scores, caught by the score stage: the message names the file."""
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD, '{"prompt": "a", "responses": ["x", "y"], "scores": [NaN, 1]}'))
    recipe = _recipe(tmp_path, tiny_lm_dir, data, stages=["score", "train"],
                     scoring={"given": True})
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, str(data), "scores[0]")
    assert not (tmp_path / "run" / "round-1" / "scored.jsonl").exists()


@pytest.mark.parametrize(
    "content, words",
    [("{not json\n", "malformed JSON"), ('{"text": "no prompt"}\n', '"prompt"'),
     (b'{"prompt": "\xff"}\n', "invalid UTF-8")],
    ids=["malformed", "no_prompt", "invalid_utf8"],
)
def test_sample_stage_bad_prompts_file(tmp_path, tiny_lm_dir, capsys, content, words):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = _recipe(tmp_path, tiny_lm_dir, tmp_path / "unused.jsonl", stages=["sample"],
                     data={"prompts": str(prompts), "candidates": None})
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, f"{prompts} line 1", words)
    _no_results(tmp_path / "run")


# ---------------------------------------------------------------------------- data: warnings


def _warned(caplog, *words) -> str:
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for word in words:
        assert word in text, f"{word!r} not in warnings:\n{text}"
    return text


@pytest.mark.parametrize(
    "rows, sections, words",
    [
        ([{"prompt": "Q", "responses": ["only one"], "scores": [1.0]}, GOOD], {},
         ["1 of 2 rows", "k = 1"]),
        ([{"prompt": "Q", "responses": ["same", "same", "x"], "scores": [1, 0, 2]}, GOOD], {},
         ["1 of 2 rows", "duplicate responses"]),
        ([{"prompt": "Q" * 80, "responses": ["a", "b"], "scores": [1, 0]}, GOOD],
         {"train": {"max_prompt_length": 8}}, ["truncated 1 of 2 prompts"]),
    ],
    ids=["k_equals_1", "duplicate_responses", "prompt_over_max_length"],
)
def test_warnings_are_counted_and_training_runs(tmp_path, tiny_lm_dir, capsys, caplog, rows,
                                                 sections, words):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(*rows))
    caplog.set_level("WARNING")
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data, **sections)], capsys)
    assert code == 0, err
    _warned(caplog, *words)
    assert (tmp_path / "run" / "round-1" / "train" / "adapter" / "adapter_model.safetensors").exists()


def test_each_data_warning_is_said_once(tmp_path, tiny_lm_dir, capsys, caplog):
    """The train stage reads the rows and the trainer reads them again: one warning, not two."""
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines({"prompt": "Q", "responses": ["only one"], "scores": [1.0]}, GOOD))
    caplog.set_level("WARNING")
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "k = 1" in r.getMessage()]
    assert len(said) == 1 and str(data) in said[0], said


def test_mostly_one_candidate_per_prompt_stops_unless_allowed(tmp_path, tiny_lm_dir, capsys):
    """Rows with k = 1 have no rank pair: a run where most rows do would train SFT alone
    under RRHF's name, so it stops (exit 2, saying why) unless train.allow_sft_only is set."""
    one = {"prompt": "Q", "responses": ["only one"], "scores": [1.0]}
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(one, dict(one, prompt="R"), GOOD))
    recipe = _recipe(tmp_path, tiny_lm_dir, data)
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, str(data), "2 of 3 rows have one candidate", "SFT loss",
                       "train.allow_sft_only")
    assert not (tmp_path / "run" / "round-1" / "train" / "adapter").exists()
    code, out, err = _cli(["run", recipe, "--set", "train.allow_sft_only=true"], capsys)
    assert code == 0, err
    assert "training anyway (train.allow_sft_only)" in out
    assert (tmp_path / "run" / "round-1" / "train" / "adapter" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------ recipes


RECIPE_ERRORS = [
    # (id, change to the recipe or raw text, words the message must name)
    ("unknown_top_key", {"modle": {}}, ["recipe key modle", "did you mean 'model'"]),
    ("unknown_nested_key", {"train": {"lerning_rate": 1e-4}},
     ["train.lerning_rate", "did you mean 'learning_rate'"]),
    ("unknown_lora_key", {"lora": {"rank": 8}}, ["lora.rank"]),
    ("wrong_type_int", {"train": {"max_steps": "many"}}, ["train.max_steps", "'many'"]),
    ("wrong_type_bool", {"quantization": {"load_in_4bit": "sometimes"}},
     ["quantization.load_in_4bit"]),
    ("wrong_type_section", {"train": [1, 2]}, ["recipe key train"]),
    ("out_of_range", {"lora": {"dropout": 1.5}}, ["lora.dropout"]),
    ("unknown_stage", {"stages": ["trian"]}, ["stages"]),
    ("missing_model", "stages: [train]\ndata: {candidates: c.jsonl}\nmodel: {}\n",
     ["model.name_or_path", "required"]),
    ("not_a_mapping", "- just\n- a list\n", ["a recipe is a YAML mapping"]),
    ("yaml_syntax", "model:\n  name_or_path: x\ntrain: [unclosed\n", ["line"]),
    ("python_tag", "model: !!python/object/apply:os.system ['echo owned']\n", ["python/object"]),
    ("invalid_utf8", b"name: caf\xe9\n", ["UTF-8"]),
]


@pytest.mark.parametrize("change, words", _params(RECIPE_ERRORS))
def test_bad_recipe(tmp_path, tiny_lm_dir, capsys, change, words):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    if isinstance(change, dict):
        recipe = _recipe(tmp_path, tiny_lm_dir, data, **change)
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_bytes(change if isinstance(change, bytes) else change.encode())
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, str(recipe), *words)
    assert not (tmp_path / "run").exists()


def test_bad_set_override_names_the_key(tmp_path, tiny_lm_dir, capsys):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    recipe = _recipe(tmp_path, tiny_lm_dir, data)
    code, _, err = _cli(["run", recipe, "--set", "train.lerning_rate=1e-4"], capsys)
    _assert_user_error(code, err, "train.lerning_rate", "learning_rate")
    code, _, err = _cli(["run", recipe, "--set", "train.max_steps=lots"], capsys)
    _assert_user_error(code, err, "train.max_steps")
    assert not (tmp_path / "run").exists()


def test_set_on_a_non_mapping_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- a\n- b\n")
    code, _, err = _cli(["validate", recipe, "--set", "train.max_steps=1"], capsys)
    _assert_user_error(code, err, str(recipe), "mapping")


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = _cli(["run", tmp_path / "nope.yaml"], capsys)
    _assert_user_error(code, err, str(tmp_path / "nope.yaml"), "not found")


# ------------------------------------------------------------------------------------- paths


def test_missing_data_file(tmp_path, tiny_lm_dir, capsys):
    missing = tmp_path / "nope.jsonl"
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, missing)], capsys)
    # the message must point at the recipe key (the user's mistake), not at an earlier stage
    _assert_user_error(code, err, str(missing), "data.candidates")
    _no_results(tmp_path / "run")


def test_missing_model_dir(tmp_path, capsys):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    missing = tmp_path / "no_model_here"
    code, _, err = _cli(["run", _recipe(tmp_path, missing, data)], capsys)
    _assert_user_error(code, err, str(missing))
    _no_results(tmp_path / "run")


def test_missing_prompts_file(tmp_path, tiny_lm_dir, capsys):
    missing = tmp_path / "prompts.jsonl"
    recipe = _recipe(tmp_path, tiny_lm_dir, tmp_path / "x.jsonl", stages=["sample"],
                     data={"prompts": str(missing), "candidates": None})
    code, _, err = _cli(["run", recipe], capsys)
    _assert_user_error(code, err, str(missing), "data.prompts")
    _no_results(tmp_path / "run")


def test_generate_with_missing_model(tmp_path, capsys):
    missing = tmp_path / "no_model_here"
    code, _, err = _cli(["generate", "--model", missing, "--prompt", "hi"], capsys)
    _assert_user_error(code, err, str(missing))


def test_fixing_a_recipe_after_a_failed_run_is_not_refused(tmp_path, tiny_lm_dir, capsys):
    """A run that failed on bad input produced nothing, so the corrected recipe must be allowed
    into the same run directory without --force."""
    missing = tmp_path / "typo.jsonl"
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, missing)], capsys)
    assert code == 2, err
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    code, _, err = _cli(["validate", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert code == 0, err
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "round-1" / "train" / "adapter").is_dir()


# ------------------------------------------------------------------------- existing outputs


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_dir_of_another_recipe_is_left_alone(tmp_path, tiny_lm_dir, capsys):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    run_dir = tmp_path / "run"
    (run_dir / "round-1").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: someone else's run\n")
    (run_dir / "round-1" / "scored.jsonl").write_text(_lines(GOOD))
    before = _snapshot(run_dir)
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    _assert_user_error(code, err, str(run_dir), "different recipe", "--force")
    assert _snapshot(run_dir) == before


def test_non_run_dir_is_left_alone(tmp_path, tiny_lm_dir, capsys):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("years of work")
    code, _, err = _cli(["run", _recipe(tmp_path, tiny_lm_dir, data)], capsys)
    _assert_user_error(code, err, str(run_dir))
    assert _snapshot(run_dir) == {"thesis.tex": b"years of work"}


def test_merge_into_non_empty_dir_is_refused(tmp_path, tiny_lm_dir, tiny_adapter_dir, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = _cli(["merge", "--base", tiny_lm_dir, "--adapter", tiny_adapter_dir,
                         "--out", out, "--dtype", "float32"], capsys)
    _assert_user_error(code, err, str(out), "--force")
    assert _snapshot(out) == {"keep.txt": b"old"}


def test_merge_with_missing_adapter(tmp_path, tiny_lm_dir, capsys):
    code, _, err = _cli(["merge", "--base", tiny_lm_dir, "--adapter", tmp_path / "nope",
                         "--out", tmp_path / "merged"], capsys)
    _assert_user_error(code, err, str(tmp_path / "nope"))
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------- the installed command


def test_console_command_exits_2_without_traceback(tmp_path, tiny_lm_dir):
    """The same through a real process: exit status 2 and a clean message on stderr."""
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD, '{"prompt": "a", "responses": ["x"], "scores": [NaN]}'))
    proc = subprocess.run(
        [sys.executable, "-m", "rrhf_lite.cli", "run", str(_recipe(tmp_path, tiny_lm_dir, data))],
        capture_output=True, text=True, timeout=300,
    )
    _assert_user_error(proc.returncode, proc.stderr, f"{data} line 2", "not finite")
    _no_results(tmp_path / "run")


@pytest.mark.parametrize("key, content, words", [
    ("prompts", '{"prompt": "fine"}\n{not json\n', ["line 2", "malformed JSON"]),
    ("prompts", '{"question": "wrong key"}\n', ["line 1", '"prompt"', "question"]),
    ("eval_prompts", '{"prompt": ""}\n', ["line 1", '"prompt"']),
    ("candidates", '{"prompt": "Q", "responses": "not a list"}\n', ["line 1", "responses"]),
], ids=["malformed", "wrong_key", "empty_eval_prompt", "bad_candidates"])
def test_validate_reads_the_data_files(tmp_path, tiny_lm_dir, capsys, key, content, words):
    bad = tmp_path / f"{key}.jsonl"
    bad.write_text(content)
    good = tmp_path / "good.jsonl"
    good.write_text(_lines({"prompt": "Q"}))
    if key == "candidates":
        recipe = _recipe(tmp_path, tiny_lm_dir, bad, stages=["score", "train"],
                         scoring={"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"})
    else:
        data = {"prompts": str(good), "eval_prompts": str(good), "candidates": None, key: str(bad)}
        recipe = _recipe(tmp_path, tiny_lm_dir, bad, stages=["sample", "score", "evaluate"],
                         data=data, scoring={"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"})
    code, _, err = _cli(["validate", recipe], capsys)
    _assert_user_error(code, err, f"data.{key}", str(bad), *words)


# ------------------------------------------------------------------ the user's reward function

_USER_REWARD = "def reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.fixture
def clean_imports(monkeypatch):
    """sys.path and sys.modules as they were, after a test that imports the user's files."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if "p27" in m]:  # the modules these tests wrote
        del sys.modules[name]


def _score_recipe(tmp_path, tiny_lm_dir, function, **sections) -> Path:
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines({"prompt": "Q: hi", "responses": ["a", "bb"]}))
    return _recipe(tmp_path, tiny_lm_dir, data, stages=["score", "train"],
                   scoring={"reward_function": function}, **sections)


@pytest.mark.parametrize("function", ["beside_p27:reward", "beside_p27.py:reward"])
def test_a_reward_file_beside_the_recipe_needs_no_pythonpath(tmp_path, tiny_lm_dir, capsys,
                                                             monkeypatch, clean_imports, function):
    (tmp_path / "beside_p27.py").write_text(_USER_REWARD)
    recipe = _score_recipe(tmp_path, tiny_lm_dir, function)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = _cli(["validate", recipe], capsys)
    assert code == 0, err


@pytest.mark.parametrize("function, body, words", [
    ("nosuchmod_p27:reward", None, ["cannot import module 'nosuchmod_p27'", "the recipe's directory"]),
    ("no_file_p27.py:reward", None, ["'no_file_p27.py' not found", "looked in"]),
    ("user_p27:nope", _USER_REWARD, ["has no function 'nope'"]),
    ("user_p27:reward", "def reward(prompts, responses):\n    return {}['missing']\n",
     ["KeyError", "user_p27.py line 2", "called as reward(prompts, responses)"]),
    ("user_p27:reward", "def reward(prompts, responses):\n    return [1.0, 2.0]\n",
     ["returned 2 instead of a list of 1 floats"]),
], ids=["unknown_module", "unknown_file", "unknown_function", "raises", "wrong_length"])
def test_validate_tries_the_reward_function(tmp_path, tiny_lm_dir, capsys, clean_imports,
                                            function, body, words):
    if body is not None:
        (tmp_path / "user_p27.py").write_text(body)
    recipe = _score_recipe(tmp_path, tiny_lm_dir, function)
    for command in ("validate", "run"):  # before any model loads, in both
        code, _, err = _cli([command, recipe], capsys)
        _assert_user_error(code, err, f"recipe key scoring.reward_function ({function})", *words)
        assert "internal error" not in err
    _no_results(tmp_path / "run")


@pytest.mark.parametrize("report_to, words", [
    ("bogus", ["unknown logging integration", "tensorboard"]),
    ("tensorbord", ["did you mean 'tensorboard'"]),
    ("[none, bogus]", ["bogus"]),
], ids=["unknown", "misspelt", "in_a_list"])
def test_report_to_is_checked_by_validate(tmp_path, tiny_lm_dir, capsys, report_to, words):
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    recipe = _recipe(tmp_path, tiny_lm_dir, data)
    code, _, err = _cli(["validate", recipe, "--set", f"train.report_to={report_to}"], capsys)
    _assert_user_error(code, err, "recipe key train.report_to", *words)


def test_report_to_an_integration_that_is_not_installed_names_the_package(
        tmp_path, tiny_lm_dir, capsys, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    data = tmp_path / "cands.jsonl"
    data.write_text(_lines(GOOD))
    recipe = _recipe(tmp_path, tiny_lm_dir, data)
    for name, package in (("tensorboard", "tensorboard"), ("flyte", "flytekit")):
        code, _, err = _cli(["validate", recipe, "--set", f"train.report_to={name}"], capsys)
        _assert_user_error(code, err, f"{name} is not installed", f"pip install {package}")
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations",
                        lambda: ["tensorboard"])
    code, _, err = _cli(["validate", recipe, "--set", "train.report_to=tensorboard"], capsys)
    assert code == 0, err
