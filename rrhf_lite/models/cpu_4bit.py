"""Which CPU path bitsandbytes takes for each 4-bit linear layer, decided by us.

bitsandbytes runs a 4-bit `Linear4bit` on the CPU in one of two ways:

- dequantise + matmul in the layer's compute dtype: any shape, differentiable; what training
  always uses.
- a fused bf16 kernel, on CPUs with AVX512-BF16 only. bitsandbytes switches a layer to it by
  itself, the first time the layer runs in eval mode on an input that needs no grad: it repacks
  the weight in place into the kernel's layout and computes in bf16 from then on.

Left to itself, that switch breaks us in three ways. The repacking assumes out_features is a
multiple of 32 and in_features a multiple of the quantisation block (64): other shapes crash
(tiny models, and a user's model with an odd hidden size). The packed layer has no backward and
computes in bf16, so a model packed during an evaluation would then train on different numbers
(the two passes of the micro-batched step must agree exactly). And the repacking rounds the
quantisation scales to bf16, while bitsandbytes' own inverse restores them only approximately
(and leaves them in the wrong layout without double quantisation), so a packed model that is
moved or saved afterwards carries corrupt weights.

So every 4-bit layer's path is set when the model is loaded, through the per-layer flag
bitsandbytes reads (`support_avx512bf16_for_cpu`):
- inference models (sampling, evaluation, generation, merge checks): fused where the CPU has the
  kernel and the layer's shape allows it, dequantise + matmul elsewhere;
- training models: never fused; a layer that was packed already is unpacked first (warned: its
  scales stay rounded to bf16).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with bitsandbytes, on first use: `import rrhf_lite` stays quick
    import torch

logger = logging.getLogger(__name__)

# bitsandbytes' packing groups output rows in blocks of this many (functional.py, block_n).
PACK_ROW_BLOCK = 32

# bitsandbytes logs this when the optional Hugging Face `kernels` package (a hub download of a
# faster CPU kernel) cannot be loaded; it then uses its own built-in kernel, which is fine.
_OPTIONAL_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _OptionalKernelNotice(logging.Filter):
    """Keeps bitsandbytes' 'Failed to load CPU gemm_4bit_forward' warning out of the output.

    It is printed by every run on an AVX512-BF16 CPU without `pip install kernels` and reads
    like a failure, yet nothing is wrong: the built-in kernel runs instead. Said once at debug
    level in plain words instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_OPTIONAL_KERNEL_MESSAGE):
            return True
        logger.debug("bitsandbytes: the optional `kernels` package is not available, so 4-bit "
                     "CPU inference uses bitsandbytes' built-in AVX512-BF16 kernel (nothing is "
                     "wrong)")
        return False


def quiet_optional_kernel_warning() -> None:
    """Install the filter on bitsandbytes' CPU backend logger (before bitsandbytes loads it)."""
    target = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _OptionalKernelNotice) for f in target.filters):
        target.addFilter(_OptionalKernelNotice())


def fused_kernel_available() -> bool:
    """Whether this CPU has bitsandbytes' fused 4-bit kernel (AVX512-BF16), as bitsandbytes sees it."""
    import bitsandbytes.functional as bnb_functional

    return bool(bnb_functional.has_avx512bf16())


def linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every bitsandbytes Linear4bit in the model (PEFT's LoRA wrappers keep them as base layers)."""
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def is_packed(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def packable(layer: torch.nn.Module) -> bool:
    """Whether bitsandbytes' repacking is valid for this layer (else it crashes or misreads).

    The weight [out, in] is packed in blocks of 32 output rows, and its scales are regrouped as
    [in / blocksize, out]: both need whole blocks.
    """
    state = layer.weight.quant_state
    if state is None or layer.weight.device.type != "cpu" or len(state.shape) != 2:
        return False
    out_features, in_features = (int(n) for n in state.shape)
    return (out_features % PACK_ROW_BLOCK == 0 and in_features % state.blocksize == 0
            and in_features % 2 == 0)


@dataclass(frozen=True)
class CpuPaths:
    """How many 4-bit layers take each path (layers on a GPU count as neither)."""

    fused: int = 0
    dequantize: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def configure_for_inference(model: torch.nn.Module, *, fused: bool = True) -> CpuPaths:
    """Let each CPU 4-bit layer use the fused kernel only where it is available and valid.

    fused=False keeps every layer on dequantise + matmul (the numbers training computes).
    A layer already packed where it should not be is unpacked.
    """
    allow = fused and fused_kernel_available()
    fused_count = dequantize_count = 0
    for layer in linear4bit_layers(model):
        if layer.weight.device.type != "cpu":
            continue
        use = allow and packable(layer)
        layer.support_avx512bf16_for_cpu = use
        if not use and is_packed(layer):
            unpack(layer)
        fused_count += use
        dequantize_count += not use
    return CpuPaths(fused=fused_count, dequantize=dequantize_count)


def configure_for_training(model: torch.nn.Module) -> int:
    """No layer of a model that trains is ever packed; returns how many had to be unpacked."""
    unpacked = 0
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
        if is_packed(layer):
            unpack(layer)
            unpacked += 1
    if unpacked:
        logger.warning(
            "%d 4-bit layers had been packed for bitsandbytes' fused CPU inference kernel (the "
            "model ran in eval mode before training); they are unpacked now, but their "
            "quantisation scales stay rounded to bf16. Load the model afresh for exact weights.",
            unpacked)
    return unpacked


def unpack(layer: torch.nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of one layer, scales in their original layout.

    bitsandbytes' inverse restores the weight's nibbles exactly; the scales it leaves transposed
    ([in / blocksize, out], bf16) when there was no double quantisation, so they are put back
    here. What packing rounded to bf16 cannot be recovered.
    """
    import bitsandbytes.functional as bnb_functional
    import torch

    weight, state = bnb_functional._convert_weight_packed_for_cpu_inverse(
        layer.weight.data, layer.weight.quant_state)
    if state.absmax.dim() == 2:  # still in the packed [in / blocksize, out] layout
        state.absmax = state.absmax.t().reshape(-1).to(torch.float32).contiguous()
    layer.weight.data = weight
    layer.weight.quant_state = state
    layer.quant_state = state


def compute_path(model: torch.nn.Module) -> dict:
    """What the model's 4-bit layers ran on, read from the layers themselves after a forward.

    Returns {"path": "fused-bf16" | "dequantize" | "mixed" | "none", "fused_layers",
    "dequantize_layers", "compute_dtype"}; "none" when there is no 4-bit layer.
    """
    layers = linear4bit_layers(model)
    fused = sum(is_packed(layer) for layer in layers)
    rest = len(layers) - fused
    path = ("none" if not layers else "fused-bf16" if not rest
            else "dequantize" if not fused else "mixed")
    dtypes = {str(layer.compute_dtype).removeprefix("torch.") for layer in layers
              if not is_packed(layer) and layer.compute_dtype is not None}
    return {"path": path, "fused_layers": fused, "dequantize_layers": rest,
            "compute_dtype": ",".join(sorted(dtypes)) or None}
