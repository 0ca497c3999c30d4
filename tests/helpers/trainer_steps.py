"""A tiny RRHF training setup the trainer tests share: rows with a learnable order, a config,
a LoRA model, a trainer whose loss weighs every term away from 1, and one step's gradients."""

from __future__ import annotations

import torch

from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer


def ranked_rows(n_prompts=6):
    """Listwise rows with a learnable order: "good" > "fine" > "bad", varied k and a tie."""
    rows = []
    for i in range(n_prompts):
        responses = ["good stuff", "fine", "bad", "bad!"][: 2 + i % 3]
        scores = [2.0, 1.0, 0.0, 0.0][: len(responses)]
        rows.append({"prompt": f"Q{i}: rate me", "responses": responses, "scores": scores})
    return rows


def rrhf_config(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=3, learning_rate=5e-3,
                max_length=32, max_prompt_length=16, logprob_backend="torch",
                save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant",
                dataloader_pin_memory=False)
    base.update(kw)
    return RRHFConfig(**base)


def lora_model(model_dir, seed=0, **kw):
    torch.manual_seed(seed)  # the LoRA init draws from the global RNG
    args = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    args.update(kw)
    return load_model_for_training(ModelArguments(str(model_dir), **args))


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def randomise_lora_b(model, seed=1):
    # LoRA B starts at zero, which makes every lora_A gradient zero: move off that point
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_params(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def lora_grads(model, params=lora_params):
    return {n: p.grad.detach().clone() for n, p in params(model).items()}


def weighted_trainer(model, tok, out, **kw):
    """A trainer on ranked_rows() whose loss weighs every term away from 1 (length penalty, SFT and
    rank weights), so a wrong term shows in the loss and gradients."""
    args = rrhf_config(out, length_penalty=0.7, sft_weight=0.5, rank_weight=2.0, **kw)
    return RRHFTrainer(model=model, args=args, train_dataset=ranked_rows(), processing_class=tok)


def step_grads(trainer, batch, micro, params=lora_params):
    """One training step with candidate micro-batch `micro`: (loss, {name: grad} of params)."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.args.candidate_micro_batch_size = micro
    loss = trainer.training_step(trainer.model, dict(batch))
    return float(loss), lora_grads(trainer.model, params)
