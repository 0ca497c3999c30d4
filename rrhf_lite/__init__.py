"""rrhf-lite: RRHF on one GPU.

Heavy modules (transformers, peft) load on first use, so `rrhf-lite --help` and the losses
stay quick to import.
"""

from __future__ import annotations

import importlib

from rrhf_lite.cpu_4bit import quiet_optional_kernel_warning

__version__ = "0.1.0"

# Before anything imports bitsandbytes: its "Failed to load CPU gemm_4bit_forward" warning on
# AVX512-BF16 CPUs reads like an error but only means an optional package is absent.
quiet_optional_kernel_warning()

# public name -> module that defines it
_EXPORTS = {
    "rank_loss": "rrhf_lite.loss",
    "sft_loss": "rrhf_lite.loss",
    "rrhf_loss": "rrhf_lite.loss",
    "RRHFConfig": "rrhf_lite.trainer_config",
    "RRHFTrainer": "rrhf_lite.trainer",
    "UserInputError": "rrhf_lite.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rrhf_lite' has no attribute {name!r}")
