"""A model's own log-probabilities of candidate responses: per chunk (training) and per row (scoring).

`chunk_logprob_sums` is the forward pass the trainer runs on each chunk of candidates;
`chunk_hidden_logprobs` is its twin without logits (the model runs without its Linear head and
rrhf_kernels reduces the hidden states with the head's weight, tile by tile), which the trainer
picks when `hidden_path_agrees`;
`model_candidate_scores` runs it over whole listwise rows to give the model's length-normalised
score of each candidate (the p_i of RRHF), for evaluation and perplexity. Not to be confused
with the score stage (rrhf_lite.stages.score.score_candidates), which asks a reward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from rrhf_lite.data.tokenization import IGNORE_INDEX, RRHFCollator, eos_id, tokenize_listwise
from rrhf_lite.training.segment_attention import restore, use_segments
from rrhf_lite.training.shared_prompt import (
    embedding_dtype,
    mask_dtype_of,
    pack_chunk,
    segments_in_use,
    static_reason,
    unwrapped,
)


def _trim(input_ids, attention_mask, labels):
    """Drop right padding shared by the chunk; find the positions whose outputs predict a label.

    Returns (input_ids, attention_mask, labels, first, keep) or None when nothing is scored:
    outputs at positions first-1 .. width-1 (`keep` of them) predict labels[:, first:].
    """
    width = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask, labels = (t[:, :width] for t in (input_ids, attention_mask, labels))
    valid = labels != IGNORE_INDEX
    # first position with a label; logits at t-1 predict it (position 0 can never be predicted)
    first = int(torch.where(valid.any(dim=1), valid.float().argmax(dim=1), width).min())
    first = max(first, 1)
    if first >= width:
        return None
    return input_ids, attention_mask, labels, first, width - first + 1


def _nothing(input_ids):
    zeros = torch.zeros(len(input_ids), device=input_ids.device)
    return zeros, torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)


def _predicting_outputs(model, input_ids, attention_mask, labels, groups):
    """The model's outputs at the positions that predict each label: (outputs [m, T, D],
    labels [m, T], scored), or None when nothing in the chunk is scored.

    groups None: one row per candidate, m = n and scored None. groups [n] (the prompt of each
    candidate): the chunk is packed, each prompt once for its candidates
    (rrhf_lite.training.shared_prompt), and scored [m] names the candidates with a label (the others
    get sum 0 and count 0, as unshared).
    """
    if groups is None:
        trimmed = _trim(input_ids, attention_mask, labels)
        if trimmed is None:
            return None
        input_ids, attention_mask, labels, first, keep = trimmed
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        return outputs[:, :-1], labels[:, first:], None
    packed = pack_chunk(input_ids, attention_mask, labels, groups, mask_dtype=mask_dtype_of(model))
    if packed is None:
        return None
    # a model switched to rrhf_lite.training.segment_attention computes only the unmasked parts
    layout = {"rrhf_layout": packed.layout} if segments_in_use(model) else {}
    outputs = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                    position_ids=packed.position_ids, logits_to_keep=packed.keep, **layout).logits
    # a gather, not a view: the first response token of every candidate reads the prompt's end
    return outputs.reshape(-1, outputs.shape[-1])[packed.source], packed.labels, packed.scored


def _spread(values: torch.Tensor, scored: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-scored-candidate values [m] back to the chunk's n candidates (0 for the others)."""
    if scored is None:
        return values
    return values.new_zeros(n).index_copy(0, scored, values)


def chunk_logprob_sums(model, input_ids, attention_mask, labels, *, backend: str = "auto",
                       groups: torch.Tensor | None = None):
    """Forward one chunk of candidates; return (sums [n] float32, counts [n] int64).

    `labels` are unshifted (HF convention, -100 on prompt and padding). Only the logits that can
    predict a response token are computed (`logits_to_keep`), so prompt positions never reach
    the lm_head or the log-softmax; unshared, the kernel takes the shifted views without a copy.
    `groups` [n] (each candidate's prompt): pack the chunk, each prompt once (see
    _predicting_outputs); the same numbers.
    """
    from rrhf_kernels import candidate_logprob_sums

    found = _predicting_outputs(model, input_ids, attention_mask, labels, groups)
    if found is None:  # nothing to score in this chunk
        return _nothing(input_ids)
    logits, labels, scored = found
    sums, counts = candidate_logprob_sums(logits, labels, backend=backend)
    n = len(input_ids)
    return _spread(sums, scored, n), _spread(counts, scored, n)


# ---------------------------------------------------------------- from hidden states

def linear_output_head(model) -> torch.nn.Linear | None:
    """The model's output embedding if it is a plain float torch.nn.Linear (not LoRA-wrapped,
    not quantised), else None. Wrappers (DDP, PEFT) are looked through."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "get_output_embeddings"):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:
        return None
    if head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return head


def _identity(hidden):
    return hidden


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Module):
    """Within the block the head returns its input: the model's forward (through every wrapper:
    PEFT, DDP, hooks) then yields the hidden states the head would have read, as `.logits`."""
    saved = head.__dict__.get("forward")
    head.forward = _identity
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def chunk_hidden_logprobs(model, head, input_ids, attention_mask, labels, *, backend: str = "auto",
                          coef: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                          return_lse: bool = False, groups: torch.Tensor | None = None):
    """chunk_logprob_sums without logits: the model runs without its head and rrhf_kernels
    reduces its hidden states with the head's weight (and bias) tile by tile.

    coef None: returns (sums, counts) (plus the per-token logsumexp with `return_lse`).
    coef [n] given: returns (total, sums, counts), total = sum(coef * sums) with the gradients
    made during the forward (rrhf_kernels.weighted_logprob_sum_from_hidden); `lse` is the
    logsumexp a `return_lse` call gave for the same chunk. `groups`: as in chunk_logprob_sums.
    """
    from rrhf_kernels import candidate_logprob_sums_from_hidden, weighted_logprob_sum_from_hidden

    with head_bypassed(head):
        found = _predicting_outputs(model, input_ids, attention_mask, labels, groups)
    if found is None:
        sums, counts = _nothing(input_ids)
        if coef is not None:
            return sums.sum(), sums, counts
        return (sums, counts, None) if return_lse else (sums, counts)
    hidden, labels, scored = found
    if hidden.device != head.weight.device:
        hidden = hidden.to(head.weight.device)
    n = len(input_ids)
    if coef is None:
        out = candidate_logprob_sums_from_hidden(hidden, head.weight, labels, head.bias,
                                                 backend=backend, return_lse=return_lse)
        return (_spread(out[0], scored, n), _spread(out[1], scored, n), *out[2:])
    if scored is not None:
        coef = coef[scored]
    total, sums, counts = weighted_logprob_sum_from_hidden(hidden, head.weight, labels, coef, head.bias,
                                                           backend=backend, lse=lse)
    return total, _spread(sums, scored, n), _spread(counts, scored, n)


def choose_output_head(model, input_ids, attention_mask, path: str = "auto", *, sharded: bool = False):
    """(head, None) when candidate log-probs can come from hidden states, else (None, reason).

    path "logits" never; parameter-sharding engines (`sharded`: FSDP, ZeRO-3) never, since the
    head's weight would be read outside the forward; otherwise the output embedding must be a
    plain Linear and reproduce the model's logits on this input (one candidate, eval mode).
    """
    if path == "logits":
        return None, "logprob_path is 'logits'"
    if sharded:
        return None, "the engine may shard the head's weight"
    head = linear_output_head(model)
    if head is None:
        return None, "the output embedding is not a plain Linear (LoRA on it, or quantised)"
    was_training = model.training
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            agrees = hidden_path_agrees(model, head, input_ids, attention_mask)
    finally:
        model.train(was_training)
    if not agrees:
        return None, "the logits are not the head's Linear of the hidden states"
    return head, None


@torch.no_grad()
def hidden_path_agrees(model, head, input_ids, attention_mask) -> bool:
    """Whether the model's logits are exactly its head applied to the hidden states it yields
    (no softcapping, scaling or other step after the head). Run once, on a few tokens."""
    width = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=4).logits
    with head_bypassed(head):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=4).logits
    if hidden.shape[-1] != head.weight.shape[1]:
        return False
    # the head's dtype: a mixed-precision wrapper (accelerate's) hands its outputs back in fp32,
    # where a 16-bit head (QLoRA under bf16) would refuse them; the round trip is exact
    mine = torch.nn.functional.linear(hidden.to(head.weight.device, head.weight.dtype), head.weight,
                                      head.bias)
    return bool(torch.allclose(mine.float(), logits.float().to(mine.device), rtol=1e-2, atol=1e-3))


def choose_prompt_sharing(model, input_ids, attention_mask, labels, groups, setting="auto", *,
                          head: torch.nn.Module | None = None):
    """(True, None) when a chunk may be packed by prompt (rrhf_lite.training.shared_prompt), else
    (False, reason). setting False never; otherwise the attention implementation must honour
    custom 4-D masks and packing must reproduce the unshared log-prob sums on this input (the
    first CHECK_TOKENS response tokens of a few candidates of one prompt, eval mode; through the
    hidden-state path when `head` is given, so no logits at all). A model with plain sdpa or
    eager attention is switched to rrhf_lite.training.segment_attention first (the check then
    covers it)."""
    if setting is False:
        return False, "share_prompt is false"
    reason = static_reason(model)
    if reason is not None:
        return False, reason
    config = getattr(unwrapped(model), "config", None)
    # attention over the unmasked parts only, where the model's attention is plain (else the mask)
    segments = config is not None and use_segments(config)
    was_training = model.training
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            agrees = packing_agrees(model, input_ids, attention_mask, labels, groups, head=head)
    finally:
        model.train(was_training)
    if not agrees:
        if segments:
            restore(config)
        return False, "packed rows do not reproduce the unshared log-probs (custom 4-D masks ignored?)"
    return True, None


# Response tokens per candidate the first-batch checks score: a leak between packed responses
# shows from the second response's first token on, and the check costs
# most x CHECK_TOKENS positions, a small fraction of one [N, T, V] logits buffer.
CHECK_TOKENS = 8


def first_response_tokens(attention_mask, labels, tokens: int = CHECK_TOKENS):
    """(attention_mask, labels) cut after each row's first `tokens` labelled positions (right
    padding: the rest of the row becomes padding)."""
    valid = labels != IGNORE_INDEX
    over = valid.cumsum(dim=1) > tokens
    cut = torch.where(over.any(dim=1), over.int().argmax(dim=1), labels.shape[1])
    keep = torch.arange(labels.shape[1], device=labels.device)[None, :] < cut[:, None]
    return attention_mask * keep.to(attention_mask.dtype), labels.masked_fill(~keep, IGNORE_INDEX)


@torch.no_grad()
def packing_agrees(model, input_ids, attention_mask, labels, groups, most: int = 3, *,
                   head: torch.nn.Module | None = None, tokens: int = CHECK_TOKENS) -> bool:
    """Whether packing gives the unshared sums on the first `tokens` response tokens of up to
    `most` candidates of the first prompt with several (a model that ignored the mask would let
    one response see another). `head`: score from hidden states (chunk_hidden_logprobs), no
    logits. Run once."""
    counts = torch.bincount(groups - groups.min())
    several = torch.nonzero(counts > 1).flatten()
    group = int(several[0]) + int(groups.min()) if len(several) else int(groups[0])
    pick = torch.nonzero(groups == group).flatten()[:most]
    args = (input_ids[pick], *first_response_tokens(attention_mask[pick], labels[pick], tokens))
    if head is None:
        plain, n = chunk_logprob_sums(model, *args, backend="torch")
        packed, _ = chunk_logprob_sums(model, *args, backend="torch", groups=groups[pick])
    else:
        plain, n = chunk_hidden_logprobs(model, head, *args, backend="torch")
        packed, _ = chunk_hidden_logprobs(model, head, *args, backend="torch", groups=groups[pick])
    per_token = 1e-4 if embedding_dtype(model) in (torch.float32, torch.float64) else 3e-2
    tolerance = per_token * n.clamp(min=1).float() + 1e-5
    return bool(((plain.float() - packed.float()).abs() <= tolerance).all())


@torch.no_grad()
def model_candidate_scores(
    model, tokenizer, examples: Sequence[dict], max_length: int | None = 512,
    length_penalty: float = 1.0, micro_batch_size: int = 8, *, max_prompt_length: int | None = None,
    truncation_side: str = "left", backend: str = "auto", share_prompt: bool | str = "auto",
) -> list[list[float]]:
    """The model's own candidate scores p_i = (sum of response token log-probs) / |y_i|^lambda.

    Args:
        model: a causal LM (PEFT or plain), used in eval mode without gradients.
        tokenizer: its tokenizer; examples: normalised rows (scores may be None).
        max_length, max_prompt_length, truncation_side: as in training (see tokenize_example).
        length_penalty: lambda. micro_batch_size: candidates per forward pass.
        backend: rrhf_kernels backend ("auto" | "triton" | "torch").
        share_prompt: "auto" (default) packs each micro-batch by prompt, so a prompt runs once
            for its candidates there, as training does (see choose_prompt_sharing: checked once
            to give the unshared numbers, else off); False: every candidate row repeats its
            prompt. Evaluation is mostly forward passes over k candidates of a shared prompt,
            so this is where its time goes.

    Returns one list of k floats per example, in order; a row whose prompt leaves no room for a
    response token gets NaN for each candidate.
    """
    features, _ = tokenize_listwise(examples, tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length,
                                    truncation_side=truncation_side, keep_dropped=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    collate = RRHFCollator(pad)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flat = [(i, ids) for i, f in enumerate(features) if f is not None
            for ids in [{"prompt_ids": f["prompt_ids"], "responses_ids": [r], "scores": [0.0]}
                        for r in f["responses_ids"]]]
    results: list[list[float]] = [
        [float("nan")] * len(ex["responses"]) if f is None else [] for ex, f in zip(examples, features, strict=True)
    ]
    share = None  # decided on the first micro-batch with candidates of one prompt
    try:
        for start in range(0, len(flat), max(1, micro_batch_size)):
            part = flat[start: start + micro_batch_size]
            batch = collate([feat for _, feat in part])
            args = (batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["labels"].to(device))
            groups = torch.tensor([i for i, _ in part], device=device)
            if share is None and len(set(groups.tolist())) < len(part):
                share, _reason = choose_prompt_sharing(model, *args, groups, share_prompt)
            sums, counts = chunk_logprob_sums(model, *args, backend=backend,
                                              groups=groups if share else None)
            scores = sums.float() / counts.clamp(min=1).float() ** length_penalty
            for (i, _), s in zip(part, scores.tolist(), strict=True):
                results[i].append(s)
    finally:
        model.train(was_training)
    return results
