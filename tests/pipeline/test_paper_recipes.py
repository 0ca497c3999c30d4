"""The paper's recipes run as published: `rrhf-lite run recipes/hh_paper.yaml` and
`recipes/iterated_two_rounds.yaml`, offline, with `--set` overrides of names and sizes only.

The hub files are replaced by tiny local stand-ins of the same formats (rrhf_lite.builtin.tiny.stand_ins):
an Alpaca-like LLaMA (its tokenizer adds BOS), an rm-static-like data set (prompt / chosen /
rejected), and the raw GPT-J reward checkpoint hf_ckpt.pt with a config-and-tokenizer-only
base. Everything else (4-bit + LoRA, diverse beam search, the GPT-J scoring, 64 prompts per
optimiser step, the prompt truncation, evaluate, merge) is the recipe's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rrhf_lite.builtin.tiny import (
    save_alpaca_like_policy,
    save_gptj_value_head_checkpoint,
    write_rm_static_like,
)
from rrhf_lite.cli import main
from rrhf_lite.utils.io import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_stand_ins")
    reward, base = save_gptj_value_head_checkpoint(root / "gptj", seed=5)
    return {
        "policy": save_alpaca_like_policy(root / "alpaca-native", seed=0),
        "train": write_rm_static_like(root / "rm-static" / "train.jsonl", 6, seed=0),
        "test": write_rm_static_like(root / "rm-static" / "test.jsonl", 2, seed=1),
        "reward": reward, "base": base,
    }


def _names(s) -> list[str]:
    """The hub names, pointed at the stand-ins."""
    return [f"model.name_or_path={s['policy']}", f"data.prompts={s['train']}",
            f"data.eval_prompts={s['test']}", f"scoring.reward_model={s['reward']}",
            f"scoring.reward_base={s['base']}"]


SIZES = ["data.max_eval_prompts=2", "sampling.max_new_tokens=6", "evaluate.max_new_tokens=6",
         "train.num_train_epochs=1"]


def _run(recipe: str, out: Path, overrides: list[str], monkeypatch) -> None:
    monkeypatch.setenv("RRHF_LITE_CACHE", str(out.parent / "cache"))
    args = ["run", str(ROOT / "recipes" / recipe), "--output-dir", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0


def test_hh_paper_recipe_runs_offline(stand_ins, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hh-paper"
    _run("hh_paper.yaml", out, _names(stand_ins) + SIZES, monkeypatch)
    printed = capsys.readouterr().out
    scored = read_jsonl(out / "round-1" / "scored.jsonl")
    assert len(scored) == 6
    for row in scored:  # 4 beams + chosen + rejected, de-duplicated; one finite reward each
        assert 1 <= len(row["responses"]) <= 6 == sum(row["counts"])
        assert len(row["scores"]) == len(row["responses"])
    assert "round 1: candidates: k < 6 on" in printed and "round 1: scored: k < 6 on" in printed
    # the GPT-J checkpoint was converted once into safetensors, in the cache
    assert len(list((tmp_path / "cache" / "gptj-value-head").glob("*/model.safetensors"))) == 1
    # 6 prompts, 64 per optimiser step: one step, of 6 accumulated micro-batches
    history = read_jsonl(out / "round-1" / "train" / "metrics.jsonl")
    assert history and max(int(r.get("step", 0)) for r in history) == 1, history[-1]
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]["variants"]) == {"initial", "rrhf"}
    assert report["metrics"]["candidates"]["round-1"]["planned_k"] == 6
    assert any("training candidates, round-1: k < 6 on" in n for n in report["notes"])
    assert (out / "merged" / "config.json").exists()


def test_iterated_two_rounds_recipe_runs_offline(stand_ins, tmp_path, monkeypatch):
    out = tmp_path / "iterated"
    _run("iterated_two_rounds.yaml", out, _names(stand_ins) + SIZES + ["data.max_prompts=4"],
         monkeypatch)
    for index in (1, 2):
        assert len(read_jsonl(out / f"round-{index}" / "scored.jsonl")) == 4
        assert (out / f"round-{index}" / "train" / "adapter" / "adapter_model.safetensors").exists()
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]["variants"]) == {"initial", "rrhf", "rrhf_round2"}
    assert set(report["metrics"]["candidates"]) == {"round-1", "round-2"}
