"""Which floating-point dtype "auto" means on this machine (one rule for every stage)."""

from __future__ import annotations


def auto_dtype_name(device: str | None = None) -> str:
    """"bfloat16" on a CUDA GPU with native bf16, "float16" on other CUDA GPUs, else "float32".

    `device` None means "cuda when there is one". including_emulation=False: a T4 only emulates
    bf16, slowly; it must get fp16.
    """
    import torch

    on_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if not on_cuda:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def torch_dtype(name: str, device: str | None = None):
    """"auto" (see auto_dtype_name), "float32", "bfloat16", "float16" or "uint8" -> torch.dtype."""
    import torch

    return getattr(torch, auto_dtype_name(device) if name == "auto" else name)
