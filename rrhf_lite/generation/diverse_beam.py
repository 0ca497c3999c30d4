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

from dataclasses import dataclass, field

import torch

from rrhf_lite.generation.prefill import cache_argument, left_padded_positions

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

    cache_name = cache_argument(model) if use_cache else None
    cache = None
    if cache_name is not None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        # Prefill once per prompt, then copy each prompt's cache to its beams.
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=left_padded_positions(attention_mask), use_cache=True, **{cache_name: cache},
        )
        cache.reorder_cache(to_rows)
        logits = out.logits[:, -1, :].float()[to_rows]
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=left_padded_positions(attention_mask))
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
                        position_ids=left_padded_positions(mask))
        logits = out.logits[:, -1, :].float()
        del out

    results = []
    for b in range(batch):
        pooled = [h for group in finished[b] for h in group.items]
        pooled.sort(key=lambda h: -h.score)
        results.append(pooled[:num_return_sequences])
    return results
