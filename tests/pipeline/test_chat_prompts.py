"""Plain-text prompts to a model with a chat template are sent as single-turn chats, in
sampling (so the candidates, scoring and training see the chat) and in evaluation."""

from __future__ import annotations

import json

import pytest
import yaml

from rrhf_lite.cli import main
from rrhf_lite.data.prompts import single_turn_chats

SAY = "plain-text prompts are sent as single-turn chats"


def _recipe(tmp_path, model_dir, name: str, **data) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in (
        {"prompt": "copy ab="}, {"prompt": "sort 21="})))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / name), "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "stages": ["sample", "score"],
        "quantization": {"load_in_4bit": False},
        "data": {"prompts": str(prompts), **data},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": 2}],
                     "max_new_tokens": 3, "include_dataset_responses": False},
        "scoring": {"reward_function": "rrhf_lite.builtin.constraints:reward"},  # takes chats
    }))
    return str(path)


def _prompts(tmp_path, name: str) -> list:
    rows = (tmp_path / name / "round-1" / "candidates.jsonl").read_text().splitlines()
    return [json.loads(row)["prompt"] for row in rows]


def test_single_turn_chats_wraps_strings_only():
    chat = [{"role": "user", "content": "b"}]
    rows, changed = single_turn_chats([{"prompt": "a", "task": 1}, {"prompt": chat}])
    assert rows == [{"prompt": [{"role": "user", "content": "a"}], "task": 1}, {"prompt": chat}]
    assert changed == 1


@pytest.mark.parametrize("chat_model, setting, as_chat", [
    (True, {}, True), (True, {"plain_prompts_as_chat": False}, False), (False, {}, False)],
    ids=["chat_model", "turned_off", "no_template"])
def test_sampled_prompts_follow_the_models_chat_template(tmp_path, tiny_lm_dir, tiny_chat_lm_dir,
                                                         capsys, chat_model, setting, as_chat):
    model = tiny_chat_lm_dir if chat_model else tiny_lm_dir
    code = main(["run", _recipe(tmp_path, model, "run", **setting)])
    out, err = capsys.readouterr()
    assert code == 0, err
    prompts = _prompts(tmp_path, "run")
    texts = ["copy ab=", "sort 21="]
    assert prompts == ([[{"role": "user", "content": t}] for t in texts] if as_chat else texts)
    assert (out.count(SAY) == 1) == as_chat, out


def test_evaluation_asks_a_chat_model_in_chat(tmp_path, tiny_chat_lm_dir, capsys):
    recipe = _recipe(tmp_path, tiny_chat_lm_dir, "eval",
                     eval_prompts=str(tmp_path / "prompts.jsonl"))
    raw = yaml.safe_load(open(recipe))
    raw["stages"] = ["evaluate"]
    raw["evaluate"] = {"max_new_tokens": 3, "plots": False, "examples": 1, "best_of_n": False}
    with open(recipe, "w") as f:
        yaml.safe_dump(raw, f)
    code = main(["run", recipe])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count(SAY) == 1, out
    answers = "\n".join(p.read_text() for p in (tmp_path / "eval").rglob("*.json*"))
    assert '"role": "user"' in answers and '"content": "copy ab="' in answers
