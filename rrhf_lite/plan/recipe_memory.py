"""`rrhf-lite plan RECIPE`: the memory plan of every stage a recipe lists on a given card (the
training step by part, sampling, scoring, evaluation; the merge in host memory), and the largest
candidate micro-batch and max_length that fit.

Training parts: rrhf_lite.plan.memory_parts (checked against a profiled step,
benchmarks/plan_by_part.py); the other stages: rrhf_lite.plan.stage_memory (counted, not
measured). Stages run one model at a time (evaluation's scoring holds the policy and the reward
model at once), so the card must hold the largest of them.
"""

from __future__ import annotations

import re

from rrhf_lite.data.candidate_stats import planned_k
from rrhf_lite.errors import UserInputError
from rrhf_lite.plan.memory_parts import (
    REFERENCE_LOSS_TYPES,
    GiB,
    Regime,
    StepPlan,
    TrainSettings,
    chunk_tokens,
    training_parts,
)
from rrhf_lite.plan.reference_copy import with_reference
from rrhf_lite.plan.shapes import ModelShape, resolve_shape
from rrhf_lite.plan.stage_memory import evaluate_plan, merge_plan, sampling_plan, scoring_plan

CARDS = {"t4": 15.0 * GiB}  # nvidia-smi reports 15360 MiB on a "16 GB" T4
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_memory(text: str) -> float:
    """'16GB', '16GiB', '15360MiB', '24' (GiB) or a card name ('t4') -> bytes (GB = GiB here,
    as cards are sold)."""
    value = text.strip().lower()
    if value in CARDS:
        return CARDS[value]
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?", value)
    if not match:
        raise UserInputError(f"--gpu-memory {text!r} is not a size", where="--gpu-memory",
                             hint="e.g. 16GB, 24GiB, 15360MiB or t4")
    number, unit = float(match.group(1)), match.group(2) or "gib"
    return number * (2**20 if unit.startswith("m") else GiB)


def candidates_per_prompt(recipe) -> int:
    """Planned k (chosen + rejected of a pairwise data set: the shipped recipes' data); 4 when
    the candidates are given (not known from the recipe)."""
    return planned_k(recipe.sampling) if "sample" in recipe.stages else 4


def train_settings(recipe, *, micro_batch: int | None = None, max_length: int | None = None):
    t = recipe.train
    k = candidates_per_prompt(recipe)
    n = t.per_device_train_batch_size * k
    length = max_length or t.max_length
    # sampled candidates are at most max_new_tokens (+ EOS) long; the data set's own responses
    # and given candidates up to max_length
    sampled_only = "sample" in recipe.stages and not recipe.sampling.include_dataset_responses
    response = min(length, recipe.sampling.max_new_tokens + 1) if sampled_only else None
    targets = recipe.lora.target_modules
    targets = _ALL_LINEAR if targets == "all-linear" else tuple(
        [targets] if isinstance(targets, str) else targets)
    optim = str(t.extra.get("optim", "adamw"))
    optimizer = "adamw_8bit" if "8bit" in optim else ("adafactor" if "adafactor" in optim
                                                      else "sgd" if "sgd" in optim else "adamw")
    return TrainSettings(
        candidates=n, micro_batch=micro_batch or t.candidate_micro_batch_size or n,
        max_length=length, response_tokens=response, lora_r=recipe.lora.r, lora_targets=targets,
        lora_dropout=recipe.lora.dropout, double_quant=recipe.quantization.double_quant,
        optimizer=optimizer, checkpointing=t.gradient_checkpointing,
        load_in_4bit=recipe.quantization.load_in_4bit, share_prompt=t.share_prompt is not False,
        prompt_tokens=t.max_prompt_length, per_prompt=k, first_batch_checks=True,
        loss_type=t.loss_type)


def half_dtype(recipe) -> str:
    """"fp16" where the recipe asks for it (mixed_precision or the 4-bit compute dtype), else
    "bf16" (what "auto" gives on a card with bf16; a T4 gets fp16: set mixed_precision fp16)."""
    compute = str(recipe.quantization.compute_dtype)
    return "fp16" if recipe.train.mixed_precision == "fp16" or compute in ("float16", "fp16",
                                                                           "half") else "bf16"


def regime_for(recipe) -> Regime:
    if recipe.train.mixed_precision == "no":
        return Regime(4, 4, 4, False, 4)
    if recipe.quantization.load_in_4bit:
        return Regime.qlora(half_dtype(recipe))  # training_loader.prepare_4bit_for_lora's dtypes
    return Regime.gpu(2)


def logprob_path_for(recipe, shape: ModelShape) -> tuple[str, str]:
    """(path, why) the trainer will take: hidden states unless the recipe says logits, LoRA
    wraps the head, or the model is not a plain LLaMA-family decoder (checked on the first batch)."""
    targets = recipe.lora.target_modules
    on_head = not isinstance(targets, str) and "lm_head" in targets or targets == "lm_head"
    if recipe.train.logprob_path == "logits":
        return "logits", "logprob_path is 'logits'"
    if recipe.lora.enabled and on_head:
        return "logits", "LoRA on the head"
    if shape.family != "llama":
        return "logits", f"a {shape.family} model"
    return "hidden", "a plain Linear head (the trainer checks it on the first batch)"


def _fits(plan: StepPlan, card: float) -> bool:
    return plan.on_card <= card


def largest_fit(recipe, shape, regime, card: float) -> dict:
    """The largest candidate micro-batch (at the recipe's max_length) and the largest max_length
    (multiple of 64, at the recipe's micro-batch) whose training step fits the card."""
    base = train_settings(recipe)
    path = logprob_path_for(recipe, shape)[0]
    micro = 0
    for m in range(1, base.candidates + 1):
        if _fits(with_reference(recipe, training_parts(
                shape, train_settings(recipe, micro_batch=m), regime, path)), card):
            micro = m
    length, probe = 0, 64
    while probe <= 32768 and _fits(with_reference(recipe, training_parts(
            shape, train_settings(recipe, max_length=probe), regime, path)), card):
        length, probe = probe, probe + 64
    return {"candidate_micro_batch_size": micro or None, "max_length": length or None}


def reference_note(recipe) -> str | None:
    """What the objective needs besides the policy (said in the plan's output); None where
    reference_copy.with_reference notes a frozen copy (full fine-tuning)."""
    loss = recipe.train.loss_type
    if loss in REFERENCE_LOSS_TYPES and not recipe.lora.enabled:
        return None
    if loss in REFERENCE_LOSS_TYPES:
        return (f"reference model ({loss}): the base with the LoRA adapter disabled, no second "
                "copy of the weights; a no-grad pass over the same chunks before pass 1, its "
                "log-prob sums kept for the loss")
    return f"reference model: none ({loss} needs only the policy's log-probs)"


def plan_recipe(recipe, card_bytes: float) -> dict:
    shape = resolve_shape(recipe.model.name_or_path)
    regime = regime_for(recipe)
    path, why = logprob_path_for(recipe, shape)
    train = None
    if "train" in recipe.stages:
        settings = train_settings(recipe)
        train = with_reference(recipe, training_parts(shape, settings, regime, path))
        train.notes += [f"log-prob path: {path} ({why})",
                        f"prompt sharing: {'on' if settings.share_prompt else 'off'} "
                        f"({chunk_tokens(settings)} tokens per chunk of {settings.micro_batch})",
                        f"dtypes: embeddings + head {regime.frozen_bytes} B, residual stream "
                        f"{regime.residual_bytes} B, compute {regime.compute_bytes} B "
                        f"({half_dtype(recipe) if regime.autocast else 'fp32'})",
                        *filter(None, [reference_note(recipe)])]
    stages = {"sample": sampling_plan(recipe, shape, regime), "score": scoring_plan(recipe, regime),
              "train": train, "evaluate": evaluate_plan(recipe, shape, regime),
              "merge": merge_plan(recipe, shape)}
    return {"model": recipe.model.name_or_path, "shape_source": shape.source, "card_bytes": card_bytes,
            "stages": {k: v for k, v in stages.items() if v is not None},
            "largest_fit": largest_fit(recipe, shape, regime, card_bytes) if train else None,
            "settings": train_settings(recipe) if train else None}


def format_plan(result: dict) -> str:
    from rrhf_lite.utils.report_files import format_table

    card = result["card_bytes"]
    lines = [f"memory plan for {result['model']} ({result['shape_source']}); card {card / GiB:.1f} GiB"]
    for stage, plan in result["stages"].items():
        rows = [{"part": p.name, "GiB": f"{p.gib:.2f}", "kind": p.phase, "from": p.source}
                for p in plan.parts]
        if plan.where == "host":
            rows.append({"part": "host memory (not the card)", "GiB": f"{plan.allocated / GiB:.2f}",
                         "kind": "total"})
        else:
            rows += [{"part": "allocated peak (torch max_memory_allocated)",
                      "GiB": f"{plan.allocated / GiB:.2f}", "kind": "total"},
                     {"part": "on the card", "GiB": f"{plan.on_card / GiB:.2f}",
                      "kind": "fits" if plan.on_card <= card else "DOES NOT FIT"}]
        lines += ["", format_table(rows, ("part", "GiB", "kind", "from"), plain=True,
                                   title=f"{stage}: peak at {plan.peak_phase}")]
        lines += [f"  {note}" for note in plan.notes]
    fit = result.get("largest_fit")
    if fit:
        s = result["settings"]
        lines += ["", f"largest that fit: candidate_micro_batch_size {fit['candidate_micro_batch_size']} "
                  f"(of {s.candidates} candidates) at max_length {s.max_length}; max_length "
                  f"{fit['max_length']} at candidate_micro_batch_size {s.micro_batch}"]
    lines.append("counted, not measured: sampling, scoring, evaluation and merge; the training "
                 "step's count is checked against a profiled step (docs/memory.md)")
    return "\n".join(lines)
