"""evaluate's additions: success per kind (a hook of the task's reward module), general ability
(log-likelihood of the initial model's answers to unrelated prompts), example answers before and
after, and wall time per stage (in metrics.json and report.md). Tiny models, seconds."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
import torch
import yaml

from rrhf_lite.builtin.constraints import make_rows
from rrhf_lite.builtin.sources import load_prompt_rows
from rrhf_lite.cli import main
from rrhf_lite.config.recipe import parse_recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.stages import eval_extras, stage_times
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.utils import report_files as report

# ------------------------------------------------------------------ success per kind (the hook)


def test_breakdown_hook_is_found_next_to_the_reward_function_only_when_there():
    hook = eval_extras.breakdown_function("rrhf_lite.builtin.constraints:reward")
    rows = make_rows(4, seed=0, held_out=True)
    prompts = [r["prompt"] for r in rows]
    shares = eval_extras.success_by_kind(hook, prompts, ["THE END."] * 4)
    assert set(shares) == {k for r in rows for k in r["kinds"]} | {"on_topic"}
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    # the tiny world's reward module has no breakdown; no reward function, no hook
    assert eval_extras.breakdown_function("rrhf_lite.builtin.tiny.tasks:reward") is None
    assert eval_extras.breakdown_function(None) is None
    assert eval_extras.success_by_kind(None, prompts, ["x"] * 4) is None


def test_a_hook_that_returns_no_numbers_is_refused():
    with pytest.raises(TypeError, match="success_by_kind"):
        eval_extras.success_by_kind(lambda p, r: {"caps": "most"}, ["p"], ["r"])
    with pytest.raises(TypeError):
        eval_extras.success_by_kind(lambda p, r: [0.5], ["p"], ["r"])


# ------------------------------------------------------------------ example answers


def test_example_rows_pair_the_two_variants_and_cut_long_answers():
    prompts = [[{"role": "user", "content": "Describe tea."}], "plain prompt", "third"]
    answers = {"initial": (["a" * 500, "b", "c"], [0.1, 0.2, 0.3]),
               "rrhf_round2": (["x", "y", "z"], [0.9, 0.8, 0.7])}
    rows = eval_extras.example_rows(prompts, answers, "initial", "rrhf_round2", 2)
    assert [r["prompt"] for r in rows] == ["Describe tea.", "plain prompt"]
    assert rows[0]["initial answer"].endswith("...")
    assert len(rows[0]["initial answer"]) == eval_extras.EXAMPLE_CHARS
    assert rows[1]["rrhf_round2 answer"] == "y" and rows[1]["rrhf_round2 reward"] == 0.8
    assert eval_extras.example_rows(prompts, answers, "initial", "rrhf", 2) == []
    assert eval_extras.example_rows(prompts, answers, "initial", "initial", 2) == []
    assert eval_extras.example_rows(prompts, answers, "initial", "rrhf_round2", 0) == []


# ------------------------------------------------------------------ wall time per stage


def test_stage_times_persist_replace_and_skip_failed_stages(tmp_path):
    with stage_times.timed_stage(tmp_path, "round-1/sample"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), stage_times.timed_stage(tmp_path, "round-1/train"):
        raise RuntimeError("failed stage")
    with stage_times.timed_stage(tmp_path, "merge", enabled=False):
        pass
    times = stage_times.read_stage_times(tmp_path)
    assert list(times) == ["round-1/sample"] and times["round-1/sample"] >= 0.02
    first = times["round-1/sample"]
    stage_times.record_stage_time(tmp_path, "round-1/sample", 5.0)  # a resumed stage adds
    stage_times.record_stage_time(tmp_path, "evaluate", 2.5)
    rows = stage_times.stage_time_rows(stage_times.read_stage_times(tmp_path))
    assert rows == [{"stage": "round-1/sample", "wall_s": round(first + 5.0, 1)},
                    {"stage": "evaluate", "wall_s": 2.5},
                    {"stage": "total", "wall_s": round(first + 7.5, 1)}]
    with stage_times.timed_stage(tmp_path / "other", "model", defer=True):
        pass
    assert not (tmp_path / "other").exists()  # held until a stage's time is written
    stage_times.record_stage_time(tmp_path / "other", "round-1/sample", 1.0)
    assert list(stage_times.read_stage_times(tmp_path / "other")) == ["model", "round-1/sample"]
    (tmp_path / stage_times.FILE_NAME).write_text("not json")
    assert stage_times.read_stage_times(tmp_path) == {}


def test_update_run_report_adds_metrics_and_replaces_a_table(tmp_path):
    assert report.update_run_report(tmp_path, {"wall_s": {"merge": 1.0}}) is False
    report.write_run_report(tmp_path, {"a": 1.0}, title="t", tables=[("T", [{"x": 1}])])
    assert report.update_run_report(tmp_path, {"wall_s": {"merge": 3.25}},
                                    [("T", [{"x": 2}]), ("New", [{"y": "z"}])])
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["metrics"] == {"a": 1.0, "wall_s": {"merge": 3.25}}
    assert document["tables"] == {"T": [{"x": 2}], "New": [{"y": "z"}]}
    text = (tmp_path / "report.md").read_text()
    assert "## New" in text and "wall_s.merge" in text and "| 2 |" in text


# ------------------------------------------------------------------ general ability


def test_builtin_general_prompts_and_their_limit():
    rows = load_prompt_rows("builtin:general", split="test", limit=5, seed=0, key="k")
    assert len(rows) == 5 and rows[0]["prompt"][0]["role"] == "user"
    assert len({r["prompt"][0]["content"] for r in rows}) == 5
    with pytest.raises(UserInputError, match="questions"):
        load_prompt_rows("builtin:general", split="test", limit=10_000, seed=0, key="k")


def _state(tmp_path, model_dir) -> RunState:
    recipe = parse_recipe({"model": {"name_or_path": str(model_dir)},
                           "output_dir": str(tmp_path / "run"), "stages": ["evaluate"],
                           "data": {"eval_prompts": "p.jsonl"},
                           "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"},
                           "evaluate": {"max_new_tokens": 6, "batch_size": 4},
                           "train": {"max_length": 48, "max_prompt_length": 24}})
    return RunState(recipe, tmp_path / "run", str(model_dir), ["evaluate"])


@torch.no_grad()
def test_general_ability_is_highest_for_the_model_that_wrote_the_answers(tmp_path, tiny_lm_dir,
                                                                          make_adapter):
    """Greedy answers are the initial model's likeliest: a policy that moved far from it (a
    random adapter) reads them as less likely. The answers are made once, by the initial model."""
    state = _state(tmp_path, tiny_lm_dir)
    rows = [{"prompt": p} for p in ("copy ab=", "reverse abc=", "sort 321=", "copy xyz=")]
    path = tmp_path / "general_answers.jsonl"
    general = eval_extras.GeneralAbility(state, rows, path)
    model, tokenizer = load_causal_lm(str(tiny_lm_dir), torch_dtype="float32")
    adapter = make_adapter(tmp_path / "adapter", r=8, alpha=64)
    moved, _ = load_causal_lm(str(tiny_lm_dir), adapter_path=str(adapter), torch_dtype="float32")
    with pytest.raises(RuntimeError, match="initial model"):
        general.measure(moved, tokenizer, initial=False)
    own = general.measure(model, tokenizer, initial=True)
    assert path.exists() and len(general.answers) == 4
    assert own < 0.0
    assert general.measure(moved, tokenizer, initial=False) < own - 0.05
    # a second evaluation reads the same answers back (no regeneration, same numbers)
    again = eval_extras.GeneralAbility(state, rows, path)
    assert again.answers == general.answers
    assert again.measure(model, tokenizer, initial=False) == pytest.approx(own, abs=1e-6)


# ------------------------------------------------------------------ the whole pipeline


def test_a_run_reports_kinds_general_ability_examples_and_stage_times(
        tmp_path, tiny_lm_dir, monkeypatch, capsys):
    """A task module with a success_by_kind hook, general prompts, 1 round + an ablation, merge:
    everything lands in metrics.json and report.md, the stage times complete (merge included)."""
    package = tmp_path / "task_pkg"
    package.mkdir()
    (package / "my_task.py").write_text(textwrap.dedent("""
        from rrhf_lite.builtin.tiny.tasks import reward, score

        def success_by_kind(prompts, responses):
            out = {}
            for p, r in zip(prompts, responses):
                out.setdefault(p.split()[0], []).append(float(score(p, r) == 1.0))
            return {k: sum(v) / len(v) for k, v in out.items()}
    """))
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ("copy ab=", "reverse abc=", "copy cd=", "sort 21=")))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "abc")))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"name_or_path": str(tiny_lm_dir)},
        "stages": ["sample", "score", "train", "evaluate", "merge"],
        "quantization": {"load_in_4bit": False},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"prompts": str(prompts), "eval_prompts": str(prompts)},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": 3}],
                     "max_new_tokens": 4, "include_dataset_responses": False},
        "scoring": {"reward_function": "my_task:reward"},
        "train": {"max_steps": 1, "gradient_checkpointing": False, "logprob_backend": "torch",
                  "max_length": 32, "max_prompt_length": 16, "warmup_ratio": 0.0,
                  "save_steps": 1000},
        "ablations": [{"name": "no_rank_loss", "train": {"rank_weight": 0.0}}],
        "evaluate": {"max_new_tokens": 4, "general_prompts": str(general), "examples": 2,
                     "plots": False},
        "merge": {"torch_dtype": "float32", "roundtrip_nf4": False},
    }))
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    document = json.loads((run / "metrics.json").read_text())
    metrics = document["metrics"]
    assert set(metrics["variants"]) == {"initial", "rrhf", "no_rank_loss"}
    assert all(e["general/logprob"] < 0 for e in metrics["variants"].values())
    assert set(metrics["success_by_kind"]["rrhf"]) == {"copy", "reverse", "sort"}
    assert set(metrics["wall_s"]) == {"model", "round-1/sample", "round-1/score",
                                      "round-1/train", "ablation/no_rank_loss/train",
                                      "evaluate", "merge"}
    assert all(v >= 0 for v in metrics["wall_s"].values())
    examples = document["tables"]["Example answers (held-out): initial and rrhf"]
    assert len(examples) == 2 and examples[0]["prompt"] == "copy ab="
    text = (run / "report.md").read_text()
    assert "Success per constraint kind" in text and "Wall time per stage" in text
    assert "| merge |" in text and "general/logprob" in text
    # a resumed run skips every stage (each evaluated variant too) and keeps their times
    recorded = metrics["wall_s"]["round-1/train"]
    assert {p.name for p in (run / "eval").glob("*.entry.json")} == {
        "initial.entry.json", "rrhf.entry.json", "no_rank_loss.entry.json"}
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "evaluate: rrhf skipped" in capsys.readouterr().out
    again = json.loads((run / "metrics.json").read_text())["metrics"]
    assert again["wall_s"]["round-1/train"] == recorded  # skipped: nothing added
    assert again["wall_s"]["evaluate"] > metrics["wall_s"]["evaluate"]  # reran: added
    assert again["variants"] == metrics["variants"]
    assert again["success_by_kind"] == metrics["success_by_kind"]
