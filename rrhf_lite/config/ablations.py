"""The recipe's `ablations` entries: variants trained on round 1's candidates, beside the run's
own rounds (RRHF with some train.* keys changed, or DPO through TRL)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rrhf_lite.config.sections import Section, TrainSection, unknown_key_message

# Variant names the run gives itself (evaluation rows, eval/ files, plots): not for ablations.
RESERVED_VARIANTS = re.compile(r"initial|rrhf|rrhf_round\d+|best-of-n")
ABLATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# train.* keys of the RRHF objective alone: a DPO ablation has no use for them.
RRHF_ONLY_TRAIN_KEYS = ("length_penalty", "rank_weight", "sft_weight", "candidate_micro_batch_size",
                        "logprob_backend", "logprob_path", "loss_type", "beta")


class DpoSection(Section):
    """Settings of a `method: dpo` ablation: TRL's DPOTrainer on each prompt's best-vs-worst pair
    of the round-1 candidates (the rest, LoRA, learning rate, schedule and batch, is the train
    section's, with the ablation's `train` overrides)."""

    beta: float = Field(0.1, gt=0.0, description="Strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = Field(
        "sigmoid", description="sigmoid = DPO; hinge (SLiC), ipo, robust: TRL's variants")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="robust: probability that a pair's order is wrong")
    max_steps: int | None = Field(
        None, gt=0, description="Optimiser steps; None = as many as RRHF's round 1 took")


class AblationSection(Section):
    """A variant trained on round 1's candidates, from the initial model.

    method "rrhf" (default): rrhf-lite's trainer with some train.* keys changed (e.g. no rank
    loss, or another objective: `train: {loss_type: pl_dpo}`, so one run compares objectives on
    the same candidates), given in
    `train`. method "dpo": DPO (TRL's DPOTrainer) on each prompt's best-vs-worst pair, with the
    same LoRA and as many optimiser steps as RRHF's round 1; `dpo` holds its settings and
    `train` may override the train section's learning rate, schedule or batch.

    `name` becomes a directory (ablations/<name>/) and a row of the report: letters, digits,
    "_", "-", "." (not first), and none of the run's own variant names (initial, rrhf,
    rrhf_round<N>, best-of-n).
    """

    name: str
    method: Literal["rrhf", "dpo"] = "rrhf"
    train: dict[str, Any] = Field(default_factory=dict)
    dpo: DpoSection | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value):
        if not ABLATION_NAME.fullmatch(value):
            raise ValueError("use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                             "or digit (the name becomes a directory)")
        if RESERVED_VARIANTS.fullmatch(value):
            raise ValueError(f"{value!r} names one of the run's own variants; choose another name")
        return value

    @field_validator("train")
    @classmethod
    def _known_train_keys(cls, value):
        for key in value:
            if key not in TrainSection.model_fields:
                raise ValueError(unknown_key_message(key, TrainSection.model_fields))
        return value

    @model_validator(mode="after")
    def _settings_fit_the_method(self):
        if self.method == "rrhf":
            if self.dpo is not None:
                raise ValueError("key 'dpo' is for DPO ablations: add method: dpo, or remove it")
            if not self.train:
                raise ValueError("an RRHF ablation changes some train.* keys: add e.g. train: "
                                 "{rank_weight: 0.0}, or set method: dpo")
            return self
        unused = [key for key in self.train if key in RRHF_ONLY_TRAIN_KEYS]
        if unused:
            raise ValueError(f"train.{unused[0]} belongs to the RRHF loss; a DPO ablation does "
                             f"not use it: remove it (DPO settings go under 'dpo')")
        if self.dpo is None:
            self.dpo = DpoSection()
        return self
