"""Train stage: listwise data -> LoRA adapter (or a full model), saved atomically as safetensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rrhf_lite.data import load_listwise, summarize_listwise
from rrhf_lite.io import atomic_directory, write_json, write_jsonl
from rrhf_lite.modeling import ModelArguments, load_model_for_training

logger = logging.getLogger(__name__)


def run_train(
    data: Any,
    model_args: ModelArguments,
    config,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
) -> Path:
    """Train with RRHF and return the directory of the final adapter.

    Args:
        data: listwise data, anything `rrhf_lite.data.load_listwise` accepts (a .jsonl/.json/
            .parquet path, a hub name, a datasets.Dataset, a list of rows).
        model_args: what to load (4-bit + LoRA by default).
        config: an RRHFConfig; its output_dir receives checkpoints, the result and the logs.
        resume_from_checkpoint: a checkpoint directory (or True for the latest in output_dir).
        callbacks: extra transformers TrainerCallbacks.

    Writes into config.output_dir:
        adapter/ (LoRA: adapter_model.safetensors + adapter_config.json + tokenizer), or model/
            for full fine-tuning; it appears only once complete (atomic rename);
        metrics.jsonl: the trainer's log history, one JSON object per logged step;
        train_summary.json: data counts, tokenisation/truncation counts, final metrics.

    Under accelerate launch / torchrun every rank calls run_train; only the main process writes
    these files (the weights are gathered first when FSDP or DeepSpeed ZeRO-3 shards them), and
    every rank returns once they exist.
    """
    from rrhf_lite.trainer import RRHFTrainer

    examples = load_listwise(data, require_scores=True)
    model, tokenizer = load_model_for_training(model_args)
    trainer = RRHFTrainer(model=model, args=config, train_dataset=examples,
                          processing_class=tokenizer, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    out = Path(config.output_dir)
    target = out / ("adapter" if model_args.use_lora else "model")
    accelerator = trainer.accelerator
    # sharded engines hold a slice of each weight per rank: gather full weights (collective)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if accelerator.is_main_process:
        # save_pretrained directly (not trainer.save_model) so that no pickled training_args.bin
        # lands beside the weights: the result holds safetensors, JSON and the tokenizer only.
        with atomic_directory(target, overwrite=True) as tmp:
            accelerator.unwrap_model(trainer.model).save_pretrained(  # safetensors
                tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
        write_jsonl(out / "metrics.jsonl", trainer.state.log_history)
        write_json(out / "train_summary.json", {
            "data": summarize_listwise(examples),
            "tokenization": trainer.tokenize_stats.get("train", {}),
            "global_step": trainer.state.global_step,
            "train_metrics": result.metrics,
            "world_size": accelerator.num_processes,
            "output": str(target),
        })
    accelerator.wait_for_everyone()  # the other ranks return once the result exists
    logger.info("saved %s", target)
    return target
