"""Train stage: listwise data -> LoRA adapter (or a full model), saved atomically as safetensors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rrhf_lite.config.recipe import Recipe
from rrhf_lite.config.sections import TrainSection
from rrhf_lite.data.listwise import load_listwise, summarize_listwise
from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
from rrhf_lite.stages.adapter_files import RecordCheckpoints, adapter_record, finish_adapter_dir
from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer
from rrhf_lite.utils.io import atomic_directory, write_json, write_jsonl
from rrhf_lite.utils.precision import auto_dtype_name

logger = logging.getLogger(__name__)


def run_train(
    data: Any,
    model_args: ModelArguments,
    config,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
    provenance: dict | None = None,
) -> Path:
    """Train with RRHF and return the directory of the final adapter.

    Args:
        data: listwise data, anything `rrhf_lite.data.listwise.load_listwise` accepts (a .jsonl/.json/
            .parquet path, a hub name, a datasets.Dataset, a list of rows).
        model_args: what to load (4-bit + LoRA by default).
        config: an RRHFConfig; its output_dir receives checkpoints, the result and the logs.
        resume_from_checkpoint: a checkpoint directory (or True for the latest in output_dir).
        callbacks: extra transformers TrainerCallbacks.
        provenance: what the model card says about the data beyond the file (a recipe's
            prompts, candidates and reward; see recipe_provenance).

    Writes into config.output_dir:
        adapter/ (LoRA: adapter_model.safetensors + adapter_config.json + tokenizer, plus
            rrhf_lite.json, the record of the base as training loaded it, and README.md, the
            model card; see rrhf_lite.stages.adapter_files), or model/ for full fine-tuning; it
            appears only once complete (atomic rename); each checkpoint gets the record too;
        metrics.jsonl: the trainer's log history, one JSON object per logged step;
        train_summary.json: data counts, tokenisation/truncation counts, final metrics.

    Under accelerate launch / torchrun every rank calls run_train; only the main process writes
    these files (the weights are gathered first when FSDP or DeepSpeed ZeRO-3 shards them), and
    every rank returns once they exist.
    """
    examples = load_listwise(data, require_scores=True)
    model, tokenizer = load_model_for_training(model_args)
    trainer = RRHFTrainer(model=model, args=config, train_dataset=examples,
                          processing_class=tokenizer, callbacks=callbacks)
    data_counts = {"data": summarize_listwise(examples)}
    record = functools.partial(adapter_record, trainer, model, model_args, data, data_counts,
                               provenance)
    trainer.add_callback(RecordCheckpoints(lambda step: record()))
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return save_trained(trainer, tokenizer, result, use_lora=model_args.use_lora,
                        resumed=bool(resume_from_checkpoint), summary={
                            **data_counts,
                            "tokenization": trainer.tokenize_stats.get("train", {}),
                            "forward": trainer.forward_choices,
                        }, record=record)


def save_trained(trainer, tokenizer, result, *, use_lora: bool, resumed: bool,
                 summary: dict, record: Callable[[], dict] | None = None) -> Path:
    """Save what `trainer` trained into its output_dir: adapter/ (or model/), metrics.jsonl and
    train_summary.json (`summary` plus the steps, run time and seconds per step), from the main
    process; every rank returns once they exist. Weights sharded by FSDP or DeepSpeed ZeRO-3 are
    gathered first (a collective: every rank calls this). `record` makes the adapter's record;
    with it the adapter directory also holds rrhf_lite.json and its model card."""
    out = Path(trainer.args.output_dir)
    target = out / ("adapter" if use_lora else "model")
    accelerator = trainer.accelerator
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if accelerator.is_main_process:
        # save_pretrained directly (not trainer.save_model) so that no pickled training_args.bin
        # lands beside the weights: the result holds safetensors, JSON and the tokenizer only.
        with atomic_directory(target, overwrite=True) as tmp:
            accelerator.unwrap_model(trainer.model).save_pretrained(  # safetensors
                tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if use_lora and record is not None:
                finish_adapter_dir(tmp, record(), final_dir=target)
        write_jsonl(out / "metrics.jsonl", trainer.state.log_history)
        steps = trainer.state.global_step
        write_json(out / "train_summary.json", {
            **summary,
            "global_step": steps,
            "train_metrics": result.metrics,
            "seconds_per_step": seconds_per_step(result.metrics, steps, resumed),
            "world_size": accelerator.num_processes,
            "output": str(target),
        })
    accelerator.wait_for_everyone()  # the other ranks return once the result exists
    logger.info("saved %s", target)
    return target


def seconds_per_step(train_metrics: dict, steps: int, resumed: bool) -> float | None:
    """Wall time per optimiser step (train_runtime / steps), or None for a resumed training,
    whose runtime covers only the steps after its checkpoint."""
    runtime = train_metrics.get("train_runtime")
    if resumed or not runtime or not steps:
        return None
    return round(runtime / steps, 4)


# --- from a recipe --------------------------------------------------------------------------

MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def train_section(recipe: Recipe, overrides: dict | None = None) -> TrainSection:
    """The recipe's train section with an ablation's overrides, validated."""
    return TrainSection.model_validate({**recipe.train.model_dump(), **(overrides or {})})


def precision_flags(section: TrainSection) -> dict[str, bool]:
    """bf16 / fp16 for TrainingArguments: auto = bf16 where the GPU has it natively, fp16 on
    other GPUs, neither on CPU."""
    choice = section.mixed_precision
    if choice == "auto":
        choice = MIXED_PRECISION[auto_dtype_name()]
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def training_config(recipe: Recipe, output_dir: Path, overrides: dict | None = None):
    """RRHFConfig from the recipe's train section (plus an ablation's overrides)."""
    section = train_section(recipe, overrides)
    fields = section.model_dump(exclude={"extra", "resume", "mixed_precision", "allow_sft_only"})
    fields.update(precision_flags(section))
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    fields["warmup_steps"] = fields.pop("warmup_ratio")
    return RRHFConfig(output_dir=str(output_dir), seed=recipe.seed, **fields, **section.extra)


def model_arguments(recipe: Recipe, base_model: str, init_adapter: Path | None = None
                    ) -> ModelArguments:
    """What training loads: the recipe's base, quantisation and LoRA settings."""
    q, lora = recipe.quantization, recipe.lora
    return ModelArguments(
        model_name_or_path=base_model,
        tokenizer_name_or_path=recipe.model.tokenizer,
        load_in_4bit=q.load_in_4bit,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=q.compute_dtype,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_quant_storage=q.quant_storage,
        torch_dtype=recipe.model.torch_dtype,
        use_lora=lora.enabled,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
        adapter_init_path=str(init_adapter) if init_adapter else None,
        # what the adapter records as its base: the recipe's name (a builtin: name is shared as
        # its hub model), not the cache directory it resolved to
        base_origin={"name": recipe.model.name_or_path, "seed": recipe.seed,
                     "options": recipe.model.builtin or {}},
    )


def recipe_provenance(recipe: Recipe) -> dict:
    """What an adapter's model card says about a recipe's data: its name, prompts, candidates
    and reward."""
    data, sampling, scoring = recipe.data, recipe.sampling, recipe.scoring
    out: dict = {"recipe": recipe.name}
    if "sample" in recipe.stages and data.prompts:
        out["prompts"] = str(data.prompts)
        if data.max_prompts:
            out["max_prompts"] = data.max_prompts
        generators = ", ".join(f"{g.num_candidates} x {g.method} from {g.model}"
                               for g in sampling.generators)
        out["candidates"] = f"sampled per prompt: {generators}, up to {sampling.max_new_tokens} new tokens"
    elif data.candidates:
        out["candidates"] = f"given: {data.candidates}"
    reward = scoring.reward_model or scoring.reward_function or ("given scores" if scoring.given
                                                                 else None)
    if reward:
        out["reward"] = str(reward)
    return out
