"""Floating-point dtypes by name, and what "auto" means on this machine (one rule for every stage).

Every dtype a recipe, a CLI flag or a loader names goes through `parse_dtype`; `pretrained_dtype`
is the one variant, for from_pretrained, where "auto" means the checkpoint's own dtype.
"""

from __future__ import annotations

from rrhf_lite.errors import UserInputError

# accepted spellings -> torch attribute name
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}


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


def parse_dtype(value, *, where: str = "torch_dtype", device: str | None = None,
                auto: bool = True, hint: str | None = None):
    """A dtype name (any spelling in DTYPE_NAMES), "auto" or a torch.dtype -> torch.dtype.

    "auto" follows auto_dtype_name(device); auto=False refuses it. Unknown names raise a
    UserInputError that names `where`.
    """
    import torch

    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value == "auto" and auto:
        return torch_dtype("auto", device)
    if value not in DTYPE_NAMES:
        choices = ", ".join(["auto"] * auto + sorted(set(DTYPE_NAMES.values())))
        raise UserInputError(f"unknown dtype {value!r}", where=where,
                             hint=hint or f"use one of {choices}")
    return getattr(torch, DTYPE_NAMES[value])


def dtype_name(dtype) -> str:
    """torch.float16 -> "float16"."""
    return str(dtype).removeprefix("torch.")


def pretrained_dtype(value):
    """What from_pretrained's dtype takes: "auto" or None (the checkpoint's own dtype) pass
    through; a dtype name or torch.dtype is parsed (parse_dtype, "auto" excluded)."""
    if value is None or value == "auto":
        return value
    return parse_dtype(value, auto=False, hint="use auto or a dtype name such as bfloat16")
