"""The score stage: reward model, Python function, given scores; batching and bad outputs."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from rrhf_lite.errors import UserInputError
from rrhf_lite.models.inference_loader import load_reward_model
from rrhf_lite.stages.score import call_reward_function, reward_model_text, score_candidates
from rrhf_lite.utils.io import read_jsonl

ROWS = [
    {"prompt": "copy abc=", "responses": ["abc", "abd", "x"], "sources": ["a", "b", "c"]},
    {"query": "add 1+2=", "responses": ["3", "33"]},
]


# reward functions named as "test_score:<name>" (pytest puts tests/ on sys.path)
def length_reward(prompts, responses):
    return [float(len(p) + 10 * len(r)) for p, r in zip(prompts, responses, strict=True)]


def nan_reward(prompts, responses):
    return [math.nan for _ in responses]


def short_reward(prompts, responses):
    return [1.0]


def none_reward(prompts, responses):
    return [None] * len(responses)


def test_function_scores_keep_other_keys_and_write_file(tmp_path):
    out = tmp_path / "scored.jsonl"
    scored = score_candidates(ROWS, reward={"function": "test_score:length_reward",
                                            "batch_size": 2},
                              output_path=out, progress=False)
    assert scored[0]["scores"] == [39.0, 39.0, 19.0]
    assert scored[1]["scores"] == [18.0, 28.0]
    assert scored[0]["sources"] == ["a", "b", "c"] and "scores" not in ROWS[0]
    assert read_jsonl(out) == scored


@pytest.mark.parametrize("name,match", [("nan_reward", "not a finite float"),
                                        ("short_reward", "instead of a list of"),
                                        ("none_reward", "not a finite float")])
def test_bad_function_output_names_the_function(name, match):
    with pytest.raises(UserInputError, match=match) as err:
        score_candidates(ROWS, reward={"function": f"test_score:{name}"}, progress=False)
    assert f"test_score:{name}" in str(err.value)


def test_unimportable_function():
    with pytest.raises(UserInputError, match="cannot import"):
        score_candidates(ROWS, reward={"function": "no_such_module_xyz:f"}, progress=False)
    with pytest.raises(UserInputError, match="no function"):
        score_candidates(ROWS, reward={"function": "test_score:missing"}, progress=False)


def test_reward_model_matches_a_direct_forward_and_ignores_batching(tiny_reward_dir):
    model, tokenizer = load_reward_model(str(tiny_reward_dir), device="cpu")
    one = score_candidates(ROWS, reward={"model": str(tiny_reward_dir), "batch_size": 1},
                           progress=False)
    many = score_candidates(ROWS, reward={"model": (model, tokenizer), "batch_size": 5,
                                          "joiner": ""}, progress=False)
    for a, b in zip(one, many, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    # by hand: the classifier's logit for the unpadded text
    ids = tokenizer("add 1+2=" + "33", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, 0].item()
    assert one[1]["scores"][1] == pytest.approx(expected, abs=1e-5)
    # the joiner is part of the text
    spaced = score_candidates(ROWS, reward={"model": (model, tokenizer), "joiner": " "},
                              progress=False)
    assert spaced[0]["scores"] != pytest.approx(one[0]["scores"], abs=1e-6)


def test_reward_read_at_an_appended_eos_even_when_pad_is_eos(tiny_reward_dir):
    model, tokenizer = load_reward_model(str(tiny_reward_dir), device="cpu")
    model.config.pad_token_id = tokenizer.eos_token_id  # as for a tokenizer without a pad token
    tokenizer.pad_token = tokenizer.eos_token
    scored = score_candidates(ROWS, reward={"model": (model, tokenizer), "append_eos": True,
                                            "batch_size": 3}, progress=False)
    ids = tokenizer("copy abc=x", return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        at_eos = model.score(hidden)[0, -1, 0].item()
    assert scored[0]["scores"][2] == pytest.approx(at_eos, abs=1e-5)
    assert model.config.pad_token_id == tokenizer.eos_token_id  # restored


def test_chat_prompts_use_the_reward_models_template(char_tokenizer):
    from rrhf_lite.builtin.tiny import build_char_tokenizer

    chat = build_char_tokenizer(chat_template=True)
    text, templated = reward_model_text(chat, [{"role": "user", "content": "hi"}], "yo")
    assert templated and text == "<user>hi\n<assistant>yo\n"
    assert reward_model_text(chat, "p:", "r", joiner=" ")[0] == "p: r"
    with pytest.raises(UserInputError, match="chat template"):
        reward_model_text(char_tokenizer, [{"role": "user", "content": "hi"}], "yo")


def test_given_scores_are_validated():
    good = [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0.5]}]
    assert score_candidates(good, reward={"given": True}, progress=False)[0]["scores"] == [1, 0.5]
    for bad, match in [([1.0], "2 responses but 1 scores"), (None, "missing"),
                       ([1.0, float("nan")], "scores\\[1\\]"), ([True, 1.0], "scores\\[0\\]")]:
        row = {"prompt": "p", "responses": ["a", "b"]}
        if bad is not None:
            row["scores"] = bad
        with pytest.raises(UserInputError, match=match) as err:
            score_candidates([good[0], row], reward={"given": True}, progress=False)
        assert "row 2" in str(err.value)


def test_reward_spec_errors():
    with pytest.raises(UserInputError, match="exactly one"):
        score_candidates(ROWS, reward={"given": True, "function": "a:b"}, progress=False)
    with pytest.raises(UserInputError, match="exactly one"):
        score_candidates(ROWS, reward={}, progress=False)
    with pytest.raises(UserInputError, match="responses"):
        score_candidates([{"prompt": "p", "responses": []}], reward={"given": True},
                         progress=False)
    # the recipe's field names work too
    scored = score_candidates(ROWS, reward={"reward_function": "test_score:length_reward",
                                            "reward_model": None, "given": False},
                              progress=False)
    assert scored[1]["scores"] == [18.0, 28.0]


# --- the user's own reward function: where it is found, and its errors ---------------------

_USER_MODULE = textwrap.dedent("""
    def helper(response):
        return 1.0 / (len(response) - len(response))

    def reward(prompts, responses):
        return [float(len(r)) for r in responses]

    def broken(prompts, responses):
        return [helper(r) for r in responses]
""")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A directory holding the user's reward files, not on sys.path; the working directory is
    elsewhere; sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    here = tmp_path / "recipe_dir"
    (here / "sub").mkdir(parents=True)
    (here / "user_reward_p27.py").write_text(_USER_MODULE)
    (here / "sub" / "file_reward_p27.py").write_text(_USER_MODULE)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    yield here
    for name in [m for m in sys.modules if "p27" in m]:  # the modules these tests wrote
        del sys.modules[name]


@pytest.mark.parametrize("name", ["user_reward_p27:reward", "sub/file_reward_p27.py:reward"])
def test_module_and_file_names_resolve_from_the_recipe_directory(user_dir, name):
    with pytest.raises(UserInputError, match="scoring.reward_function"):  # not on sys.path
        score_candidates(ROWS, reward={"function": name}, progress=False)
    scored = score_candidates(ROWS, reward={"function": name, "search_dirs": [str(user_dir)]},
                              progress=False)
    assert scored[1]["scores"] == [1.0, 2.0]


@pytest.mark.parametrize("name", ["user_reward_p27:reward", "sub/file_reward_p27.py:reward"])
def test_module_and_file_names_resolve_from_the_working_directory(user_dir, monkeypatch, name):
    monkeypatch.chdir(user_dir)
    scored = score_candidates(ROWS, reward={"function": name}, progress=False)
    assert scored[0]["scores"] == [3.0, 3.0, 1.0]


def test_an_exception_in_the_users_function_names_their_file_line_and_the_key(user_dir):
    with pytest.raises(UserInputError) as err:
        score_candidates(ROWS, reward={"function": "user_reward_p27:broken",
                                       "search_dirs": [str(user_dir)]}, progress=False)
    text = str(err.value)
    assert "recipe key scoring.reward_function (user_reward_p27:broken)" in text
    assert "ZeroDivisionError" in text
    assert f"{user_dir / 'user_reward_p27.py'} line 3" in text  # the failing line, in helper
    assert "rrhf_lite/stages" not in text  # our frames are left out
    assert "reward(prompts, responses) -> list[float]" in text  # the signature, in the hint


@pytest.mark.parametrize("source, words", [
    ("def reward(prompts, responses)\n    return []\n", ["SyntaxError", "line 1"]),
    ("import no_such_dependency_p27\n", ["no_such_dependency_p27", "line 1"]),
    ("raise RuntimeError('configure me first')\n", ["configure me first", "line 1"]),
], ids=["syntax", "missing_dependency", "raises_on_import"])
def test_a_module_failing_on_import_is_the_users_error(user_dir, source, words):
    (user_dir / "failing_p27.py").write_text(source)
    with pytest.raises(UserInputError) as err:
        score_candidates(ROWS, reward={"function": "failing_p27:reward",
                                       "search_dirs": [str(user_dir)]}, progress=False)
    text = str(err.value)
    assert "scoring.reward_function" in text and "failing_p27.py" in text
    for word in words:
        assert word in text


def test_no_error_message_names_a_key_that_does_not_exist():
    for reward in ({"function": "no_such_module_xyz:f"}, {"function": "test_score:missing"},
                   {"function": "test_score:nan_reward"}, {"given": True, "function": "a:b"},
                   {"function": "test_score:length_reward", "batch_size": "x"}):
        with pytest.raises(UserInputError) as err:
            score_candidates(ROWS, reward=reward, progress=False)
        assert "reward.function" not in str(err.value) and "scoring" in str(err.value)


def test_a_failure_inside_rrhf_lites_own_task_code_stays_an_internal_error():
    from rrhf_lite.builtin.tiny import tasks

    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        call_reward_function(tasks.reward, "rrhf_lite.builtin.tiny.tasks:reward",
                             ["copy a=", "copy b="], ["a"])
