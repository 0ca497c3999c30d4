"""A model's own log-probabilities of candidate responses: per chunk (training) and per row (scoring).

`chunk_logprob_sums` is the forward pass the trainer runs on each chunk of candidates;
`model_candidate_scores` runs it over whole listwise rows to give the model's length-normalised
score of each candidate (the p_i of RRHF), for evaluation and perplexity. Not to be confused
with the score stage (rrhf_lite.stages.score.score_candidates), which asks a reward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rrhf_lite.tokenization import IGNORE_INDEX, RRHFCollator, eos_id, tokenize_listwise


def chunk_logprob_sums(model, input_ids, attention_mask, labels, *, backend: str = "auto"):
    """Forward one chunk of candidates; return (sums [n] float32, counts [n] int64).

    `labels` are unshifted (HF convention, -100 on prompt and padding). Only the logits that can
    predict a response token are computed (`logits_to_keep`), so prompt positions never reach
    the lm_head or the log-softmax; the kernel takes the shifted views without a copy.
    """
    from rrhf_kernels import candidate_logprob_sums

    # trim right padding shared by the whole chunk
    width = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask, labels = (t[:, :width] for t in (input_ids, attention_mask, labels))
    valid = labels != IGNORE_INDEX
    # first position with a label; logits at t-1 predict it (position 0 can never be predicted)
    first = int(torch.where(valid.any(dim=1), valid.float().argmax(dim=1), width).min())
    first = max(first, 1)
    if first >= width:  # nothing to score in this chunk
        zeros = torch.zeros(len(input_ids), device=input_ids.device)
        return zeros, torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)
    keep = width - first + 1  # logits for positions first-1 .. width-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    sums, counts = candidate_logprob_sums(logits[:, :-1], labels[:, first:], backend=backend)
    return sums, counts


@torch.no_grad()
def model_candidate_scores(
    model, tokenizer, examples: Sequence[dict], max_length: int | None = 512,
    length_penalty: float = 1.0, micro_batch_size: int = 8, *, max_prompt_length: int | None = None,
    truncation_side: str = "left", backend: str = "auto",
) -> list[list[float]]:
    """The model's own candidate scores p_i = (sum of response token log-probs) / |y_i|^lambda.

    Args:
        model: a causal LM (PEFT or plain), used in eval mode without gradients.
        tokenizer: its tokenizer; examples: normalised rows (scores may be None).
        max_length, max_prompt_length, truncation_side: as in training (see tokenize_example).
        length_penalty: lambda. micro_batch_size: candidates per forward pass.
        backend: rrhf_kernels backend ("auto" | "triton" | "torch").

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
    try:
        for start in range(0, len(flat), max(1, micro_batch_size)):
            part = flat[start: start + micro_batch_size]
            batch = collate([feat for _, feat in part])
            sums, counts = chunk_logprob_sums(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                batch["labels"].to(device), backend=backend)
            scores = sums.float() / counts.clamp(min=1).float() ** length_penalty
            for (i, _), s in zip(part, scores.tolist(), strict=True):
                results[i].append(s)
    finally:
        model.train(was_training)
    return results
