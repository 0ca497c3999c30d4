"""Attention for packed rows that computes only what the packed mask lets through.

A packed row (rrhf_lite.training.shared_prompt) is `prompt, response_1, ..., response_m`; its 4-D mask
hides most of the row from most of it (a response sees the prompt and itself), yet sdpa and eager
attention compute the whole L x L block and mask it afterwards: at prompt 200, response 100,
k = 6, 640k scores of which 200k count. Here the same attention is computed in two parts:
  - the prompt's queries against the prompt's keys, causal (one block per row);
  - each response's queries against the prompt's keys and its own keys, gathered into one
    [candidates, P + R] block per response, causal on its own part;
and the outputs are put back in row order. Each query meets the same keys and values as under
the mask, so the numbers are the same up to float summation order (tests compare the trainer's
loss and gradients both ways).

It is an attention implementation for transformers (`AttentionInterface`): `use_segments`
switches a model whose attention is plain sdpa or eager (no softcapping, no sliding window) to
"rrhf_segments_<base>", which runs the two-part attention when a forward passes a `rrhf_layout`
and the base implementation otherwise (generation, evaluation, unpacked rows), with the base's
mask function. Passing the layout as a forward keyword (not a global) keeps it available to
gradient checkpointing's recomputation in the backward pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFIX = "rrhf_segments_"
BASES = ("sdpa", "eager")


@dataclass
class SegmentLayout:
    """Where the parts of packed rows are (built by shared_prompt.pack_chunk).

    prompt_mask: [rows, 1, Pmax, Pmax] bool, or None when every row's prompt has Pmax tokens
    (then plain causal). key_index [n, Pmax + Rmax] / query_index [n, Rmax]: flat positions
    (row * L + t) of each response's keys (its prompt, then itself) and queries;
    response_mask [n, 1, Rmax, Pmax + Rmax] bool; query_valid [n, Rmax] bool.
    """

    prompt_width: int
    prompt_mask: torch.Tensor | None
    key_index: torch.Tensor
    query_index: torch.Tensor
    response_mask: torch.Tensor
    query_valid: torch.Tensor


def _heads_first(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of flat [R * L, heads, d] picked by index [n, w] -> [n, heads, w, d]."""
    return flat[index].transpose(1, 2)


def segment_attention(module, query, key, value, layout: SegmentLayout, scaling, dropout):
    """query [R, H, L, d], key/value [R, Hkv, L, d] -> output [R, L, H, d] (transformers'
    layout of an attention function's output)."""
    rows, heads, width, dim = query.shape
    groups = heads // key.shape[1]

    def per_query_head(t):  # grouped-query attention: one key/value head per `groups` query heads
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t

    P = layout.prompt_width
    prompt_out = F.scaled_dot_product_attention(
        query[:, :, :P], per_query_head(key[:, :, :P]), per_query_head(value[:, :, :P]),
        attn_mask=layout.prompt_mask, is_causal=layout.prompt_mask is None, dropout_p=dropout,
        scale=scaling)
    flat_q, flat_k, flat_v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim)
                              for t in (query, key, value))
    # gathered before the heads are repeated: the candidates' copies of the prompt's keys and
    # values stay at the key/value head count
    response_out = F.scaled_dot_product_attention(
        _heads_first(flat_q, layout.query_index),
        per_query_head(_heads_first(flat_k, layout.key_index)),
        per_query_head(_heads_first(flat_v, layout.key_index)), attn_mask=layout.response_mask,
        dropout_p=dropout, scale=scaling)
    # rows in order: the prompt block, then every response token in its place (padding 0)
    out = torch.zeros(rows, width, heads, dim, dtype=prompt_out.dtype, device=prompt_out.device)
    out[:, :P] = prompt_out.transpose(1, 2)
    out = out.reshape(rows * width, heads, dim)
    valid = layout.query_valid
    out = out.index_copy(0, layout.query_index[valid], response_out.transpose(1, 2)[valid])
    return out.view(rows, width, heads, dim)


def _implementation(base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, *, dropout=0.0, scaling=None,
                  rrhf_layout: SegmentLayout | None = None, **kwargs):
        if rrhf_layout is None:
            # eager is each model file's own function, not in the registry
            plain = (ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else
                     sys.modules[type(module).__module__].eager_attention_forward)
            return plain(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, **kwargs)
        return segment_attention(module, query, key, value, rrhf_layout, scaling, dropout), None

    return attention


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _implementation(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def segments_possible(config) -> str | None:
    """The base implementation the two-part attention can stand in for, or None."""
    base = getattr(config, "_attn_implementation", None)
    if base and base.startswith(PREFIX):
        return base[len(PREFIX):]
    if base not in BASES:
        return None
    # a plain softmax over q.k: no softcapping, no sliding window, no attention sinks
    for field in ("attn_logit_softcapping", "sliding_window", "layer_types"):
        if getattr(config, field, None) not in (None, [], ()):
            return None
    return base


def use_segments(config) -> bool:
    """Switch `config` to the two-part attention (idempotent); False where it cannot stand in."""
    base = segments_possible(config)
    if base is None:
        return False
    config._attn_implementation = _register(base)
    return True


def restore(config) -> None:
    """Back to the base implementation (e.g. before the model is saved or handed back)."""
    name = getattr(config, "_attn_implementation", None)
    if name and name.startswith(PREFIX):
        config._attn_implementation = name[len(PREFIX):]
