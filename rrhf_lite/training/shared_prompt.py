"""Each prompt once for its k candidates: the packed layout the trainer scores candidates in.

Unshared, a chunk of n candidates is n rows `prompt + response_i`, so the model runs the prompt
n times. Packed, the candidates of one prompt form one row `prompt, response_1, ..., response_m`
with
  - a 4-D additive attention mask [rows, 1, L, L]: a token sees the prompt and the earlier tokens
    of its own response, nothing of the other responses;
  - position ids that continue from the prompt's end separately for each response (P, P+1, ...).
Every response token then meets exactly the keys, values and rotary positions it meets in its
own unshared row, so its hidden state is the same function of the same inputs (masked keys add
exp(min) = 0 to the softmax): the same numbers up to float summation order, for
6(P + R) -> P + 6R tokens at k = 6. The outputs predicting response j's labels (the prompt's last
position for its first token, then response j's own positions) are gathered into [n, R, D], so
the rrhf_kernels reductions and the trainer's two-pass gradient are unchanged.

Padding positions (after a short row's end) see the prompt only: a query that sees nothing would
give NaN in the softmax and, through its backward, in the values' gradient.

The mask is honoured by the eager and sdpa attention of transformers (a 4-D mask is used as
given); flash-attention kernels ignore it, which is why `share_prompt: auto` checks the model
once (logprobs.packing_agrees) before turning packing on. Those attentions still compute the
whole L x L block; a model with plain sdpa or eager attention is switched to
rrhf_lite.training.segment_attention, which computes only the parts the mask lets through, from the
`layout` a packed chunk carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rrhf_lite.data.tokenization import IGNORE_INDEX
from rrhf_lite.training.segment_attention import PREFIX as SEGMENTS_PREFIX
from rrhf_lite.training.segment_attention import SegmentLayout

# attention implementations known to drop a custom 4-D mask (they take a 2-D padding mask only)
IGNORES_CUSTOM_MASKS = ("flash_attention", "paged")


@dataclass
class PackedChunk:
    """A chunk of candidates as packed rows, and where each candidate's outputs are.

    input_ids, position_ids [rows, L]; attention_mask [rows, 1, L, L] (see segment_mask); keep: how many trailing positions the model must output (logits_to_keep);
    scored [m] long: the chunk's candidates with at least one label to score (the others have
    sum 0 and count 0, as unshared); source [m, R] long: for each of their labels, the flat index
    into the [rows * keep] outputs that predicts it (0 on padding); labels [m, R] (-100 on
    padding); layout: the same rows in parts, for rrhf_lite.training.segment_attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: int
    scored: torch.Tensor
    source: torch.Tensor
    labels: torch.Tensor
    layout: SegmentLayout

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def _scored_spans(attention_mask, labels):
    """(index, first, length) per candidate with a label to score. `first` is the first labelled
    position (at least 1: position 0 is never predicted, as in the unshared rows); the prompt is
    everything before it."""
    lengths = attention_mask.sum(dim=1).tolist()
    valid = (labels != IGNORE_INDEX).tolist()
    spans = []
    for i, (length, row) in enumerate(zip(lengths, valid, strict=True)):
        first = next((t for t in range(length) if row[t]), length)
        first = max(first, 1)
        if first < length:
            spans.append((i, first, length))
    return spans


def pack_chunk(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               groups: torch.Tensor, *, mask_dtype: torch.dtype = torch.float32) -> PackedChunk | None:
    """Pack right-padded candidate rows (the collator's layout) by prompt; None if nothing to score.

    groups [n]: which prompt of the batch each candidate belongs to; candidates share a row when
    they have the same group and the same prompt tokens (a custom collator giving one group two
    prompts gets two rows, never a wrong one).
    """
    spans = _scored_spans(attention_mask, labels)
    if not spans:
        return None
    ids, labs, grp = input_ids.tolist(), labels.tolist(), groups.tolist()
    rows: dict[tuple, list] = {}
    for i, first, length in spans:
        rows.setdefault((grp[i], tuple(ids[i][:first])), []).append((i, first, length))
    built, order, sources, targets, spans_of = [], [], [], [], []
    for r, ((_, prompt), members) in enumerate(rows.items()):
        P = len(prompt)
        tokens, positions, segments = list(prompt), list(range(P)), [0] * P
        for j, (i, first, length) in enumerate(members, start=1):
            start = len(tokens)
            tokens += ids[i][first:length]
            positions += range(P, P + length - first)
            segments += [j] * (length - first)
            order.append(i)
            spans_of.append((r, start, length - first))
            # the prompt's last output predicts the first response token, then the response's own
            sources.append((r, [P - 1] + list(range(start, start + length - first - 1))))
            targets.append(labs[i][first:length])
        built.append((tokens, positions, segments, P))
    width = max(len(t) for t, _, _, _ in built)
    keep = width - min(P for _, _, _, P in built) + 1
    offset = width - keep
    n_rows, R = len(built), max(len(t) for t in targets)
    device = input_ids.device
    token_t = torch.zeros(n_rows, width, dtype=torch.long)
    position_t = torch.zeros(n_rows, width, dtype=torch.long)
    segment_t = torch.full((n_rows, width), -1, dtype=torch.long)
    for r, (tokens, positions, segments, _) in enumerate(built):
        token_t[r, :len(tokens)] = torch.tensor(tokens)
        position_t[r, :len(tokens)] = torch.tensor(positions)
        segment_t[r, :len(tokens)] = torch.tensor(segments)
    source_t = torch.zeros(len(order), R, dtype=torch.long)
    label_t = torch.full((len(order), R), IGNORE_INDEX, dtype=torch.long)
    for c, ((r, positions), target) in enumerate(zip(sources, targets, strict=True)):
        source_t[c, :len(positions)] = r * keep + torch.tensor(positions) - offset
        label_t[c, :len(target)] = torch.tensor(target)
    return PackedChunk(
        input_ids=token_t.to(device), position_ids=position_t.to(device),
        attention_mask=segment_mask(segment_t, mask_dtype).to(device), keep=keep,
        scored=torch.tensor(order, dtype=torch.long, device=device),
        source=source_t.to(device), labels=label_t.to(device),
        layout=_layout(built, spans_of, width, device))


def _layout(built, spans_of, width, device) -> SegmentLayout:
    """The packed rows' parts for rrhf_lite.training.segment_attention (see SegmentLayout)."""
    prompts = torch.tensor([P for _, _, _, P in built])
    P = int(prompts.max())
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    prompt_mask = None
    if bool((prompts < P).any()):
        prompt_mask = (causal & (torch.arange(P)[None, None, :] < prompts[:, None, None])).unsqueeze(1)
    R = max(length for _, _, length in spans_of)
    rows = torch.tensor([r for r, _, _ in spans_of])
    starts = torch.tensor([start for _, start, _ in spans_of])
    lengths = torch.tensor([length for _, _, length in spans_of])
    t = torch.arange(R)
    prompt_keys = torch.arange(P)[None, :] < prompts[rows][:, None]  # [n, P]
    own_keys = t[None, :] < lengths[:, None]  # [n, R]; also which queries are real
    base = rows[:, None] * width
    key_index = torch.cat([torch.where(prompt_keys, base + torch.arange(P), base),
                           torch.where(own_keys, base + starts[:, None] + t, base)], dim=1)
    query_index = torch.where(own_keys, base + starts[:, None] + t, base)
    own = own_keys[:, None, :] & (t[None, None, :] <= t[None, :, None])  # [n, R(query), R(key)]
    response_mask = torch.cat([prompt_keys[:, None, :].expand(-1, R, -1), own], dim=2).unsqueeze(1)
    return SegmentLayout(
        prompt_width=P, prompt_mask=None if prompt_mask is None else prompt_mask.to(device),
        key_index=key_index.to(device), query_index=query_index.to(device),
        response_mask=response_mask.to(device), query_valid=own_keys.to(device))


def segment_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, L, L] mask from segment ids [rows, L] (0 prompt, j response j, -1 padding):
    query q sees key k <= q when k is in the prompt or in q's own response. dtype bool: True
    where seen (sdpa); a float dtype: additive, 0 where seen and the dtype's min elsewhere."""
    width = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (key != -1) & ((key == 0) | (key == query))
    if dtype == torch.bool:
        return allowed.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def embedding_dtype(model) -> torch.dtype:
    """The input embeddings' dtype (what the hidden states start as); float32 if unknown."""
    model = unwrapped(model)
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get() if callable(get) else None, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


def mask_dtype_of(model) -> torch.dtype:
    """bool for sdpa (what transformers gives it; no dtype to match under autocast), else the
    input embeddings' dtype for an additive mask (eager adds it to the scores, flex too)."""
    if attention_implementation(model) in ("sdpa", SEGMENTS_PREFIX + "sdpa"):
        return torch.bool
    return embedding_dtype(model)


def unwrapped(model):
    """Through DDP-style wrappers (`.module`) to the model that has a config."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def segments_in_use(model) -> bool:
    """Whether the model runs rrhf_lite.training.segment_attention (packed forwards pass their layout)."""
    return str(attention_implementation(model)).startswith(SEGMENTS_PREFIX)


def attention_implementation(model) -> str | None:
    return getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None)


def static_reason(model) -> str | None:
    """Why packing cannot work for this model without running it, or None."""
    impl = attention_implementation(model)
    if impl is not None and any(name in impl for name in IGNORES_CUSTOM_MASKS):
        return f"attention implementation {impl!r} ignores custom 4-D attention masks"
    return None
