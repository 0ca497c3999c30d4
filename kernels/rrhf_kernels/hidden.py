"""Per-candidate log-prob sums from hidden states and the output embedding: no [N, T, V] logits.

``candidate_logprob_sums_from_hidden(hidden, weight, labels, bias=None, ...) -> (sums, counts)``
equals ``candidate_logprob_sums(F.linear(hidden, weight, bias), labels, ...)`` but never builds
the logits: they are made one [rows x cols] tile at a time (_hidden_tiles.py) and folded into an
online logsumexp. Differentiable w.r.t. hidden, weight and bias; backward recomputes the tiles
from the saved per-token logsumexp.

``weighted_logprob_sum_from_hidden(hidden, weight, labels, coef, ...) -> (total, sums, counts)``
is for a caller that knows d loss / d sums before the forward (the trainer's third pass: coef =
g_i = dL/dS_i): total = sum_n coef[n] * sums[n], whose gradients are computed during the forward
and kept (hidden- and weight-sized, never logits-sized); backward only scales them.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1: Triton kernels for the tile work,
torch matmuls), "torch" (chunked torch ops), "auto" (triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch

from . import _hidden_tiles as tiles
from .api import _FLOAT_DTYPES, _resolve_backend


def _ops(backend: str, dtype: torch.dtype):
    if backend == "triton" and dtype != torch.float64:
        try:
            from ._triton_tiles import TritonTiles
        except ImportError as err:
            raise RuntimeError(f"backend='triton' needs the 'triton' package: {err}") from err
        return TritonTiles
    return tiles.TorchTiles


def _check(hidden, weight, bias, labels, ignore_index) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a [N, T, H] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[2]}, got {tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be one of {_FLOAT_DTYPES}, got {t.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] in {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be a [N, T] tensor matching hidden {tuple(hidden.shape)}, "
                         f"got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if len({hidden.device, weight.device, labels.device}) != 1:
        raise ValueError(f"hidden, weight and labels must share a device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    valid = labels != ignore_index
    vocab = weight.shape[0]
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"label {labels[bad][0].item()} is outside the vocabulary [0, {vocab}) and "
                         f"is not ignore_index={ignore_index}; mask prompt/padding positions")


def _valid_tokens(labels, ignore_index):
    """Flat indices n * T + t of the valid tokens, their targets, their candidate rows."""
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    return rows, flat[rows].long(), rows // labels.shape[1]


def _sums(token_values, owners, n_rows):
    return torch.zeros(n_rows, dtype=token_values.dtype, device=token_values.device).index_add_(
        0, owners, token_values)


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, ops, shape):
        rows, targets, owners = _valid_tokens(labels, ignore_index)
        lp, lse = tiles.token_logprobs(ops, hidden, weight, bias, rows, targets, *shape)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, owners, lse)
        ctx.ops, ctx.shape = ops, shape
        # backward recomputes the tiles: under the same autocast state, so the same logits
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        return _sums(lp, owners, hidden.shape[0]), lse

    @staticmethod
    def backward(ctx, grad_sums, _grad_lse):
        hidden, weight, bias, rows, targets, owners, lse = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        if not any(need):
            return None, None, None, None, None, None, None
        coef = grad_sums.to(lse.dtype)[owners]
        kind, enabled, dtype = ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            gh, gw, gb, _ = tiles.token_grads(ctx.ops, hidden, weight, bias, rows, targets, coef,
                                              *ctx.shape, lse=lse, need=need)
        gh = None if gh is None else gh.to(hidden.dtype)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, gb, None, None, None, None


class _WeightedFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, coef, lse, ignore_index, ops, shape, need):
        rows, targets, owners = _valid_tokens(labels, ignore_index)
        acc = tiles.acc_dtype(weight.dtype)
        token_lse = None if lse is None else lse.reshape(-1)[rows].to(acc)
        token_coef = coef.detach().to(acc)[owners]
        gh, gw, gb, lp = tiles.token_grads(ops, hidden, weight, bias, rows, targets, token_coef,
                                           *shape, lse=token_lse, need=need)
        sums = _sums(lp, owners, hidden.shape[0])
        ctx.save_for_backward(gh, None if gw is None else gw.to(weight.dtype),
                              None if gb is None else gb.to(bias.dtype))
        ctx.mark_non_differentiable(sums)
        return (coef.detach().to(acc) * sums).sum(), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        gh, gw, gb = ctx.saved_tensors
        out = [None if g is None else g * grad_total.to(g.dtype) for g in (gh, gw, gb)]
        return (*out, None, None, None, None, None, None, None)


def _shape(hidden, weight, labels, ignore_index, chunk_tokens, chunk_vocab):
    tokens = int((labels != ignore_index).sum())
    return tiles.tile_shape(tokens, weight.shape[0], chunk_tokens, chunk_vocab, weight.dtype)


def candidate_logprob_sums_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None = None, ignore_index: int = -100, backend: str = "auto", *,
    chunk_tokens: int | None = None, chunk_vocab: int | None = None, return_lse: bool = False,
):
    """Per candidate: (sum of target log-probs, valid-token count), logits = hidden @ weight.T + bias.

    hidden [N, T, H], weight [V, H] (and bias [V]) of the output embedding, labels [N, T] aligned
    with hidden (the label at t is the target of position t; no shift inside). Returns ``sums``
    [N] float32 (float64 for float64 weights), differentiable w.r.t. hidden, weight and bias, and
    ``counts`` [N] int64; with ``return_lse`` also the per-token logsumexp [N, T] (0 where
    ignored; no gradient), which ``weighted_logprob_sum_from_hidden(lse=...)`` can reuse.
    ``chunk_tokens`` / ``chunk_vocab``: tile shape (None: a few % of the logits' bytes).
    """
    _check(hidden, weight, bias, labels, ignore_index)
    counts = (labels != ignore_index).sum(dim=-1)
    resolved = _resolve_backend(backend, hidden.device)
    shape = _shape(hidden, weight, labels, ignore_index, chunk_tokens, chunk_vocab)
    sums, token_lse = _FromHidden.apply(hidden, weight, bias, labels, int(ignore_index),
                                        _ops(resolved, weight.dtype), shape)
    if not return_lse:
        return sums, counts
    lse = torch.zeros(labels.shape, dtype=token_lse.dtype, device=labels.device)
    lse.view(-1)[_valid_tokens(labels, ignore_index)[0]] = token_lse.detach()
    return sums, counts, lse


def weighted_logprob_sum_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
    bias: torch.Tensor | None = None, ignore_index: int = -100, backend: str = "auto", *,
    lse: torch.Tensor | None = None, chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, sums, counts) with total = sum_n coef[n] * sums[n]; gradients made in the forward.

    ``coef`` [N]: the known d loss / d sums (treated as a constant). ``total`` is a scalar whose
    backward gives the gradients w.r.t. hidden, and weight / bias where they require grad,
    computed while the forward runs, so no logits-sized tensor lives at any point. ``sums``
    (detached) and ``counts`` as in candidate_logprob_sums_from_hidden. ``lse`` [N, T]: the
    per-token logsumexp from an earlier forward of the same hidden states (return_lse=True);
    it saves the first of two passes over the vocabulary when it is split into tiles.
    """
    _check(hidden, weight, bias, labels, ignore_index)
    if not isinstance(coef, torch.Tensor) or coef.shape != hidden.shape[:1]:
        raise ValueError(f"coef must be a [N] = [{hidden.shape[0]}] tensor, got "
                         f"{tuple(getattr(coef, 'shape', ()))}")
    if lse is not None and lse.shape != labels.shape:
        raise ValueError(f"lse must be [N, T] like labels, got {tuple(lse.shape)}")
    counts = (labels != ignore_index).sum(dim=-1)
    resolved = _resolve_backend(backend, hidden.device)
    shape = _shape(hidden, weight, labels, ignore_index, chunk_tokens, chunk_vocab)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    total, sums = _WeightedFromHidden.apply(hidden, weight, bias, labels, coef, lse,
                                            int(ignore_index), _ops(resolved, weight.dtype),
                                            shape, need)
    return total, sums, counts
