"""A new user's whole story on the real model, as they would play it (issue 27, item 8).

From a working directory outside the repository, with only what the README and the shipped
example show: plain-text prompts in JSON lines, a Python reward function in a file beside the
recipe (no PYTHONPATH), a recipe adapted from recipes/examples/synonyms.yaml, on
builtin:smollm2-135m-instruct. Then, each as a separate `rrhf-lite` process:

    validate -> run (sample, score, train, evaluate, merge) -> generate --adapter (default flags)
    -> merge --adapter (default flags) -> edit the held-out prompts and run again

and what each step must give: exit 0 and no "internal error"; the plain prompts sent as chats;
generate answering exactly as the evaluated policy did; an adapter and merged model that name
the shareable hub base and carry a model card; a rerun that redoes only what the edit touched.
Smoke sizes (4 prompts, k = 4, 8 new tokens); the model's conversion is the session's. Six
processes that each load torch and the model: a few minutes on 2 cores, so it is marked slow and
.ci/run runs it after the default set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

REWARD = '''\
"""My reward: a one-word answer that is not the word asked about."""
import re


def reward(prompts, responses):
    scores = []
    for prompt, response in zip(prompts, responses):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        words = re.findall(r"[A-Za-z][A-Za-z'-]*", response)
        asked = re.search(r'"([^"]+)"', text)
        value = 1.0 / len(words) if words else 0.0
        if words and asked and words[0].lower() == asked.group(1).lower():
            value *= 0.25
        scores.append(value)
    return scores
'''
TRAIN_WORDS = ("happy", "big", "fast", "smart")


def _prompt(word: str) -> dict:
    return {"prompt": f'Give me a one-word synonym for "{word}".'}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _project(tmp_path: Path) -> Path:
    """The user's own directory: their data, their reward file, their recipe."""
    project = tmp_path / "my-project"
    (project / "data").mkdir(parents=True)
    _write_jsonl(project / "data" / "prompts.jsonl", [_prompt(w) for w in TRAIN_WORDS])
    # One held-out prompt: evaluate and generate then run the same one-row batch.
    _write_jsonl(project / "data" / "eval.jsonl", [_prompt("cold")])
    (project / "my_reward.py").write_text(REWARD, encoding="utf-8")
    recipe = yaml.safe_load((ROOT / "recipes" / "examples" / "synonyms.yaml").read_text())
    recipe.update(name="my_synonyms", output_dir="runs/my_synonyms",
                  stages=["sample", "score", "train", "evaluate", "merge"])
    recipe["data"] = {"prompts": "data/prompts.jsonl", "eval_prompts": "data/eval.jsonl"}
    recipe["sampling"].update(max_new_tokens=8, batch_size=8)
    recipe["train"].update(max_length=48, max_prompt_length=40, logging_steps=1)
    recipe["evaluate"].update(max_new_tokens=8, train_prompts=0, examples=1)
    recipe["merge"] = {"torch_dtype": "float32", "roundtrip_nf4": True}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return project


def _rrhf_lite(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`rrhf-lite ARGS` in the user's directory, as its own process. -P: the working directory
    is not put on sys.path, as for the installed `rrhf-lite` script, so the reward file must be
    found the way rrhf-lite finds it (beside the recipe), not by accident."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get("PYTHONPATH"):  # a checkout under test (not the user's directory)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in os.environ["PYTHONPATH"].split(os.pathsep) if Path(p) != project)
    result = subprocess.run([sys.executable, "-P", "-m", "rrhf_lite.cli", *args], cwd=project,
                            env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "internal error" not in output, output[-3000:]
    assert result.returncode == 0, f"rrhf-lite {' '.join(args)}: exit {result.returncode}\n" \
                                   + output[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.usefixtures("smollm2_dir")
def test_a_new_users_task_end_to_end_on_the_real_model(tmp_path):
    project = _project(tmp_path)
    run = project / "runs" / "my_synonyms"

    _rrhf_lite(project, "validate", "recipe.yaml")
    first = _rrhf_lite(project, "run", "recipe.yaml")
    log = first.stdout + first.stderr
    assert "single-turn chat" in log  # plain prompts to a chat model, said once
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {"initial", "rrhf"} <= set(metrics["variants"])

    # The adapter names a base anyone can load, records how training loaded it, has a card.
    adapter = run / "round-1" / "train" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == HUB_NAME
    record = json.loads((adapter / "rrhf_lite.json").read_text())
    assert record["quantization"]["load_in_4bit"] is True
    card = (adapter / "README.md").read_text()
    assert HUB_NAME in card and "More Information Needed" not in card

    # generate --adapter with default flags answers as the evaluated policy did.
    evaluated = [json.loads(line) for line in
                 (run / "eval" / "rrhf.held_out.jsonl").read_text().splitlines()]
    prompt = _prompt("cold")["prompt"]
    answer = _rrhf_lite(project, "generate", "--adapter", str(adapter), "--prompt", prompt,
                        "--max-new-tokens", "8").stdout
    assert evaluated[0]["response"].strip() in answer, (answer, evaluated[0]["response"])

    # The recipe's merge and the CLI's, each with its card naming the shareable base.
    assert HUB_NAME in (run / "merged" / "README.md").read_text()
    _rrhf_lite(project, "merge", "--adapter", str(adapter), "--out", "merged-by-hand")
    merged = project / "merged-by-hand"
    assert (merged / "model.safetensors").is_file() and (merged / "README.md").is_file()

    # Editing the held-out prompts reruns the evaluation only: the candidates and the adapter stay.
    candidates = run / "round-1" / "candidates.jsonl"
    before = {p: p.stat().st_mtime_ns for p in (candidates, adapter / "adapter_model.safetensors")}
    _write_jsonl(project / "data" / "eval.jsonl", [_prompt("cold"), _prompt("quiet")])
    second = _rrhf_lite(project, "run", "recipe.yaml")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    said = second.stdout + second.stderr
    assert "evaluate" in said and "reruns" in said and "eval_prompts" in said, said[-3000:]
    assert "sample reruns" not in said and "train reruns" not in said
    rows = (run / "eval" / "rrhf.held_out.jsonl").read_text().splitlines()
    assert len(rows) == 2
