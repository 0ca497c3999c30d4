"""rrhf-lite: RRHF on one GPU.

The package is in rooms by concern; a room imports only rooms below it in this list (checked by
tests/project/test_layout.py), so a reader can start at the top and never meet a name from above:

    cli         the `rrhf-lite` command line
    pipeline    `rrhf-lite run`: rounds, the run directory and its lock, preflight checks
    plan        `rrhf-lite plan` and `validate --plan`: memory by part, job size, model shapes
    stages      sample, score, train (RRHF or DPO), evaluate, merge, generate; what the stages of a
                run hand each other (run_context) and their wall times
    training    RRHFTrainer and RRHFConfig, the losses, per-candidate log-probs, prompt sharing,
                logged metrics, the finite guard, DPO pairs
    generation  candidates by any method, our diverse beam search, one prefill per prompt
    builtin     what a `builtin:` name resolves to: the tiny world, SmolLM2, the tasks
    models      loading for training and for inference, 4-bit CPU paths, reward models
    data        listwise rows, prompt files, tokenisation, candidate statistics
    config      the recipe schema: sections, ablations, strict YAML
    utils       files, the user's files, dtypes, processes, progress lines, report files, plots
    errors      (errors.py) UserInputError, the one user-facing error: exit code 2 and a message

builtin sits below stages (they resolve prompt sets through it) and needs only data and utils;
the run directory's creation is the pipeline's, while the state the stages share
(stages.run_context) needs only config, so no stage imports the pipeline.

Heavy modules (transformers, peft) load on first use, so `rrhf-lite --help` and the losses
stay quick to import.
"""

from __future__ import annotations

import importlib
import warnings

from rrhf_lite.models.cpu_4bit import quiet_optional_kernel_warning

__version__ = "0.1.0"

# Before anything imports bitsandbytes: its "Failed to load CPU gemm_4bit_forward" warning on
# AVX512-BF16 CPUs reads like an error but only means an optional package is absent.
quiet_optional_kernel_warning()

# peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model
# (PeftModel.__init__), so every model load printed a FutureWarning the user can do nothing
# about; hide that one message only (PEFT_CHECKPOINTING_WARNING), nothing else.
PEFT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"
warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)

# public name -> module that defines it
_EXPORTS = {
    "rank_loss": "rrhf_lite.training.losses",
    "sft_loss": "rrhf_lite.training.losses",
    "rrhf_loss": "rrhf_lite.training.losses",
    "RRHFConfig": "rrhf_lite.training.config",
    "RRHFTrainer": "rrhf_lite.training.trainer",
    "UserInputError": "rrhf_lite.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rrhf_lite' has no attribute {name!r}")
