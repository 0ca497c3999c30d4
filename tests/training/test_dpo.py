"""The DPO ablation (`method: dpo`): pairs from listwise data, RRHF's tokens, TRL's DPOTrainer
with the recipe's LoRA on a 4-bit tiny LLaMA, RRHF round 1's step count, a report row."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open

from rrhf_lite.builtin.tiny import build_char_tokenizer, save_tiny_causal_lm
from rrhf_lite.config.recipe import dump_recipe, load_recipe, parse_recipe
from rrhf_lite.data.tokenization import RRHFCollator, tokenize_example
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.training_loader import (
    ModelArguments,
    load_model_for_training,
    lora_config_from_args,
)
from rrhf_lite.training.dpo_pairs import best_worst_pairs, pretokenized_dpo_trainer, tokenize_pairs

LIMITS = {"max_length": 64, "max_prompt_length": 32}


@pytest.fixture(scope="module")
def small_chat_lm_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("dpo_lm") / "model", seed=0,
                               chat_template=True, hidden_size=32, intermediate_size=64,
                               num_heads=4, num_kv_heads=2)


def _rows(n_prompts=6, ties=1):
    """Listwise rows, k = 2..4, best = "good stuff", worst = "bad"; the last `ties` all tied."""
    rows = []
    for i in range(n_prompts):
        responses = ["fine", "good stuff", "bad", "bad!"][: 2 + i % 3]
        scores = [1.0, 2.0, 0.0, 0.0][: len(responses)]
        if len(responses) == 2:
            responses, scores = ["good stuff", "bad"], [2.0, 0.0]
        rows.append({"prompt": f"Q{i}: rate me", "responses": responses, "scores": scores})
    for i in range(ties):
        rows.append({"prompt": f"T{i}: tie", "responses": ["same", "other"], "scores": [0.5, 0.5]})
    return rows


# ------------------------------------------------------------------------------ pairs


def test_pairs_take_the_first_best_and_first_worst_and_skip_ties():
    rows = [
        {"prompt": "a", "responses": ["x", "y", "z", "w"], "scores": [1.0, 3.0, 3.0, -1.0]},
        {"prompt": "b", "responses": ["x", "y", "z"], "scores": [0.0, 2.0, 0.0]},  # worst: first 0
        {"prompt": "c", "responses": ["only"], "scores": [1.0]},  # k = 1: no pair
        {"prompt": "d", "responses": ["x", "y"], "scores": [2.0, 2.0]},  # all tied
        {"prompt": [{"role": "user", "content": "hi"}], "responses": ["p", "q"],
         "scores": [-2.0, 5.0]},
    ]
    pairs, skipped = best_worst_pairs(rows)
    assert skipped == 2
    assert [(p["prompt"], p["responses"], p["scores"]) for p in pairs] == [
        ("a", ["y", "w"], [3.0, -1.0]),
        ("b", ["y", "x"], [2.0, 0.0]),
        ([{"role": "user", "content": "hi"}], ["q", "p"], [5.0, -2.0]),
    ]


@pytest.mark.parametrize("chat", [False, True])
def test_pair_tokens_are_rrhfs_tokens_of_those_candidates(chat):
    """Chosen and rejected ids equal the ids RRHF training gives the same two candidates (chat
    template, EOS once, truncation), not a re-rendering of their text."""
    tokenizer = build_char_tokenizer(chat_template=chat)
    rows = _rows(ties=1)
    rows.append({"prompt": "long " * 10, "responses": ["w" * 40, "v"], "scores": [1.0, 0.0]})
    if chat:
        for row in rows:
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    pairs, skipped = best_worst_pairs(rows)
    tokenized, stats = tokenize_pairs(pairs, tokenizer, **LIMITS)
    assert skipped == 1 and len(tokenized) == len(rows) - 1
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 1
    for row, pair in zip([r for r in rows if len(set(r["scores"])) > 1], tokenized, strict=True):
        rrhf = tokenize_example(row, tokenizer, **LIMITS)
        best, worst = row["scores"].index(max(row["scores"])), row["scores"].index(min(row["scores"]))
        assert pair["prompt_ids"] == rrhf["prompt_ids"]
        assert pair["chosen_ids"] == rrhf["responses_ids"][best]
        assert pair["rejected_ids"] == rrhf["responses_ids"][worst]
        eos = tokenizer.eos_token_id
        if len(pair["prompt_ids"]) + len(pair["chosen_ids"]) < LIMITS["max_length"]:
            assert pair["chosen_ids"].count(eos) == 1 and pair["chosen_ids"][-1] == eos


# ------------------------------------------------------------------------------ recipe keys


def _recipe(tmp_path, ablation):
    return parse_recipe({"model": {"name_or_path": "some/model"}, "stages": ["train"],
                         "data": {"candidates": "c.jsonl"}, "output_dir": str(tmp_path / "run"),
                         "ablations": [ablation]})


@pytest.mark.parametrize("ablation, expected", [
    ({"name": "d", "method": "dpo", "dpo": {"betta": 0.1}}, r"ablations\.0\.dpo\.betta.*'beta'"),
    ({"name": "d", "method": "dpo", "dpo": {"beta": 0}}, r"ablations\.0\.dpo\.beta"),
    ({"name": "d", "method": "dpo", "dpo": {"loss_type": "kto"}}, r"ablations\.0\.dpo\.loss_type"),
    ({"name": "d", "method": "ppo"}, r"ablations\.0\.method"),
    ({"name": "d", "dpo": {"beta": 0.2}}, "add method: dpo"),
    ({"name": "d", "method": "dpo", "train": {"rank_weight": 0.0}}, "train.rank_weight"),
    ({"name": "d", "method": "dpo", "train": {"lerning_rate": 1e-4}}, "'learning_rate'"),
    ({"name": "d"}, "changes some train"),
])
def test_bad_ablation_keys_name_the_key(tmp_path, ablation, expected):
    with pytest.raises(UserInputError, match=expected):
        _recipe(tmp_path, ablation)


def test_dpo_section_defaults_and_overrides(tmp_path):
    default = _recipe(tmp_path, {"name": "dpo", "method": "dpo"}).ablations[0]
    assert (default.dpo.beta, default.dpo.loss_type, default.dpo.max_steps) == (0.1, "sigmoid", None)
    set_ = _recipe(tmp_path, {"name": "dpo", "method": "dpo", "train": {"learning_rate": 1e-4},
                              "dpo": {"beta": 0.5, "loss_type": "ipo"}}).ablations[0]
    assert (set_.dpo.beta, set_.dpo.loss_type, set_.train) == (0.5, "ipo", {"learning_rate": 1e-4})
    # the resolved recipe a run saves reads back as itself (a rerun must match it to resume)
    recipe = _recipe(tmp_path, {"name": "dpo", "method": "dpo"})
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert dump_recipe(again) == dump_recipe(recipe) and again.ablations[0].dpo.beta == 0.1


def test_step_count_is_rrhf_round_ones(tmp_path):
    """dpo.max_steps if set, else round 1's recorded global_step, else what the Trainer would
    take for round 1's train section (ceil(ceil(rows / batch) / accumulation) x epochs)."""
    from rrhf_lite.stages.train_dpo import dpo_steps

    def steps(dpo=None, train=None, summary=None):
        recipe = parse_recipe({"model": {"name_or_path": "m"}, "stages": ["train"],
                               "data": {"candidates": "c.jsonl"}, "train": train or {},
                               "ablations": [{"name": "d", "method": "dpo", "dpo": dpo or {}}]})
        round1 = tmp_path / "round-1" / "train"
        round1.mkdir(parents=True, exist_ok=True)
        (round1 / "train_summary.json").unlink(missing_ok=True)
        if summary is not None:
            (round1 / "train_summary.json").write_text(json.dumps(summary))
        return dpo_steps(recipe, recipe.ablations[0], round1, _rows(n_prompts=9, ties=1))

    assert steps(summary={"global_step": 7})[0] == 7
    assert steps(dpo={"max_steps": 2}, summary={"global_step": 7}) == (2, "dpo.max_steps")
    assert steps(train={"max_steps": 4})[0] == 4
    # 10 rows, batch 3 -> 4 batches, accumulation 3 -> 2 steps an epoch, 2.5 epochs -> 5
    computed = steps(train={"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3,
                            "num_train_epochs": 2.5})
    assert computed == (5, "as RRHF round 1, computed from the train section")


# ------------------------------------------------------------------------------ training


def _sequence_logps(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    start = len(prompt_ids) - 1
    return logps[start:].gather(-1, targets[start:, None]).sum()


@torch.no_grad()
def _dpo_loss_and_margin(model, pairs, beta):
    """Mean DPO loss and chosen-minus-rejected log-ratio margin; reference = adapter off."""
    margins = []
    for pair in pairs:
        own = [_sequence_logps(model, pair["prompt_ids"], pair[k]) for k in ("chosen_ids", "rejected_ids")]
        with model.disable_adapter():
            ref = [_sequence_logps(model, pair["prompt_ids"], pair[k]) for k in ("chosen_ids", "rejected_ids")]
        margins.append(float((own[0] - ref[0]) - (own[1] - ref[1])))
    losses = [-torch.nn.functional.logsigmoid(torch.tensor(beta * m)).item() for m in margins]
    return sum(losses) / len(losses), sum(margins) / len(margins)


def _dpo_config(out, steps, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(out), max_steps=steps, learning_rate=5e-3, bf16=False, fp16=False,
                per_device_train_batch_size=3, gradient_accumulation_steps=1, report_to="none",
                logging_steps=1, save_strategy="no", max_length=LIMITS["max_length"],
                disable_dropout=False, lr_scheduler_type="constant", seed=0, disable_tqdm=True,
                dataloader_pin_memory=False, activation_checkpointing=False)
    base.update(kw)
    return DPOConfig(**base)


def test_dpo_trains_rrhfs_tokens_against_the_adapter_free_base(small_chat_lm_dir, tmp_path):
    """On a 4-bit base + the recipe's LoRA: the batch DPOTrainer trains on holds RRHF's
    sequence for the chosen candidate; the reference is the base (no second adapter); the
    adapter stays float32; a few steps lower the DPO loss and widen the margin."""
    from rrhf_lite.stages.train_dpo import run_train_dpo

    args = ModelArguments(str(small_chat_lm_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          gradient_checkpointing=False)
    rows = _rows()
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    model, tokenizer = load_model_for_training(args, add_lora=False)
    pairs, _ = tokenize_pairs(best_worst_pairs(rows)[0], tokenizer, **LIMITS)
    from datasets import Dataset

    trainer = pretokenized_dpo_trainer()(
        model=model, args=_dpo_config(tmp_path / "probe", 1),
        train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=lora_config_from_args(args))
    assert list(trainer.model.peft_config) == ["default"]  # reference = adapter disabled
    assert all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters() if "lora_" in n)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    rrhf = RRHFCollator(tokenizer.pad_token_id)([tokenize_example(rows[0], tokenizer, **LIMITS)])
    best = rows[0]["scores"].index(max(rows[0]["scores"]))
    n = int(rrhf["attention_mask"][best].sum())
    assert batch["input_ids"][0, :n].tolist() == rrhf["input_ids"][best, :n].tolist()
    assert int(batch["attention_mask"][0].sum()) == n
    trained = (batch["completion_mask"][0, :n] == 1).tolist()
    assert trained == (rrhf["labels"][best, :n] != -100).tolist()  # the same tokens are trained
    del trainer, model

    out = run_train_dpo(rows, args, _dpo_config(tmp_path / "out", 8),
                        max_prompt_length=LIMITS["max_prompt_length"])
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["seconds_per_step"] > 0
    assert summary["data"] == {"prompts": 7, "pairs": 6, "skipped_tied_prompts": 1}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}

    policy, _ = load_model_for_training(ModelArguments(**{**vars(args), "adapter_init_path": str(out)}))
    policy.eval()
    loss, margin = _dpo_loss_and_margin(policy, pairs, beta=0.1)
    # before training the adapter is a no-op (LoRA B = 0): margin 0, loss log 2
    assert margin > 0.5 and loss < math.log(2) - 0.01


# ------------------------------------------------------------------------------ the pipeline


def test_dpo_ablation_in_a_run_steps_like_rrhf_and_gets_a_report_row(tiny_lm_dir, tmp_path, capsys):
    """A run with RRHF and a DPO ablation: the DPO adapter lies where ablations go, took as many
    optimiser steps as RRHF's round 1 (not its own epoch count), and is a row of the report
    with its time per step beside RRHF's."""
    from rrhf_lite.builtin.tiny.tasks import reward
    from rrhf_lite.cli import main

    prompts = ["sort 321=", "copy abc=", "sort 213=", "copy xy=", "sort 31=", "copy q="]
    rows = []
    for i, prompt in enumerate(prompts):
        responses = ["123", "321", "12"] if i % 2 == 0 else ["abc", "x", "abc", "ab"][: 2 + i % 3]
        scores = reward([prompt] * len(responses), responses)
        if i >= 4:  # two prompts whose candidates tie: DPO has 4 pairs, RRHF 6 prompts
            responses, scores = ["a", "b"], [0.0, 0.0]
        rows.append({"prompt": prompt, "responses": responses, "scores": scores})
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"prompt": "sort 132="}\n{"prompt": "copy zz="}\n')
    recipe = {
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"name_or_path": str(tiny_lm_dir)}, "stages": ["train", "evaluate"],
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"candidates": str(candidates), "eval_prompts": str(held_out)},
        "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"},
        # 6 prompts, batch 1 x 2: 3 steps per epoch; DPO's 4 pairs alone would make 2
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 1,
                  "gradient_accumulation_steps": 2, "gradient_checkpointing": False,
                  "logprob_backend": "torch", "max_length": 32, "max_prompt_length": 16,
                  "save_steps": 1000, "warmup_ratio": 0.0},
        "evaluate": {"max_new_tokens": 4, "best_of_n": False, "plots": False, "batch_size": 2},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": 2}],
                     "max_new_tokens": 4, "include_dataset_responses": False},
        "ablations": [{"name": "dpo", "method": "dpo", "dpo": {"beta": 0.2},
                       "train": {"learning_rate": 1e-3}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    load_recipe(path)
    assert main(["run", str(path)]) == 0

    run = tmp_path / "run"
    rrhf = json.loads((run / "round-1" / "train" / "train_summary.json").read_text())
    dpo = json.loads((run / "ablations" / "dpo" / "train" / "train_summary.json").read_text())
    assert (run / "ablations" / "dpo" / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert rrhf["global_step"] == 3 and dpo["global_step"] == 3
    # the trainer's first-batch choices, kept and said: a plain LLaMA shares its prompts
    assert rrhf["forward"]["share_prompt"] is True and rrhf["forward"]["logprob_path"] == "hidden"
    assert "each prompt ran once for its candidates" in capsys.readouterr().out
    assert dpo["data"]["pairs"] == 4 and dpo["data"]["skipped_tied_prompts"] == 2
    assert "round-1" in dpo["optimizer_steps_from"]
    history = [json.loads(line) for line in (run / "ablations" / "dpo" / "train" / "metrics.jsonl").open()]
    assert [h["learning_rate"] for h in history if "loss" in h][0] == pytest.approx(1e-3)
    # the DPO adapter records its base and objective, and its card says DPO and beta (issue 27)
    record = json.loads((run / "ablations" / "dpo" / "train" / "adapter" / "rrhf_lite.json")
                        .read_text())
    assert record["training"]["objective"] == {"method": "dpo", "beta": 0.2,
                                               "loss_type": "sigmoid", "label_smoothing": 0.0}
    assert record["training"]["ablation"] == "dpo" and record["training"]["global_step"] == 3
    card = (run / "ablations" / "dpo" / "train" / "adapter" / "README.md").read_text()
    assert "- dpo" in card and "| beta | 0.2 |" in card and "pairs 4" in card

    report = json.loads((run / "metrics.json").read_text())
    variants = report["metrics"]["variants"]
    assert set(variants) == {"initial", "rrhf", "dpo"}
    assert variants["dpo"]["train/s_per_step"] > 0 and variants["rrhf"]["train/s_per_step"] > 0
    assert "reward/held_out" in variants["dpo"]
    text = (run / "report.md").read_text()
    assert "| dpo" in text and "dpo: DPO (sigmoid, beta 0.2) on 4 best-vs-worst pairs" in text


def test_smollm2_dpo_step_on_rrhfs_tokens(smollm2_dir, tmp_path):
    """The real model (BPE tokenizer, chat template, NF4 + LoRA): DPOTrainer's batch holds
    RRHF's ids for the chosen candidate (no second template, EOS once), and one step trains."""
    from datasets import Dataset

    args = ModelArguments(str(smollm2_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          gradient_checkpointing=False)
    row = {"prompt": [{"role": "user", "content": "What is 2 + 2? Answer with a number only."}],
           "responses": ["Four.", "4", "The answer is 4."], "scores": [0.5, 1.0, 0.0]}
    model, tokenizer = load_model_for_training(args, add_lora=False)
    pairs, _ = tokenize_pairs(best_worst_pairs([row])[0], tokenizer, max_length=96,
                              max_prompt_length=64)
    trainer = pretokenized_dpo_trainer()(
        model=model, args=_dpo_config(tmp_path, 1, per_device_train_batch_size=1, max_length=96),
        train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=lora_config_from_args(args))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    rrhf = tokenize_example(row, tokenizer, max_length=96, max_prompt_length=64)
    chosen = rrhf["prompt_ids"] + rrhf["responses_ids"][1]
    assert batch["input_ids"][0, :len(chosen)].tolist() == chosen
    assert tokenizer.decode(rrhf["responses_ids"][1]) == "4" + tokenizer.eos_token
    assert rrhf["responses_ids"][1].count(tokenizer.eos_token_id) == 1  # the template's own
    # closing markup after EOS ("<|im_end|>\n") is dropped, as for a sampled response
    assert tokenizer.decode(rrhf["prompt_ids"]).endswith("<|im_start|>assistant\n")
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.metrics["train_loss"])
