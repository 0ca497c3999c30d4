"""Train stage, DPO variant (an ablation with `method: dpo`): listwise data -> each prompt's
best-vs-worst pair -> LoRA adapter through TRL's DPOTrainer.

What is the same as RRHF's round 1, so that the two compare: the base model loaded the same way
(4-bit + the recipe's LoRA, rrhf_lite.models.training_loader), the tokens (rrhf_lite.training.dpo_pairs), the learning rate,
schedule, warm-up, batch and accumulation (the train section, with the ablation's `train`
overrides), and the number of optimiser steps (what round 1 took, from its train_summary.json).
The reference model is the base with the adapter disabled (PEFT). The adapter is saved where
ablation adapters go, with metrics.jsonl and train_summary.json (seconds per step included).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

from rrhf_lite.config.ablations import AblationSection
from rrhf_lite.config.recipe import Recipe
from rrhf_lite.data.listwise import load_listwise
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.training_loader import (
    ModelArguments,
    load_model_for_training,
    lora_config_from_args,
)
from rrhf_lite.stages.adapter_files import RecordCheckpoints, adapter_record
from rrhf_lite.stages.train import (
    model_arguments,
    precision_flags,
    recipe_provenance,
    save_trained,
    train_section,
)
from rrhf_lite.training.dpo_pairs import best_worst_pairs, pretokenized_dpo_trainer, tokenize_pairs
from rrhf_lite.utils.console import say

logger = logging.getLogger(__name__)


def run_train_dpo(data: Any, model_args: ModelArguments, config, *, max_prompt_length: int | None,
                  truncation_side: str = "left", resume_from_checkpoint: str | None = None,
                  summary: dict | None = None, provenance: dict | None = None) -> Path:
    """Train DPO on the best-vs-worst pairs of listwise `data`; return the adapter directory.

    config: a trl.DPOConfig (its max_length, with max_prompt_length and truncation_side, cut the
    tokens as RRHF's train section does). summary: extra entries for train_summary.json.
    Writes into config.output_dir: adapter/ (or model/ without LoRA; with its record and
    model card, as run_train's), metrics.jsonl and train_summary.json (pairs, prompts skipped
    for tied scores, steps, seconds per step). provenance: as run_train's.
    """
    from datasets import Dataset

    examples = load_listwise(data, require_scores=True)
    pairs, skipped = best_worst_pairs(examples)
    if skipped:
        logger.warning("dpo: skipped %d of %d prompts whose candidates' scores all tie (no "
                       "preference to learn)", skipped, len(examples))
    # the prepared base; DPOTrainer adds the recipe's LoRA itself and disables it for the
    # reference model (with an adapter already on, it would copy it as a second, "ref" adapter)
    model, tokenizer = load_model_for_training(model_args, add_lora=False)
    rows, stats = tokenize_pairs(pairs, tokenizer, max_length=config.max_length,
                                 max_prompt_length=max_prompt_length,
                                 truncation_side=truncation_side)
    if not rows:
        raise UserInputError(
            f"no preference pair to train DPO on: {skipped} of {len(examples)} prompts have "
            f"candidates with equal scores, {stats.rows_dropped} leave no room for a response",
            where=str(data), hint="DPO needs prompts whose candidates' scores differ")
    peft_config = lora_config_from_args(model_args) if model_args.use_lora else None
    trainer = pretokenized_dpo_trainer()(
        model=model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config)
    counts = {"method": "dpo", "data": {"prompts": len(examples), "pairs": len(rows),
                                        "skipped_tied_prompts": skipped}}
    record = functools.partial(adapter_record, trainer, model, model_args, data, counts,
                               provenance)
    trainer.add_callback(RecordCheckpoints(lambda step: record()))
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return save_trained(trainer, tokenizer, result, use_lora=model_args.use_lora,
                        resumed=bool(resume_from_checkpoint), summary={
                            **counts,
                            "tokenization": stats.as_dict(),
                            **(summary or {}),
                        }, record=record)


# --- from a recipe --------------------------------------------------------------------------


def train_dpo_ablation(recipe: Recipe, ablation: AblationSection, base_model: str, data: Any,
                       out: Path, *, round1_train: Path, resume: Path | None = None) -> Path:
    """A `method: dpo` ablation of a recipe: train on round 1's `data` into out/adapter, for as
    many optimiser steps as RRHF's round 1 (trained into `round1_train`) took."""
    steps, source = dpo_steps(recipe, ablation, round1_train, data)
    dpo = ablation.dpo
    say(f"ablation '{ablation.name}': DPO ({dpo.loss_type}, beta {dpo.beta}) on round 1's "
        f"best-vs-worst pairs, {steps} optimiser steps ({source}) -> {out}")
    section = train_section(recipe, ablation.train)
    return run_train_dpo(
        str(data), model_arguments(recipe, base_model),
        dpo_training_config(recipe, out, ablation, steps),
        max_prompt_length=section.max_prompt_length, truncation_side=section.truncation_side,
        resume_from_checkpoint=str(resume) if resume else None,
        summary={"optimizer_steps_from": source, "dpo": dpo.model_dump(),
                 "train_overrides": ablation.train},
        provenance={**recipe_provenance(recipe), "ablation": ablation.name},
    )


def dpo_training_config(recipe: Recipe, output_dir: Path, ablation: AblationSection,
                        max_steps: int):
    """trl.DPOConfig from the train section (with the ablation's overrides) and its dpo one."""
    from trl import DPOConfig

    section = train_section(recipe, ablation.train)
    dpo = ablation.dpo
    return DPOConfig(
        output_dir=str(output_dir), seed=recipe.seed, max_steps=max_steps,
        learning_rate=section.learning_rate, lr_scheduler_type=section.lr_scheduler_type,
        warmup_steps=section.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=section.weight_decay,
        per_device_train_batch_size=section.per_device_train_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        logging_steps=section.logging_steps, save_steps=section.save_steps,
        save_total_limit=section.save_total_limit, report_to=section.report_to,
        **precision_flags(section),  # explicit: TRL's own default is bf16, even on a CPU
        activation_checkpointing=section.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=section.max_length,
        beta=dpo.beta, loss_type=[dpo.loss_type], label_smoothing=dpo.label_smoothing,
        # TRL turns dropout off by default; RRHF trains with the recipe's LoRA dropout, and the
        # reference (adapter disabled) has none either way
        disable_dropout=False,
        **section.extra,
    )


def dpo_steps(recipe: Recipe, ablation: AblationSection, round1_train: Path, data: Any
              ) -> tuple[int, str]:
    """(optimiser steps for a DPO ablation, where the number comes from): dpo.max_steps when
    set, else what RRHF's round 1 took (its train_summary.json in `round1_train`), else what
    transformers' Trainer takes for round 1's train section on `data` (one device, before any
    row is dropped for length)."""
    if ablation.dpo.max_steps:
        return ablation.dpo.max_steps, "dpo.max_steps"
    summary = round1_train / "train_summary.json"
    if summary.exists():
        steps = json.loads(summary.read_text(encoding="utf-8")).get("global_step")
        if isinstance(steps, int) and steps > 0:
            return steps, f"as RRHF round 1, {summary}"
    section = recipe.train
    if section.max_steps > 0:
        return section.max_steps, "as RRHF round 1, train.max_steps"
    batches = math.ceil(len(load_listwise(data, require_scores=True, warn=False))
                        / section.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / section.gradient_accumulation_steps), 1)
    return (math.ceil(section.num_train_epochs * per_epoch),
            "as RRHF round 1, computed from the train section")
