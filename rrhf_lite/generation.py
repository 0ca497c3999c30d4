"""Diverse (group) beam search, written here because transformers 5 dropped it from its core.

How it works (Vijayakumar et al., "Diverse Beam Search", 2016; the variant the RRHF authors
sampled with): the `num_beams` beams of each prompt are split into `num_beam_groups` groups of
equal size. Every step runs one forward pass for all beams; then the groups choose their next
tokens one after the other. Before group g chooses, each token's log-probability is lowered by
`diversity_penalty` times the number of beams of groups 0..g-1 (same prompt) that picked that
token at this step (Hamming diversity). The penalised log-probabilities are what accumulates into
the beam scores. Within a group the bookkeeping is ordinary beam search, made to match
transformers' own beam search so that one group with no penalty gives the same output:

- each group keeps its `G = num_beams / num_beam_groups` best running beams; at the start only
  the first beam of a group is live (the others score -inf) so the beams do not start identical;
- each step looks at the 2G best (beam, token) continuations of the group; a continuation that
  is EOS and ranks among the first G becomes a finished hypothesis with score
  sum_logprobs / new_tokens ** length_penalty (new tokens counting the EOS); the best G
  non-EOS continuations run on;
- a group keeps its G best finished hypotheses; it is done once it has G of them and its best
  running beam, normalised by the current length, cannot beat the worst of them;
- at the last allowed step the G best continuations are all finished, EOS or not (their
  non-EOS tokens are the ones later groups are penalised for at that step).

The result for a prompt is its finished hypotheses from all groups, best score first.

The KV cache is reused between steps and reordered with the Cache API (`reorder_cache`); models
whose forward takes no cache argument are run on the whole sequence at every step instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from rrhf_lite.inference import decode_new_tokens, encode_prompts, eos_token_ids, model_device

NEG_INF = -1.0e9  # the "impossible" score transformers uses for dead beams


@dataclass
class Hypothesis:
    """One generated continuation.

    tokens: the new token ids, without the EOS. score: sum of (penalised) log-probs divided by
    (number of new tokens, EOS included) ** length_penalty. finished: ended with an EOS (False
    when it stopped at max_new_tokens).
    """

    tokens: list[int]
    score: float
    finished: bool


@dataclass
class _Finished:
    """The best `size` finished hypotheses of one group of one prompt."""

    size: int
    items: list[Hypothesis] = field(default_factory=list)

    def add(self, hypothesis: Hypothesis) -> None:
        self.items.append(hypothesis)
        # stable sort: among equal scores the earlier one stays ahead
        self.items.sort(key=lambda h: -h.score)
        del self.items[self.size:]

    def is_full(self) -> bool:
        return len(self.items) >= self.size

    def worst(self) -> float:
        return self.items[-1].score


def _cache_argument(model) -> str | None:
    """Name of the forward argument that takes a KV cache ("cache" in recent transformers 5
    releases, "past_key_values" in earlier ones), or None when the model takes neither."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (the first real token is position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def diverse_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    length_penalty: float = 1.0,
    num_return_sequences: int | None = None,
    use_cache: bool = True,
) -> list[list[Hypothesis]]:
    """Group beam search with a Hamming diversity penalty, for a left-padded batch of prompts.

    Args:
        model: a causal LM (transformers or a PEFT model over one), in eval mode.
        input_ids: [batch, length] prompt ids, left-padded.
        attention_mask: [batch, length], 0 on the padding.
        num_beams: beams per prompt, a multiple of num_beam_groups.
        num_beam_groups: groups the beams are split into (1 = plain beam search).
        diversity_penalty: subtracted from a token's log-prob once for every beam of an earlier
            group (same prompt, same step) that chose it. 0 = no penalty.
        max_new_tokens: the most tokens generated per hypothesis, EOS included.
        eos_token_id: id or ids that end a hypothesis.
        pad_token_id: fed to the model for groups that are already done.
        length_penalty: exponent of the length normalisation of finished scores.
        num_return_sequences: hypotheses returned per prompt (default num_beams).
        use_cache: reuse the KV cache between steps (falls back to full recomputation when the
            model's forward takes no cache).

    Returns:
        For each prompt, a list of num_return_sequences Hypothesis, best score first.
    """
    if num_beams < 1 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(
            f"num_beams ({num_beams}) must be a positive multiple of num_beam_groups "
            f"({num_beam_groups})"
        )
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    num_return_sequences = num_return_sequences or num_beams
    if num_return_sequences > num_beams:
        raise ValueError(
            f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})"
        )
    eos_ids = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}

    batch, _ = input_ids.shape
    device = input_ids.device
    group_size = num_beams // num_beam_groups
    rows = batch * num_beams  # row b * num_beams + g * group_size + j: beam j of group g
    to_rows = torch.arange(batch, device=device).repeat_interleave(num_beams)
    # Candidates looked at per group and step: enough that G survive even if every EOS id is
    # among them (transformers keeps the same number).
    keep = max(2, 1 + len(eos_ids)) * group_size

    cache_name = _cache_argument(model) if use_cache else None
    cache = None
    if cache_name is not None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        # Prefill once per prompt, then copy each prompt's cache to its beams.
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=_positions(attention_mask), use_cache=True, **{cache_name: cache},
        )
        cache.reorder_cache(to_rows)
        logits = out.logits[:, -1, :].float()[to_rows]
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=_positions(attention_mask))
        logits = out.logits[:, -1, :].float()[to_rows]
    del out
    prompt_ids = input_ids[to_rows]
    mask = attention_mask[to_rows]
    generated = torch.empty((rows, 0), dtype=torch.long, device=device)

    # Beam scores on the CPU: the per-group selection below is small and sequential.
    beam_scores = torch.zeros((batch, num_beam_groups, group_size), dtype=torch.float32)
    beam_scores[:, :, 1:] = NEG_INF
    beam_scores = beam_scores.view(batch, num_beams)
    finished = [[_Finished(group_size) for _ in range(num_beam_groups)] for _ in range(batch)]
    done = [[False] * num_beam_groups for _ in range(batch)]

    for step in range(max_new_tokens):
        new_length = step + 1  # new tokens in a hypothesis that ends at this step
        last_step = new_length == max_new_tokens
        # Selection runs on the model's device; only the 2G best candidates per group reach
        # Python, so a 128k vocabulary costs no host copy of the whole distribution.
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1)
        vocab = log_probs.shape[-1]
        device_scores = beam_scores.to(device)
        next_tokens = torch.full((batch, num_beams), pad_token_id, dtype=torch.long)
        source_beam = torch.arange(num_beams).repeat(batch, 1)  # done groups keep their rows
        next_scores = beam_scores.clone()

        for b in range(batch):
            chosen_this_step: list[int] = []  # tokens picked by earlier groups, this step
            for g in range(num_beam_groups):
                if done[b][g]:
                    continue
                first = g * group_size
                scores = log_probs[b, first:first + group_size]
                if diversity_penalty and chosen_this_step:
                    counts = torch.bincount(torch.tensor(chosen_this_step, device=device),
                                            minlength=vocab)
                    scores = scores - diversity_penalty * counts.to(scores.dtype)
                scores = scores + device_scores[b, first:first + group_size, None]
                top_scores, top_index = scores.view(-1).topk(min(keep, scores.numel()))

                running = []  # (local beam, token, score) of the beams that go on
                candidates = zip(top_scores.tolist(), top_index.tolist(), strict=True)
                for rank, (score, index) in enumerate(candidates):
                    beam, token = divmod(index, vocab)
                    is_eos = token in eos_ids
                    if is_eos or last_step:
                        if rank < group_size:
                            prefix = generated[b * num_beams + first + beam].tolist()
                            finished[b][g].add(Hypothesis(
                                tokens=prefix if is_eos else prefix + [token],
                                score=score / new_length**length_penalty,
                                finished=is_eos,
                            ))
                            if not is_eos:  # at the last step: the tokens later groups avoid
                                chosen_this_step.append(token)
                    elif len(running) < group_size:
                        running.append((beam, token, score))
                if last_step:
                    continue
                if not running:  # a vocabulary smaller than the beam: nothing left to extend
                    done[b][g] = True
                    continue
                for j, (beam, token, score) in enumerate(running):
                    next_tokens[b, first + j] = token
                    source_beam[b, first + j] = first + beam
                    next_scores[b, first + j] = score
                    chosen_this_step.append(token)
                # transformers' stopping rule (early_stopping=False): done once the finished
                # list is full and the best running beam cannot beat its worst entry
                best_possible = running[0][2] / new_length**length_penalty
                if finished[b][g].is_full() and best_possible <= finished[b][g].worst():
                    done[b][g] = True

        if last_step or all(all(flags) for flags in done):
            break

        beam_scores = next_scores
        source_rows = (torch.arange(batch).unsqueeze(1) * num_beams + source_beam).view(-1)
        source_rows = source_rows.to(device)
        step_tokens = next_tokens.view(-1, 1).to(device)
        generated = torch.cat([generated[source_rows], step_tokens], dim=1)
        if cache is not None:
            cache.reorder_cache(source_rows)
            position = mask.sum(-1, keepdim=True)  # real tokens so far = the new token's position
            mask = torch.cat([mask, torch.ones_like(step_tokens)], dim=1)
            out = model(input_ids=step_tokens, attention_mask=mask, position_ids=position,
                        use_cache=True, **{cache_name: cache})
        else:
            mask = torch.cat([mask, torch.ones_like(step_tokens)], dim=1)
            out = model(input_ids=torch.cat([prompt_ids, generated], dim=1), attention_mask=mask,
                        position_ids=_positions(mask))
        logits = out.logits[:, -1, :].float()
        del out

    results = []
    for b in range(batch):
        pooled = [h for group in finished[b] for h in group.items]
        pooled.sort(key=lambda h: -h.score)
        results.append(pooled[:num_return_sequences])
    return results


# --- one batch of prompts -> k texts each, by any method ------------------------------------

METHODS = ("greedy", "beam", "diverse_beam", "top_p")


@torch.no_grad()
def generate_candidates(
    model,
    tokenizer,
    prompts: list,
    *,
    method: str = "greedy",
    num_candidates: int = 1,
    num_beams: int | None = None,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    max_prompt_length: int | None = None,
    length_penalty: float = 1.0,
) -> list[list[str]]:
    """Generate candidate responses for one batch of prompts.

    Args:
        model, tokenizer: from rrhf_lite.inference.load_causal_lm (left padding, pad token set).
        prompts: strings or chat-message lists (see rrhf_lite.tokenization.format_prompt).
        method: "greedy" (one candidate, whatever num_candidates says), "beam" (transformers'
            beam search), "diverse_beam" (diverse_beam_search above) or "top_p" (sampling with
            temperature and nucleus top_p; top_k 0 = off). Seed torch beforehand for sampling.
        num_candidates: responses per prompt.
        num_beams: beams for beam methods (default num_candidates; at least num_candidates).
        num_beam_groups, diversity_penalty: diverse beam search only (diversity is per group).
        temperature, top_p, top_k: sampling only; beam methods rank by plain log-probs.
        max_new_tokens: the most tokens per response (its EOS included).
        max_prompt_length: longer prompts keep their last tokens.
        length_penalty: exponent of the length normalisation of beam scores.

    Returns:
        For each prompt, its responses as text (cut at the first EOS), best first for beams.
    """

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    eos = eos_token_ids(model, tokenizer)
    batch = encode_prompts(tokenizer, prompts, max_prompt_length, device=model_device(model))
    width = batch["input_ids"].shape[1]
    k = 1 if method == "greedy" else num_candidates
    beams = max(num_beams or k, k)

    if method == "diverse_beam":
        hypotheses = diverse_beam_search(
            model, batch["input_ids"], batch["attention_mask"], num_beams=beams,
            num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
            max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            length_penalty=length_penalty, num_return_sequences=k,
        )
        return [[tokenizer.decode(h.tokens, skip_special_tokens=True) for h in row]
                for row in hypotheses]

    from transformers import GenerationConfig

    settings = dict(max_new_tokens=max_new_tokens, eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id, num_return_sequences=k)
    if method == "top_p":
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        settings.update(do_sample=False, num_beams=1 if method == "greedy" else beams,
                        length_penalty=length_penalty)
    from rrhf_lite.prefill import generate_from_one_prefill

    # each prompt's prefill runs once for its k samples / its beams (same tokens, see prefill)
    copies = k if method == "top_p" else (1 if method == "greedy" else beams)
    output = generate_from_one_prefill(model, batch, GenerationConfig(**settings), copies)
    texts = [decode_new_tokens(tokenizer, row[width:].tolist(), eos) for row in output]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
