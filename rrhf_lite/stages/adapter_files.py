"""What the train stage writes beside an adapter's weights: the record of its base
(rrhf_lite.json, rrhf_lite.models.adapter_record), the shared base name in adapter_config.json,
and the model card (README.md, rrhf_lite.stages.model_card), for the final adapter and for each
checkpoint (record only: a checkpoint is loadable as training saw it, its card would be stale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rrhf_lite.builtin.sources import is_builtin, shareable_model_name
from rrhf_lite.models.adapter_record import (
    FULL_PRECISION,
    BaseQuantization,
    record_quantization,
    write_adapter_record,
)
from rrhf_lite.stages.model_card import adapter_card, write_card
from rrhf_lite.training.objectives import REFERENCE_LOSS_TYPES
from rrhf_lite.utils.precision import dtype_name
from rrhf_lite.utils.report_files import environment_versions

HYPERPARAMETERS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                   "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "max_length", "seed")


def trained_quantization(model) -> BaseQuantization:
    """How the trained model's base was loaded, read from the model itself (its
    quantization_config), so the record says what happened, not what was asked."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not getattr(config, "load_in_4bit", False):
        return FULL_PRECISION
    return BaseQuantization(True, config.bnb_4bit_quant_type,
                            bool(config.bnb_4bit_use_double_quant),
                            dtype_name(config.bnb_4bit_compute_dtype))


def base_entry(model_args) -> dict:
    """The record's names of the base: the shared one and where it came from here."""
    origin = model_args.base_origin or {}
    given = str(origin.get("name") or model_args.model_name_or_path)
    builtin = path = None
    if is_builtin(given):
        builtin = {"name": given, "seed": origin.get("seed", 0),
                   "options": origin.get("options") or {}}
    elif Path(given).expanduser().is_dir():
        path = str(Path(given).expanduser().resolve())
    return {"base_model": shareable_model_name(given),
            "base": {"given": given, "builtin": builtin, "path": path}}


def objective_entry(args, method: str) -> dict:
    """The objective and its settings, from the trainer's config (RRHFConfig or DPOConfig)."""
    if method == "dpo":
        loss = args.loss_type  # TRL takes a list (a weighted mix of losses)
        return {"method": "dpo", "beta": args.beta,
                "loss_type": ", ".join(loss) if isinstance(loss, list) else loss,
                "label_smoothing": args.label_smoothing}
    entry = {"method": "rrhf", "loss_type": args.loss_type, "rank_weight": args.rank_weight,
             "sft_weight": args.sft_weight, "length_penalty": args.length_penalty,
             "skip_tied": getattr(args, "skip_tied", False)}
    if args.loss_type in REFERENCE_LOSS_TYPES:
        entry["beta"] = args.beta
    return entry


def _plain(value):
    """An enum setting (lr_scheduler_type) as its value: JSON and the card show "cosine"."""
    return getattr(value, "value", value)


def training_entry(trainer, model_args, data: Any, summary: dict, provenance: dict | None
                   ) -> dict:
    """What the model card tells about training: objective, hyper-parameters, LoRA, data."""
    args = trainer.args
    method = summary.get("method", "rrhf")
    counts = dict(summary.get("data", {}))
    if isinstance(data, str | Path):
        counts["file"] = Path(data).name if Path(data).exists() else str(data)
    if counts.get("rows") and counts.get("candidates"):
        counts["mean_k"] = round(counts["candidates"] / counts["rows"], 2)
    entry = {
        "objective": objective_entry(args, method),
        "hyperparameters": {name: _plain(getattr(args, name, None)) for name in HYPERPARAMETERS},
        "global_step": trainer.state.global_step,
        "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha,
                 "dropout": model_args.lora_dropout,
                 "target_modules": model_args.lora_target_modules},
        "data": counts,
        **(provenance or {}),
    }
    if model_args.adapter_init_path:  # iterated RRHF: named inside the run, not by a local path
        entry["continued_from"] = "/".join(Path(model_args.adapter_init_path).parts[-3:])
    return entry


def adapter_record(trainer, model, model_args, data: Any, summary: dict,
                   provenance: dict | None = None) -> dict:
    """The whole record of a trained adapter (see rrhf_lite.models.adapter_record)."""
    config = getattr(model, "config", None)
    weights = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        **base_entry(model_args),
        "quantization": record_quantization(trained_quantization(model)),
        "torch_dtype": dtype_name(weights) if weights is not None else None,
        "training": training_entry(trainer, model_args, data, summary, provenance),
        "versions": environment_versions(),
    }


def finish_adapter_dir(directory: Path, record: dict, final_dir: Path | None = None) -> None:
    """Record, shared base name and model card (replacing PEFT's empty template) in
    `directory`, a temporary one that becomes `final_dir` (what the card is about)."""
    write_adapter_record(directory, record)
    write_card(directory, adapter_card(record, final_dir or directory))


class RecordCheckpoints(TrainerCallback):
    """Writes the record into each checkpoint the trainer saves (main process), so a checkpoint
    used as an adapter loads its base as training did, too."""

    def __init__(self, record_for):
        self.record_for = record_for  # global step -> record

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and (checkpoint / "adapter_config.json").is_file():
            write_adapter_record(checkpoint, self.record_for(state.global_step))
