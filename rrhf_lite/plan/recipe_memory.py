"""`rrhf-lite plan RECIPE`: the memory plan of a recipe's training step, sampling and scoring on a
given card, and the largest candidate micro-batch and max_length that fit.

Training parts: rrhf_lite.plan.memory_parts. Sampling: the 4-bit policy, the KV cache of every
sequence a generator keeps (prompts x beams or returned samples, prompt + new tokens), one
prefill block and the last-token logits. Scoring: the reward model as stored, plus one forward
of a scoring batch. Stages run one model at a time, so the card must hold the largest of them.
Sampling and scoring are counted, not yet measured (the GPU suite measures the training step).
"""

from __future__ import annotations

import re

from rrhf_lite.data.candidate_stats import planned_k
from rrhf_lite.errors import UserInputError
from rrhf_lite.plan.memory_parts import (
    CUDA_CONTEXT_BYTES,
    GiB,
    Part,
    Regime,
    StepPlan,
    TrainSettings,
    chunk_tokens,
    dequantised_weight_bytes,
    quantised_bytes,
    training_parts,
)
from rrhf_lite.plan.shapes import KNOWN_SHAPES, ModelShape, resolve_shape

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
        prompt_tokens=t.max_prompt_length, per_prompt=k, first_batch_checks=True)


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


def policy_weight_parts(shape: ModelShape, double_quant: bool) -> list[Part]:
    w, c = quantised_bytes(shape, double_quant)
    return [Part("4-bit weights + constants", w + c, "static", "as in training"),
            Part("embeddings + head", shape.embedding_params() * 2, "static", "16-bit")]


def _context() -> Part:
    return Part("CUDA context", CUDA_CONTEXT_BYTES, "overhead", "estimate, not allocated")


def sampling_plan(recipe, shape: ModelShape, regime: Regime) -> StepPlan | None:
    if "sample" not in recipe.stages:
        return None
    s = recipe.sampling
    c = regime.compute_bytes
    best: StepPlan | None = None
    for g in s.generators:
        if g.model not in ("policy", "initial"):
            continue  # another model: its shape is not the policy's
        per_prompt = g.num_candidates if g.method in ("top_p", "greedy") else (
            g.num_beams or g.num_candidates)
        seqs = s.batch_size * per_prompt
        tokens = recipe.sampling_prompt_length + s.max_new_tokens
        kv = 2 * shape.num_layers * seqs * tokens * shape.kv_dim * c
        prefill = seqs * recipe.sampling_prompt_length
        block = prefill * (4 * shape.hidden_size + 3 * shape.intermediate_size) * c
        logits = 3 * seqs * shape.vocab_size * 4  # last-token logits, processed scores, log-softmax
        parts = policy_weight_parts(shape, recipe.quantization.double_quant) + [
            Part("KV cache", kv, "dynamic", f"{seqs} sequences x {tokens} tokens, {g.method}"),
            Part("prefill block", block, "dynamic", f"{prefill} prompt tokens, one block"),
            Part("dequantised weight", dequantised_weight_bytes(shape, regime), "dynamic", ""),
            Part("next-token logits", logits, "dynamic", "fp32, three copies"), _context()]
        plan = StepPlan(parts, f"sampling ({g.method}, {seqs} sequences)")
        if best is None or plan.allocated > best.allocated:
            best = plan
    return best


def scoring_plan(recipe, regime: Regime) -> StepPlan | None:
    name = recipe.scoring.reward_model
    if "score" not in recipe.stages or not name:
        return None
    if recipe.scoring.reward_format == "gptj_value_head" and name not in KNOWN_SHAPES:
        name = recipe.scoring.reward_base  # a raw checkpoint has no config.json: its base's
    shape = resolve_shape(name)
    sc = recipe.scoring
    tokens = sc.batch_size * sc.max_length
    weights = shape.total_params() * shape.weight_bytes
    attention = sc.batch_size * shape.num_heads * sc.max_length**2 * shape.weight_bytes
    attention *= 3 if shape.family == "encoder" else 1  # DeBERTa: content + two position terms
    parts = [Part("reward model weights", weights, "static", shape.source),
             Part("forward activations", tokens * (4 * shape.hidden_size + 2 * shape.intermediate_size)
                  * shape.weight_bytes, "dynamic", f"{sc.batch_size} x {sc.max_length} tokens"),
             Part("attention scores", attention, "dynamic", "eager attention, one layer"),
             _context()]
    return StepPlan(parts, "scoring")


def _fits(plan: StepPlan, card: float) -> bool:
    return plan.on_card <= card


def largest_fit(recipe, shape, regime, card: float) -> dict:
    """The largest candidate micro-batch (at the recipe's max_length) and the largest max_length
    (multiple of 64, at the recipe's micro-batch) whose training step fits the card."""
    base = train_settings(recipe)
    path = logprob_path_for(recipe, shape)[0]
    micro = 0
    for m in range(1, base.candidates + 1):
        if _fits(training_parts(shape, train_settings(recipe, micro_batch=m), regime, path), card):
            micro = m
    length, probe = 0, 64
    while probe <= 32768 and _fits(training_parts(
            shape, train_settings(recipe, max_length=probe), regime, path), card):
        length, probe = probe, probe + 64
    return {"candidate_micro_batch_size": micro or None, "max_length": length or None}


def plan_recipe(recipe, card_bytes: float) -> dict:
    shape = resolve_shape(recipe.model.name_or_path)
    regime = regime_for(recipe)
    path, why = logprob_path_for(recipe, shape)
    train = None
    if "train" in recipe.stages:
        settings = train_settings(recipe)
        train = training_parts(shape, settings, regime, path)
        train.notes += [f"log-prob path: {path} ({why})",
                        f"prompt sharing: {'on' if settings.share_prompt else 'off'} "
                        f"({chunk_tokens(settings)} tokens per chunk of {settings.micro_batch})",
                        f"dtypes: embeddings + head {regime.frozen_bytes} B, residual stream "
                        f"{regime.residual_bytes} B, compute {regime.compute_bytes} B "
                        f"({half_dtype(recipe) if regime.autocast else 'fp32'})"]
    stages = {"train": train, "sample": sampling_plan(recipe, shape, regime),
              "score": scoring_plan(recipe, regime)}
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
    lines.append("counted, not measured: sampling and scoring; the training step's count is "
                 "checked against measurements (docs/memory.md)")
    return "\n".join(lines)
