"""Public entry points: input checks, backend choice, and the autograd wrapper."""

from __future__ import annotations

import math

import torch

from . import _torch_backend

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def triton_available() -> bool:
    """True when triton imports (Linux); the triton backend also needs CUDA or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_backend():
    # Imported lazily: triton reads TRITON_INTERPRET when its @jit decorators run, and triton
    # may be absent (macOS, Windows) where only the torch backend is meant to work.
    try:
        from . import _triton_backend as module
    except ImportError as err:
        raise RuntimeError(
            "backend='triton' needs the 'triton' package (Linux + CUDA, or TRITON_INTERPRET=1 "
            f"for CPU tensors); it failed to import: {err}. Use backend='torch' instead."
        ) from err
    return module


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [N, T, V] tensor, got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype must be one of {_FLOAT_DTYPES}, got {logits.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be a [N, T] tensor matching logits {tuple(logits.shape)}, "
            f"got {tuple(getattr(labels, 'shape', ()))}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device} but logits on {logits.device}")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    valid = labels != ignore_index
    vocab = logits.shape[-1]
    # One host sync; an out-of-range target would otherwise read outside the row (triton).
    if bool(((labels < 0) | (labels >= vocab))[valid].any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab))][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}; mask prompt/padding positions with ignore_index"
        )


class _LogprobSums(torch.autograd.Function):
    """sums[n] = sum over valid t of log_softmax(logits[n, t])[labels[n, t]]."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, backend, options):
        if backend == "triton":
            sums, saved = _triton_backend().forward(logits, labels, ignore_index, **options)
        else:
            sums, saved = _torch_backend.forward(logits, labels, ignore_index, **options)
        # The logits are saved by reference (autograd keeps the caller's tensor alive anyway);
        # besides them only small per-token tensors are kept.
        ctx.save_for_backward(logits, labels, *saved)
        ctx.ignore_index, ctx.backend, ctx.options = ignore_index, backend, options
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        logits, labels, *saved = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad = _triton_backend().backward(
                    grad_sums, logits, labels, saved, ctx.ignore_index, **ctx.options
                )
            else:
                grad = _torch_backend.backward(grad_sums, logits, saved, **ctx.options)
        return grad, None, None, None, None


def candidate_logprob_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    block_size: int | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate row: (sum of target-token log-probs, number of valid tokens).

    Returns ``sums`` [N] (float32; float64 when the logits are float64), differentiable w.r.t.
    logits, and ``counts`` [N] int64 (no gradient). A row with no valid token has sum 0 and
    count 0. ``block_size`` (triton: vocabulary tile, a power of two) and ``chunk_rows`` (torch:
    token rows per slab) are tuning knobs; None picks a default.
    """
    _check_inputs(logits, labels, ignore_index)
    counts = (labels != ignore_index).sum(dim=-1)
    backend = _resolve_backend(backend, logits.device)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        # Nothing to reduce; keep the result attached to the graph so backward still works.
        sums = logits.sum(dim=(1, 2)) * 0
        return sums.to(_torch_backend.acc_dtype(logits.dtype)), counts
    if backend == "triton":
        options = {"block_size": block_size}
    else:
        options = {"chunk_rows": chunk_rows}
    sums = _LogprobSums.apply(logits, labels, int(ignore_index), backend, options)
    return sums, counts


def candidate_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    length_penalty: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """RRHF candidate scores p_i = sum_t log p(y_t) / max(count_i, 1) ** length_penalty.

    logits [N, T, V] (fp32/bf16/fp16), labels [N, T] aligned with logits (no shift inside),
    positions equal to ``ignore_index`` are skipped. Returns float32 [N], differentiable w.r.t.
    logits; a row with no valid token scores 0.
    """
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, int | float):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    sums, counts = candidate_logprob_sums(logits, labels, ignore_index, backend)
    denom = counts.clamp(min=1).to(sums.dtype) ** float(length_penalty)
    return (sums / denom).float()
