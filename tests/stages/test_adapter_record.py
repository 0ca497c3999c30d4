"""Issue 27 (3, 6): a trained adapter records its base (rrhf_lite.json), names it as it can be
shared (adapter_config.json), carries a model card, and generate / evaluate / merge load the
base as training saw it unless told otherwise (which is said once)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers.trainer_steps import ranked_rows, rrhf_config

from rrhf_lite.builtin import sources
from rrhf_lite.cli import build_parser, main
from rrhf_lite.errors import UserInputError
from rrhf_lite.models import adapter_record
from rrhf_lite.models.adapter_record import RECORD_FILE, read_adapter_record
from rrhf_lite.models.training_loader import ModelArguments
from rrhf_lite.stages.generate import generate_load_kwargs, generate_texts
from rrhf_lite.utils.io import write_jsonl
from rrhf_lite.utils.report_files import write_run_report

# a tiny world built in seconds (the recipe's takes minutes): what is recorded is how it was built
TINY_OPTIONS = {"steps": 2, "num_demonstrations": 200, "batch_size": 8}
PROMPT = "copy ab="


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the notes that are said once per process."""
    monkeypatch.setattr(adapter_record, "_said", set())


@pytest.fixture(scope="module")
def tiny_world_base(tiny_world_cache):
    return sources.resolve_model(sources.TINY_WORLD, seed=0, options=TINY_OPTIONS)


@pytest.fixture(scope="module")
def trained(tiny_world_base, tmp_path_factory):
    """Round 1 of a run on builtin:tiny-world: 2 RRHF steps on the 4-bit base (compute dtype
    auto: float32 on a CPU), a checkpoint after each, then a metrics.json as evaluate writes it."""
    from rrhf_lite.stages.train import run_train

    run = tmp_path_factory.mktemp("run")
    data = write_jsonl(run / "scored.jsonl", ranked_rows(4))
    args = ModelArguments(tiny_world_base, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          gradient_checkpointing=False,
                          base_origin={"name": sources.TINY_WORLD, "seed": 0,
                                       "options": TINY_OPTIONS})
    adapter = run_train(str(data), args,
                        rrhf_config(run / "round-1" / "train", max_steps=2, save_strategy="steps",
                                    save_steps=1),
                        provenance={"recipe": "tiny_test", "prompts": "builtin:tiny-world/train",
                                    "reward": "rrhf_lite.builtin.tiny.tasks:reward"})
    metrics = {"variants": {"initial": {"reward/held_out": 0.25, "perplexity": 9.5},
                            "rrhf": {"reward/held_out": 0.4375, "perplexity": 8.125}},
               "best_of_n": {"reward/held_out": 0.5625, "n": 4.0}}
    write_run_report(run, metrics, title="tiny_test")
    return adapter


def test_training_records_its_base_beside_the_adapter_and_each_checkpoint(trained):
    record = read_adapter_record(trained)
    assert record["base_model"] == sources.TINY_WORLD  # the builtin name, not the cache dir
    assert record["base"]["builtin"] == {"name": sources.TINY_WORLD, "seed": 0,
                                         "options": TINY_OPTIONS}
    assert record["quantization"] == {"load_in_4bit": True, "quant_type": "nf4",
                                      "double_quant": True, "compute_dtype": "float32"}
    summary = json.loads((trained.parent / "train_summary.json").read_text())
    assert record["training"]["global_step"] == summary["global_step"] == 2
    assert record["training"]["data"]["rows"] == summary["data"]["rows"] == 4
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sources.TINY_WORLD
    for step in (1, 2):
        checkpoint = read_adapter_record(trained.parent / f"checkpoint-{step}")
        assert checkpoint["quantization"] == record["quantization"]
        assert checkpoint["training"]["global_step"] == step


def test_the_adapter_card_replaces_peft_s_template(trained):
    card = (trained / "README.md").read_text()
    assert "More Information Needed" not in card
    front = card.split("---")[1]
    assert "library_name: peft" in front and "- rrhf-lite" in front and "- lora" in front
    assert "license: apache-2.0" in front and "base_model:" not in front  # no hub copy
    record = read_adapter_record(trained)
    for heading in ("## Base model", "## Data", "## Objective", "## Results",
                    "## Framework versions"):
        assert heading in card
    hyper = record["training"]["hyperparameters"]
    assert f"| learning_rate | {hyper['learning_rate']:.4g} |" in card
    assert "| optimiser steps done | 2 |" in card and "rows 4" in card
    assert "builtin:tiny-world/train" in card and "variant `rrhf`" in card
    assert f"- torch: {torch.__version__}" in card


def test_generate_defaults_to_the_record_and_reproduces_the_trained_policy(
        trained, tiny_world_base, capsys):
    from rrhf_lite.config.sections import QuantizationSection
    from rrhf_lite.models.inference_loader import load_causal_lm

    load = generate_load_kwargs(None, str(trained), None)  # no --model: the recorded base
    assert load["model_name_or_path"] == tiny_world_base
    config = load["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.float32
    # the policy as training's settings load it, through the plain loader
    policy, tokenizer = load_causal_lm(tiny_world_base, adapter_path=str(trained),
                                       quantization_config=QuantizationSection().bnb_config())
    expected = generate_texts(policy, tokenizer, [PROMPT], max_new_tokens=8)[0]
    assert main(["generate", "--adapter", str(trained), "--prompt", PROMPT,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.endswith(f"### answer\n{expected}\n\n")


def test_an_explicit_different_choice_wins_and_is_said_once(trained, caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            load = generate_load_kwargs(None, str(trained), False)
            assert load["quantization_config"] is None
    said = [r.getMessage() for r in caplog.records if "not as it was trained" in r.getMessage()]
    assert len(said) == 1
    assert "--no-load-in-4bit" in said[0] and "4-bit nf4" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate_load_kwargs(None, str(trained), True)  # the same choice: nothing to say
    assert not caplog.records


def test_an_adapter_without_a_record_loads_as_before_with_a_note(tiny_lm_dir, tiny_adapter_dir,
                                                                   caplog):
    with caplog.at_level(logging.WARNING):
        plain = generate_load_kwargs(str(tiny_lm_dir), str(tiny_adapter_dir), None)
        asked = generate_load_kwargs(str(tiny_lm_dir), str(tiny_adapter_dir), True)
    assert plain["quantization_config"] is None and plain["torch_dtype"] == "auto"
    assert asked["quantization_config"].load_in_4bit
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and f"has no {RECORD_FILE}" in notes[0]


def test_evaluate_loads_as_the_recipe_says_and_says_when_training_differed(trained, tmp_path,
                                                                            monkeypatch, caplog):
    from rrhf_lite.config.recipe import parse_recipe
    from rrhf_lite.stages import evaluate
    from rrhf_lite.stages.run_context import RunState

    class Loaded(Exception):
        pass

    seen = {}

    def load_causal_lm(name, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(evaluate, "load_causal_lm", load_causal_lm)
    recipe = parse_recipe({"model": {"name_or_path": "m"}, "output_dir": str(tmp_path),
                           "stages": ["evaluate"], "quantization": {"load_in_4bit": False},
                           "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"}})
    state = RunState(recipe=recipe, run_dir=tmp_path, base_model="m", stages=["evaluate"])
    with caplog.at_level(logging.WARNING), pytest.raises(Loaded):
        evaluate.evaluate_variant(state, None, trained, {}, [], None, str(tmp_path / "x"))
    assert seen["quantization_config"] is None  # the recipe's choice
    assert any("the recipe's quantization section" in r.getMessage() for r in caplog.records)


def test_merge_defaults_to_the_record_and_its_card_has_the_run_s_numbers(
        trained, tiny_world_base, tmp_path, caplog):
    from rrhf_lite.stages.merge import merge_adapter

    report = merge_adapter(None, trained, tmp_path / "merged", torch_dtype="float32")
    assert report["ok"] and report["base_model"] == tiny_world_base
    assert report["roundtrip"]["quant_type"] == "nf4" and report["roundtrip"]["double_quant"]
    assert report["policy_verification"]["ok"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "## How it was merged" in card
    assert "| reward/held_out | 0.25 | 0.4375 | 0.5625 |" in card  # metrics.json's numbers
    assert "| perplexity | 9.5 | 8.125 |  |" in card
    assert "# tiny_test (rrhf):" in card
    with caplog.at_level(logging.WARNING):
        plain = merge_adapter(None, trained, tmp_path / "plain", torch_dtype="float32",
                              roundtrip_nf4=False, verify_prompts=[])
    assert plain["roundtrip"] is None
    assert any("not as it was trained" in r.getMessage() for r in caplog.records)


def test_the_cli_flags_default_to_the_record_and_have_help():
    parser = build_parser()
    gen = parser.parse_args(["generate", "--adapter", "a"])
    assert gen.model is None and gen.load_in_4bit is None
    assert parser.parse_args(["generate", "--adapter", "a", "--no-load-in-4bit"]).load_in_4bit is False
    merge = parser.parse_args(["merge", "--adapter", "a", "--out", "o"])
    assert merge.base is None and merge.roundtrip_nf4 is None
    assert parser.parse_args(["merge", "--adapter", "a", "--out", "o",
                              "--no-roundtrip-nf4"]).roundtrip_nf4 is False
    generate_help = next(a for a in parser._subparsers._group_actions[0].choices["generate"]._actions
                         if "--load-in-4bit" in a.option_strings)
    assert "rrhf_lite.json" in generate_help.help


def test_shared_names_and_their_offline_way_back(monkeypatch, tmp_path):
    from rrhf_lite.builtin import smollm2

    assert sources.shareable_model_name(sources.SMOLLM2) == smollm2.HUB_NAME
    assert sources.shareable_model_name(sources.TINY_WORLD) == sources.TINY_WORLD
    for given in ("meta-llama/Llama-3.1-8B", "models/my-llama", str(tmp_path)):
        assert sources.shareable_model_name(given) == given  # what the user chose
    # the hub name, not in the local hub cache: the built-in conversion (no download tried)
    monkeypatch.setattr(smollm2, "build_smollm2", lambda: tmp_path / "converted")
    monkeypatch.setattr(sources, "hub_files_cached", lambda name: False)
    assert sources.loadable_model(smollm2.HUB_NAME) == str(tmp_path / "converted")
    monkeypatch.setattr(sources, "hub_files_cached", lambda name: True)
    assert sources.loadable_model(smollm2.HUB_NAME) == smollm2.HUB_NAME


def test_a_damaged_record_is_the_user_s_to_fix(trained, tmp_path):
    import shutil

    copy = Path(shutil.copytree(trained, tmp_path / "adapter"))
    (copy / RECORD_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match=RECORD_FILE):
        generate_load_kwargs(None, str(copy), None)
    record = json.loads((trained / RECORD_FILE).read_text())
    for change in ({"format": 99}, {"quantization": {"load_in_4bit": True, "quant_type": "q3"}}):
        (copy / RECORD_FILE).write_text(json.dumps({**record, **change}))
        with pytest.raises(UserInputError, match=RECORD_FILE):
            read_adapter_record(copy)


# --- the real model: shared under its hub name, loaded offline from the built-in -----------------

SMOLLM2_ROWS = [{"prompt": [{"role": "user", "content": "Name a color. Use capital letters."}],
                 "responses": ["BLUE.", "blue"], "scores": [1.0, 0.0]}]


def test_smollm2_adapter_is_shared_under_the_hub_name_and_loads_offline(
        smollm2_dir, tmp_path, monkeypatch, capsys):
    import shutil
    import socket

    from rrhf_lite.builtin import smollm2
    from rrhf_lite.models.inference_loader import load_causal_lm
    from rrhf_lite.stages.train import run_train

    data = write_jsonl(tmp_path / "scored.jsonl", SMOLLM2_ROWS)
    args = ModelArguments(str(smollm2_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=False,
                          load_in_4bit=False, base_origin={"name": smollm2.NAME})
    adapter = run_train(str(data), args, rrhf_config(tmp_path / "train", max_steps=1,
                                                      per_device_train_batch_size=1,
                                                      max_length=40, max_prompt_length=32))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == smollm2.HUB_NAME
    card = (adapter / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {smollm2.HUB_NAME}" in front and "license: apache-2.0" in front
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'"{smollm2.HUB_NAME}",\n    dtype=torch.float32,' in snippet
    compile(snippet, "the card's snippet", "exec")  # it is Python a user can paste

    # no network from here on: a lookup on the hub would fail loudly instead of timing out
    def no_network(*_args, **_kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(sources, "hub_files_cached", lambda name: False)
    assert generate_load_kwargs(None, str(adapter), None)["model_name_or_path"] == str(smollm2_dir)
    shared = Path(shutil.copytree(adapter, tmp_path / "shared"))  # as PEFT alone would see it
    (shared / RECORD_FILE).unlink()
    assert generate_load_kwargs(None, str(shared), None)["model_name_or_path"] == str(smollm2_dir)

    assert main(["generate", "--adapter", str(adapter), "--prompt", "Name a color.",
                 "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.split("### answer\n", 1)[1].strip()
    policy, tokenizer = load_causal_lm(str(smollm2_dir), adapter_path=str(adapter),
                                       torch_dtype="float32")
    expected = generate_texts(policy, tokenizer, [[{"role": "user", "content": "Name a color."}]],
                              max_new_tokens=6)[0]
    assert answer and answer == expected.strip()
