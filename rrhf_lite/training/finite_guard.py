"""Stop training at the first non-finite loss, gradient or weight, before it is saved.

A learning rate of 1e30 (or a bad row, or fp16 overflow in the weights) turns the adapter into
NaNs; left alone, training "succeeds", saves an all-NaN adapter and exits 0. The guard checks,
on every rank and in one collective each time:
  - before each optimizer step: the step's losses and the trainable weights' gradients (the
    gradients only without fp16 loss scaling, whose scaler skips overflowing steps by design);
  - after each optimizer step, before any checkpoint of it is saved: the trainable weights.
A failure raises NonFiniteTrainingError (exit code 2) naming the step, the value and what to
try; the checkpoints already saved (all from earlier, finite steps) are kept.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import last_complete_checkpoint


class NonFiniteTrainingError(UserInputError):
    """Training diverged: a loss, gradient or weight is NaN or infinite."""


def _first_non_finite(named_tensors) -> str | None:
    for name, tensor in named_tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class NonFiniteGuard(TrainerCallback):
    """Added by RRHFTrainer; `trainer.note_loss(loss)` records each training_step's loss."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.bad_loss: float | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        if self.bad_loss is None:
            value = float(loss.detach().float())
            if not math.isfinite(value):
                self.bad_loss = value

    def _trainable(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _anyone(self, bad: bool) -> bool:
        """Whether any rank found a problem (every rank must stop together)."""
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return bad
        flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def _stop(self, state, args, what: str) -> None:
        out = args.output_dir
        kept = last_complete_checkpoint(out) if out else None
        keep = (f"the last good checkpoint is kept: {kept}" if kept
                else "no checkpoint had been saved yet")
        raise NonFiniteTrainingError(
            f"training stopped at step {state.global_step + 1}: {what}", where=str(out),
            hint=f"lower train.learning_rate (now {args.learning_rate:g}), or set "
            "train.mixed_precision: bf16 or no instead of fp16, or check the data's scores; "
            + keep)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.trainer.model
        problem = None
        if self.bad_loss is not None:
            problem = f"the loss is {self.bad_loss}"
        elif self.trainer.accelerator.scaler is None:
            name = _first_non_finite((n, p.grad) for n, p in self._trainable(model))
            if name is not None:
                problem = f"the gradient of {name} is not finite (NaN or inf)"
        self.bad_loss = None
        if self._anyone(problem is not None):
            self._stop(state, args, problem or "another process found a non-finite value")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.trainer.model
        name = _first_non_finite(self._trainable(model))
        if self._anyone(name is not None):
            # global_step already counts this step here
            state_view = type("S", (), {"global_step": state.global_step - 1})
            self._stop(state_view, args, f"after the optimizer step the weight {name} is not "
                       "finite (NaN or inf)" if name else
                       "another process found a non-finite weight")
