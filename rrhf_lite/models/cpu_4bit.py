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

And the fused kernel is not always the faster one: it wins for calls that multiply few rows
(decoding a small batch) and can lose for many (a prefill, a large batch), by a margin that
depends on the CPU (benchmarks/cpu_4bit_rows_bench.py). So we never let bitsandbytes repack a
layer in place (its flag `support_avx512bf16_for_cpu` stays off), and choose the path per call:

- inference models (sampling, evaluation, generation): each layer whose shape packs keeps a
  packed copy of its weight beside the exact one; a call of at most `max_rows` input rows runs
  the fused kernel on the copy, a larger call dequantise + matmul on the weight itself. By
  default `max_rows` is measured once on this machine for the model's layer shapes (the largest
  row count at which the fused kernel is faster on every shape) and cached; a recipe can set it
  (quantization.fused_cpu_max_rows) or turn the kernel off (quantization.fused_cpu_kernel).
- training models: never fused; a layer that bitsandbytes packed already is unpacked first
  (warned: its scales stay rounded to bf16), and a packed copy is dropped.
The weight itself is never repacked, so saving, moving or merging a model sees exact weights.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    """How many 4-bit layers may take each path (layers on a GPU count as neither), and the
    largest call (input rows) the fused ones run fused (None: every call)."""

    fused: int = 0
    dequantize: int = 0
    max_rows: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FusedCopy:
    """A layer's weight packed for the fused kernel, kept beside the exact one, and what the
    layer's calls ran on so far."""

    weight: torch.Tensor
    state: object  # bitsandbytes QuantState, in the packed layout
    max_rows: int | None
    calls: dict = field(default_factory=lambda: {"fused": 0, "dequantize": 0})


def _choose_path_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward with the path chosen per call: the fused kernel on the packed copy for
    an eval-mode, no-grad CPU call of at most max_rows rows, else bitsandbytes' own forward
    (dequantise + matmul, since the layer's own weight is never packed)."""
    import bitsandbytes as bnb

    fused = self.rrhf_fused
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or self.training or x.requires_grad
            or (fused.max_rows is not None and rows > fused.max_rows)):
        fused.calls["dequantize"] += 1
        return self.rrhf_plain_class.forward(self, x)
    fused.calls["fused"] += 1
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return bnb.matmul_4bit(x, fused.weight, bias=bias, quant_state=fused.state).to(inp_dtype)


_PATH_CHOOSING = {}


def _path_choosing_class(plain: type) -> type:
    """A subclass of the layer's class whose forward chooses the path per call (same name, so a
    model prints as before; isinstance checks of bitsandbytes and PEFT still hold)."""
    if plain not in _PATH_CHOOSING:
        _PATH_CHOOSING[plain] = type(plain.__name__, (plain,), {
            "forward": _choose_path_forward, "rrhf_plain_class": plain,
            "__doc__": f"{plain.__name__} choosing bitsandbytes' CPU path per call (rrhf-lite)"})
    return _PATH_CHOOSING[plain]


def packed_copy(layer: torch.nn.Module) -> tuple:
    """(weight, quant state) of `layer` in the fused kernel's layout; the layer is untouched."""
    import copy

    import bitsandbytes.functional as bnb_functional

    state = copy.deepcopy(layer.weight.quant_state)  # packing rewrites the state it is given
    return bnb_functional._convert_weight_packed_for_cpu(layer.weight.data.clone(), state)


def attach_fused_copy(layer: torch.nn.Module, max_rows: int | None) -> None:
    """Give `layer` a packed copy of its weight and the per-call choice of path."""
    layer.rrhf_fused = FusedCopy(*packed_copy(layer), max_rows)
    if not hasattr(type(layer), "rrhf_plain_class"):
        layer.__class__ = _path_choosing_class(type(layer))


def detach_fused_copy(layer: torch.nn.Module) -> None:
    """Back to bitsandbytes' own layer: no packed copy, its own forward."""
    plain = getattr(type(layer), "rrhf_plain_class", None)
    if plain is not None:
        layer.__class__ = plain
    layer.__dict__.pop("rrhf_fused", None)


def has_fused_copy(layer: torch.nn.Module) -> bool:
    return getattr(layer, "rrhf_fused", None) is not None


def configure_for_inference(model: torch.nn.Module, *, fused: bool | int | str = True) -> CpuPaths:
    """Let each CPU 4-bit layer use the fused kernel per call, where it is available and valid.

    fused: True or "auto" = for calls of up to the measured crossover (fused_max_rows); an int
    N >= 1 = for calls of up to N input rows; False or 0 = never (the numbers training computes).
    A layer that bitsandbytes packed already is unpacked.
    """
    layers = [m for m in linear4bit_layers(model) if m.weight.device.type == "cpu"]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # bitsandbytes never repacks in place
        if is_packed(layer):
            unpack(layer)
        detach_fused_copy(layer)
    candidates = [m for m in layers if packable(m)] if fused and fused_kernel_available() else []
    if fused is True or fused == "auto":
        max_rows = fused_max_rows(candidates) if candidates else None
    else:
        max_rows = int(fused)
    if max_rows == 0:
        candidates = []
    for layer in candidates:
        attach_fused_copy(layer, max_rows)
    return CpuPaths(fused=len(candidates), dequantize=len(layers) - len(candidates),
                    max_rows=max_rows if candidates else None)


# -------------------------------------------------------------- where the fused kernel pays

# Row counts the crossover is measured at; the fused kernel faster at all of them = no limit.
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CALIBRATION_REPEATS = 5


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    root = os.environ.get("RRHF_LITE_CACHE") or Path.home() / ".cache" / "rrhf-lite"
    return Path(root) / "cpu_4bit_crossover.json"


def alternating_median_seconds(first, second, repeats: int) -> tuple[float, float]:
    """Median times of two calls made one after the other, so load on the machine hits both."""
    first(), second()  # warm-up
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def measure_crossover(layers: list[torch.nn.Module], timer=alternating_median_seconds) -> int | None:
    """The largest row count of CALIBRATION_ROWS at which the fused kernel is faster than
    dequantise + matmul on every layer given (0: never; None: at every count measured)."""
    import bitsandbytes as bnb
    import torch

    pairs = [(layer, *packed_copy(layer)) for layer in layers]
    best = 0
    with torch.no_grad():
        for rows in CALIBRATION_ROWS:
            for layer, packed, packed_state in pairs:
                x = torch.randn(rows, int(layer.weight.quant_state.shape[1]))
                x_bf16 = x.to(torch.bfloat16)
                plain = getattr(type(layer), "rrhf_plain_class", type(layer))
                fused_s, plain_s = timer(
                    lambda x_bf16=x_bf16, packed=packed, state=packed_state:
                        bnb.matmul_4bit(x_bf16, packed, quant_state=state),
                    lambda layer=layer, x=x, plain=plain: plain.forward(layer, x),
                    CALIBRATION_REPEATS)
                if fused_s >= plain_s:
                    return best
            best = rows
    return None


def fused_max_rows(layers: list[torch.nn.Module]) -> int | None:
    """The crossover for these layers' shapes on this machine: measured once (about a second
    for a model of SmolLM2's shapes), then read from the cache under $RRHF_LITE_CACHE."""
    import bitsandbytes
    import torch

    by_shape: dict = {}
    for layer in layers:
        by_shape.setdefault(tuple(int(n) for n in layer.weight.quant_state.shape), layer)
    shapes = sorted(by_shape)
    key = (f"{_cpu_name()} | bitsandbytes {bitsandbytes.__version__} | "
           f"{torch.get_num_threads()} threads | " + " ".join(f"{o}x{i}" for o, i in shapes))
    path = _cache_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if key in cache:
        return cache[key]
    was_training = {layer: layer.training for layer in by_shape.values()}
    for layer in by_shape.values():
        layer.eval()
    max_rows = measure_crossover([by_shape[s] for s in shapes])
    for layer, training in was_training.items():
        layer.train(training)
    logger.info("4-bit CPU layers: bitsandbytes' fused AVX512-BF16 kernel for calls of %s input "
                "rows, dequantise + matmul above (measured on this CPU; cached in %s)",
                "any number of" if max_rows is None else f"at most {max_rows}", path)
    cache[key] = max_rows
    try:
        from rrhf_lite.utils.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    except OSError:  # a read-only home: measured again next time, nothing else changes
        pass
    return max_rows


def configure_for_training(model: torch.nn.Module) -> int:
    """No layer of a model that trains is ever packed; returns how many had to be unpacked."""
    unpacked = 0
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
        detach_fused_copy(layer)
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
    """What the model's 4-bit layers ran on so far, read from the layers themselves.

    Returns {"path": "fused-bf16" | "dequantize" | "mixed" | "none", "fused_layers" (layers that
    ran at least one call fused), "dequantize_layers" (the others), "fused_calls",
    "dequantize_calls" (calls of layers that have a packed copy), "max_rows" (the largest call
    run fused; None: any), "compute_dtype"}; "none" when there is no 4-bit layer. A layer that
    bitsandbytes packed in place (outside rrhf-lite's loaders) counts as fused.
    """
    layers = linear4bit_layers(model)
    copies = [layer.rrhf_fused for layer in layers if has_fused_copy(layer)]
    fused = sum(is_packed(layer) or (has_fused_copy(layer) and layer.rrhf_fused.calls["fused"] > 0)
                for layer in layers)
    rest = len(layers) - fused
    path = ("none" if not layers else "fused-bf16" if not rest
            else "dequantize" if not fused else "mixed")
    dtypes = {str(layer.compute_dtype).removeprefix("torch.") for layer in layers
              if not is_packed(layer) and layer.compute_dtype is not None}
    return {"path": path, "fused_layers": fused, "dequantize_layers": rest,
            "fused_calls": sum(c.calls["fused"] for c in copies),
            "dequantize_calls": sum(c.calls["dequantize"] for c in copies),
            "max_rows": copies[0].max_rows if copies else None,
            "compute_dtype": ",".join(sorted(dtypes)) or None}
