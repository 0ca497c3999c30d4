"""The tiny world: graded rule rewards, disjoint seeded prompt sets, the cached warm-up policy."""

from __future__ import annotations

import importlib
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_lite.builtin.tiny import tasks, warmup
from rrhf_lite.builtin.tiny.tasks import (
    TASKS,
    is_held_out,
    make_splits,
    parse_prompt,
    reward,
    sample_prompts,
    solve,
    write_prompt_sets,
)
from rrhf_lite.builtin.tiny.warmup import build_initial_policy, corrupt, habit, noisy_demonstration
from rrhf_lite.builtin.tiny.world import generate, measure_policy
from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import read_jsonl

# A model small enough that a few warm-up steps take well under a second.
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64, "num_demonstrations": 50, "batch_size": 8}


# --- reward ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("sort 3142=", "1234", 1.0),
        ("sort 3142=", "1243", 0.5),  # two of four places right
        ("sort 3142=", "123", 0.75),  # one missing
        ("sort 3142=", "12345", 0.8),  # one extra: never a full score
        ("sort 3142=", "zzzz", 0.0),
        ("sort 3142=", "", 0.0),
        ("reverse abcd=", "dcba", 1.0),
        ("reverse abcd=", "dcab", 0.5),
        ("reverse abcd=", "abcd", 0.0),  # echoing the input is no reversal
        ("copy xyz=", "xyz", 1.0),
        ("copy xyz=", " xyz ", 1.0),  # surrounding whitespace is ignored
        ("copy xyz=", "xyq", 2 / 3),
        ("add 12+7=", "19", 1.0),
        ("add 12+7=", "18", 0.5),  # tens digit right
        ("add 12+7=", "9", 0.5),  # units digit right, tens missing
        ("add 95+8=", "103", 1.0),
        ("add 95+8=", "13", 1 / 3),  # aligned on the units digit: only the 3 is in place
        ("add 12+7=", "abc", 0.0),
        ("count b abbcb=", "3", 1.0),
        ("count b abbcb=", "2", 2 / 3),
        ("count b abbcb=", "5", 1 / 3),
        ("count b abbcb=", "9", 0.0),
        ("count b abbcb=", "three", 0.0),
        ("what is this=", "anything", 0.0),  # not a tiny-world prompt
    ],
)
def test_reward_is_graded(prompt, response, expected):
    assert reward([prompt], [response]) == [pytest.approx(expected)]


def test_reward_is_one_exactly_for_the_right_answer_on_every_task():
    prompts = sample_prompts(200, seed=3, tasks=TASKS)
    assert {parse_prompt(p)[0] for p in prompts} == set(TASKS)
    assert reward(prompts, [solve(p) for p in prompts]) == [1.0] * len(prompts)


def test_reward_stays_in_unit_interval_on_random_text():
    rng = random.Random(0)
    prompts = sample_prompts(100, seed=4)
    junk = ["".join(rng.choice("0123456789abc +=") for _ in range(rng.randint(0, 14)))
            for _ in prompts]
    assert all(0.0 <= r <= 1.0 for r in reward(prompts, junk))


def test_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        reward(["copy ab="], [])


def test_reward_is_importable_the_way_the_score_stage_names_it():
    module, name = "rrhf_lite.builtin.tiny.tasks:reward".split(":")
    fn = getattr(importlib.import_module(module), name)
    assert fn(["add 1+1="], ["2"]) == [1.0]


def test_solve_rejects_foreign_prompts():
    with pytest.raises(UserInputError):
        solve("tell me a joke=")


# --- prompt sets ----------------------------------------------------------------------------

def test_splits_are_disjoint_deterministic_and_seeded():
    train, held_out = make_splits(300, 100, seed=0)
    assert len(train) == len(set(train)) == 300
    assert len(held_out) == len(set(held_out)) == 100
    assert not set(train) & set(held_out)
    assert all(is_held_out(p) for p in held_out) and not any(is_held_out(p) for p in train)
    assert make_splits(300, 100, seed=0) == (train, held_out)
    other_train, other_held_out = make_splits(300, 100, seed=1)
    assert other_train != train and other_held_out != held_out
    # held-out prompts stay held out whatever the seed: never a training prompt of another seed
    assert not set(other_train) & set(held_out)


def test_prompts_and_answers_are_short():
    train, held_out = make_splits(1000, 200, seed=0)
    assert max(len(p) for p in train + held_out) <= 24
    assert max(len(solve(p)) for p in train + held_out) <= 12


def test_write_prompt_sets(tmp_path):
    paths = write_prompt_sets(tmp_path, n_train=20, n_eval=10, seed=2)
    train, held_out = read_jsonl(paths["train"]), read_jsonl(paths["eval"])
    assert len(train) == 20 and len(held_out) == 10
    for row in train + held_out:
        assert row["reference"] == solve(row["prompt"])
        assert row["task"] == parse_prompt(row["prompt"])[0]
    assert [r["prompt"] for r in held_out] == make_splits(20, 10, seed=2)[1]


# --- noisy demonstrations ---------------------------------------------------------------------

def test_corruptions_are_wrong_but_close():
    rng = random.Random(0)
    prompts = sample_prompts(300, seed=5, tasks=TASKS)
    for prompt in prompts:
        bad = corrupt(prompt, solve(prompt), rng)
        assert bad != solve(prompt), prompt
        assert reward([prompt], [bad])[0] < 1.0
    # most corruptions keep some credit: that is what makes rewards spread out
    bad_rewards = reward(prompts, [corrupt(p, solve(p), rng) for p in prompts])
    assert sum(r > 0 for r in bad_rewards) > 0.6 * len(prompts)


def test_noisy_demonstrations_are_right_about_p_of_the_time():
    rng = random.Random(1)
    prompts = sample_prompts(2000, seed=6)
    right = sum(noisy_demonstration(p, rng, 0.3) == solve(p) for p in prompts) / len(prompts)
    assert 0.25 < right < 0.35


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("count b abbcb=", "4"),  # one too many
        ("add 38+44=", "72"),  # carry forgotten
        ("add 12+7=", "19"),  # no carry: the habit does not bite
        ("reverse abc=", "abc"),  # copied instead of reversed
        ("copy abcd=", "abc"),  # last character dropped
        ("sort 3113=", "13"),  # repeated digits written once
    ],
)
def test_habits(prompt, expected):
    assert habit(prompt) == expected
    score = reward([prompt], [expected])[0]
    assert score == 1.0 if expected == solve(prompt) else 0.0 <= score < 1.0


def test_noisy_demonstrations_mix_right_habit_and_slips():
    rng = random.Random(2)
    prompts = [p for p in sample_prompts(3000, seed=7) if habit(p) != solve(p)]
    demos = [noisy_demonstration(p, rng, p_correct=0.4, p_habit=0.45) for p in prompts]
    right = sum(d == solve(p) for p, d in zip(prompts, demos, strict=True)) / len(prompts)
    habitual = sum(d == habit(p) for p, d in zip(prompts, demos, strict=True)) / len(prompts)
    assert 0.35 < right < 0.45 and 0.40 < habitual < 0.50


# --- warm-up policy and its cache -----------------------------------------------------------------

def test_build_initial_policy_saves_a_loadable_model_and_reuses_the_cache(tmp_path, monkeypatch):
    path = build_initial_policy(cache_dir=tmp_path, seed=0, steps=3, progress=False, **TINY)
    assert path.parent == tmp_path
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")]
    responses = generate(model, tokenizer, ["copy ab=", "add 1+2="], num_return_sequences=2,
                         do_sample=True)
    assert [len(r) for r in responses] == [2, 2]

    # The second call must not train again.
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(warmup, "train_initial_policy", no_training)
    assert build_initial_policy(cache_dir=tmp_path, seed=0, steps=3, progress=False,
                                **TINY) == path
    with pytest.raises(AssertionError, match="trained again"):
        build_initial_policy(cache_dir=tmp_path, seed=0, steps=3, progress=False, force=True,
                             **TINY)
    # other settings, other cache entry
    with pytest.raises(AssertionError, match="trained again"):
        build_initial_policy(cache_dir=tmp_path, seed=1, steps=3, progress=False, **TINY)


def test_cache_location_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RRHF_LITE_CACHE", str(tmp_path))
    assert warmup.default_cache_dir() == tmp_path / "tiny-world"


def test_measure_policy_reports_rates(tmp_path):
    path = build_initial_policy(cache_dir=tmp_path, seed=0, steps=2, progress=False, **TINY)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_splits(0, 5, seed=0)[1]
    metrics = measure_policy(model, tokenizer, prompts, k=3)
    for key in ("greedy_reward", "greedy_exact", "sample_reward", "best_of_k_reward",
                "non_tied_fraction"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["best_of_k_reward"] >= metrics["sample_reward"]
    assert metrics["num_prompts"] == 5 and metrics["k"] == 3


def test_tasks_module_names_every_task_in_its_parser():
    for task in TASKS:
        prompt = sample_prompts(1, seed=0, tasks=(task,))[0]
        assert parse_prompt(prompt)[0] == task
    assert tasks.parse_prompt("sort 12=x") is None
