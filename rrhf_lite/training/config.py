"""RRHFConfig: transformers' TrainingArguments plus the RRHF settings, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from rrhf_lite.errors import UserInputError
from rrhf_lite.training.objectives import LOSS_TYPES, default_sft_weight
from rrhf_lite.utils import distributed


@dataclass
class RRHFConfig(TrainingArguments):
    """TrainingArguments plus the RRHF settings.

    length_penalty: lambda in p_i = (sum of token log-probs) / |y_i|^lambda (paper default 1).
    loss_type: the objective (rrhf_lite.training.objectives): "rrhf" (default) | "pro" |
        "pl_dpo" | "lipo" | "dpo_pairs"; the last three (the DPO family) need a reference: the
        base with the LoRA adapter disabled, or, in full fine-tuning, a frozen copy of the
        initial model that the trainer keeps (twice the weights in memory).
    beta: the DPO family's temperature in u_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x)).
    rank_weight, sft_weight: weights of the objective's preference term (RRHF: the rank loss) and
        of the SFT loss on the best candidate; sft_weight None = the objective's paper default
        (1.0 for rrhf and pro, 0.0 for the DPO family; resolved when the config is built).
    max_length: prompt + response tokens per candidate; longer responses lose their tail.
    max_prompt_length: prompts longer than this are truncated on `truncation_side`.
    truncation_side: "left" keeps the end of long prompts (the reference code's choice).
    candidate_micro_batch_size: candidates per forward pass; None = all candidates of the batch
        at once. Any value gives the same gradient (see the module docstring).
    logprob_backend: rrhf_kernels backend, "auto" (Triton on CUDA, torch elsewhere) | "triton"
        | "torch".
    logprob_path: "auto" (log-probs straight from hidden states when the model allows it, else
        from logits; said once in the log) | "hidden" (required: an error if not possible) |
        "logits" (always the [N, T, V] logits).
    share_prompt: "auto" (pack each prompt once with its candidates where the model honours a
        custom 4-D attention mask and reproduces the unshared log-probs, checked once on real
        input; else unshared rows, the reason said once in the log) | True (required: an error
        if not possible) | False (every candidate row repeats its prompt). Same numbers either
        way (rrhf_lite.training.shared_prompt).
    skip_tied: leave out of training the rows whose candidates all have the same reward (False,
        as the paper's code). Such a row holds no ranking, and the SFT term would imitate the first
        of equals: with a programmatic reward often a failure every candidate shares.
    Defaults differing from TrainingArguments: logging every step, unused columns kept (the
    collator needs them), non-reentrant gradient checkpointing.
    """

    length_penalty: float = 1.0
    loss_type: str = "rrhf"
    beta: float = 0.1
    rank_weight: float = 1.0
    sft_weight: float | None = None
    max_length: int | None = 512
    max_prompt_length: int | None = 256
    truncation_side: str = "left"
    candidate_micro_batch_size: int | None = None
    logprob_backend: str = "auto"
    logprob_path: str = "auto"
    share_prompt: str | bool = "auto"
    skip_tied: bool = False
    logging_steps: float = 1
    remove_unused_columns: bool = False
    report_to: None | str | list[str] = field(default="none")

    def __post_init__(self):
        if self.truncation_side not in ("left", "right"):
            raise UserInputError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}",
                                 where="truncation_side", hint="use 'left' or 'right'")
        if self.logprob_backend not in ("auto", "triton", "torch"):
            raise UserInputError(f"unknown logprob_backend {self.logprob_backend!r}",
                                 where="logprob_backend", hint="use 'auto', 'triton' or 'torch'")
        if self.logprob_path not in ("auto", "hidden", "logits"):
            raise UserInputError(f"unknown logprob_path {self.logprob_path!r}",
                                 where="logprob_path", hint="use 'auto', 'hidden' or 'logits'")
        if isinstance(self.share_prompt, str) and self.share_prompt.lower() in ("true", "false"):
            self.share_prompt = self.share_prompt.lower() == "true"
        if self.share_prompt not in ("auto", True, False):
            raise UserInputError(f"share_prompt must be 'auto', true or false, got {self.share_prompt!r}",
                                 where="share_prompt", hint="use 'auto', true or false")
        if self.candidate_micro_batch_size is not None and self.candidate_micro_batch_size < 1:
            raise UserInputError("candidate_micro_batch_size must be >= 1 (or None for all)",
                                 where="candidate_micro_batch_size", hint="e.g. 2")
        if self.loss_type not in LOSS_TYPES:
            raise UserInputError(f"unknown loss_type {self.loss_type!r}", where="loss_type",
                                 hint=f"use one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise UserInputError(f"beta must be > 0, got {self.beta!r}", where="beta",
                                 hint="0.1 is DPO's usual value")
        if self.sft_weight is None:
            self.sft_weight = default_sft_weight(self.loss_type)
        if self.sft_weight < 0 or self.rank_weight < 0:
            raise UserInputError("rank_weight and sft_weight must be >= 0", where="sft_weight",
                                 hint="0 turns a term off")
        if self.length_penalty < 0:
            raise UserInputError("length_penalty must be >= 0", where="length_penalty",
                                 hint="1.0 is the paper's default")
        # Checkpointing on by default, non-reentrant; set through the new names (transformers 5
        # renamed gradient_* to activation_*) unless the user set either spelling.
        # The old spelling is moved over here, silently (recipes say gradient_checkpointing).
        if self.activation_checkpointing is None:
            self.activation_checkpointing = (True if self.gradient_checkpointing is None
                                             else self.gradient_checkpointing)
            self.gradient_checkpointing = None
        if self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = (
                {"use_reentrant": False} if self.gradient_checkpointing_kwargs is None
                else self.gradient_checkpointing_kwargs)
            self.gradient_checkpointing_kwargs = None
        # Several processes on a machine without an accelerator (torchrun / accelerate launch on
        # CPUs): without use_cpu, transformers sets up accelerate's state as one process on every
        # rank, and each rank would train alone on the whole data set and write the results.
        if not self.use_cpu and not torch.accelerator.is_available() and distributed.is_distributed():
            self.use_cpu = True
        super().__post_init__()
