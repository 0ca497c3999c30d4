"""Prompts and candidates as token ids, and batches of them.

One prompt tokenisation serves training, scoring and sampling (`tokenize_prompt`): a prompt is a
string used as is, or a list of chat messages rendered with the tokenizer's chat template
(add_generation_prompt=True). The trainer tokenises a candidate as prompt ids + response ids +
EOS, so a response sampled after `prompt_token_ids(prompt)` is exactly what training scores.

Imports nothing above rrhf_lite.errors (and torch for the collator).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from rrhf_lite.errors import UserInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- prompts


def _check_messages(messages: Sequence, where: str | None) -> list[dict]:
    checked = []
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserInputError(
                f"message {index} must be an object with string 'role' and 'content'",
                where=where, hint='e.g. [{"role": "user", "content": "Hi"}]',
            )
        checked.append(message)
    return checked


def render_prompt(tokenizer, prompt: str | Sequence[dict], *, where: str | None = None
                  ) -> tuple[str, bool]:
    """(prompt text, whether the chat template wrote it). See format_prompt."""
    if isinstance(prompt, str):
        return prompt, False
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        messages = _check_messages(prompt, where)
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError(
                "the prompt is a list of chat messages but the tokenizer has no chat template",
                where=where,
                hint="use plain-string prompts, or a tokenizer/model that ships a chat template",
            )
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    raise UserInputError(
        f"a prompt must be a string or a list of messages, got {type(prompt).__name__}",
        where=where,
    )


def format_prompt(tokenizer, prompt: str | Sequence[dict], *, where: str | None = None) -> str:
    """The text a model is asked to continue.

    Args:
        tokenizer: the model's tokenizer.
        prompt: a string (used as is) or a list of chat messages {"role", "content"}, rendered
            with the tokenizer's chat template and add_generation_prompt=True.
        where: names the data row in error messages ("prompts.jsonl line 3").

    Raises:
        UserInputError: messages but the tokenizer has no chat template, or a malformed prompt.
    """
    return render_prompt(tokenizer, prompt, where=where)[0]


def _check_side(truncation_side: str) -> None:
    if truncation_side not in ("left", "right"):
        raise UserInputError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}",
                             where="truncation_side", hint="use 'left' or 'right'")


def _truncate(ids: list[int], length: int, side: str, lead: int = 0) -> list[int]:
    """`ids` cut to `length`. "left" keeps the end, after the first `lead` ids (the leading
    special tokens, e.g. BOS), as transformers does: [1, 70..77] to 5 -> [1, 74..77]; when the
    leading ids alone fill `length`, the plain end is kept."""
    if side == "right":
        return ids[:length]
    if 0 < lead < length:
        return ids[:lead] + ids[len(ids) - (length - lead):]
    return ids[-length:]


def leading_special_count(tokenizer, ids: Sequence[int]) -> int:
    """How many of the first ids are special tokens (BOS, a template's start marker): left
    truncation keeps them, as the tokenizer itself does when it truncates."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    if tokenizer.bos_token_id is not None:
        special.add(int(tokenizer.bos_token_id))
    count = 0
    while count < len(ids) and ids[count] in special:
        count += 1
    return count


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class PromptTokens:
    """A tokenised prompt: its rendered text, whether the chat template wrote it, its ids and
    whether they were cut to max_prompt_length; `lead` leading ids are special tokens (BOS), which
    a left truncation keeps."""

    text: str
    templated: bool
    ids: list[int]
    truncated: bool
    lead: int = 0


def tokenize_prompt(tokenizer, prompt: str | Sequence[dict], *,
                    max_prompt_length: int | None = None, truncation_side: str = "left",
                    where: str | None = None) -> PromptTokens:
    """The one prompt tokenisation, for training, scoring and sampling alike.

    Plain text gets the tokenizer's special tokens (its BOS); chat-template text does not (the
    template writes its own). An empty prompt becomes [BOS]. A prompt longer than
    max_prompt_length is cut on `truncation_side`: "left" keeps its end (what the answer
    follows), as the reference code does, and its leading special tokens (BOS): a LLaMA prompt
    [1, 70..77] cut to 5 is [1, 74..77], the same for sampling and training.
    """
    _check_side(truncation_side)
    text, templated = render_prompt(tokenizer, prompt, where=where)
    ids = _ids(tokenizer, text, special=not templated)
    if not ids and tokenizer.bos_token_id is not None:
        ids = [int(tokenizer.bos_token_id)]
    lead = leading_special_count(tokenizer, ids)
    truncated = max_prompt_length is not None and len(ids) > max_prompt_length
    if truncated:
        ids = _truncate(ids, max_prompt_length, truncation_side, lead)
    return PromptTokens(text, templated, ids, truncated, lead)


def prompt_token_ids(tokenizer, prompt: str | Sequence[dict], *,
                     max_prompt_length: int | None = None, truncation_side: str = "left",
                     where: str | None = None) -> list[int]:
    """Token ids of a prompt exactly as the trainer builds them (see tokenize_prompt)."""
    return tokenize_prompt(tokenizer, prompt, max_prompt_length=max_prompt_length,
                           truncation_side=truncation_side, where=where).ids


# --------------------------------------------------------------------------- candidates


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id (every response ends with it), or a UserInputError."""
    if tokenizer.eos_token_id is None:
        raise UserInputError("the tokenizer has no EOS token", where="tokenizer",
                             hint="use a tokenizer with an eos_token (responses end with EOS)")
    return int(tokenizer.eos_token_id)


def _response_text(prompt: str | list[dict], prompt_text: str, response, tokenizer, templated) -> str:
    content = response if isinstance(response, str) else response["content"]
    if templated and isinstance(prompt, list):
        # Render the whole conversation so the template's own turn markup follows the response;
        # fall back to the bare content when the template does not extend the prompt verbatim.
        message = response if isinstance(response, dict) else {"role": "assistant", "content": content}
        full = tokenizer.apply_chat_template(prompt + [message], tokenize=False)
        if full.startswith(prompt_text) and len(full) > len(prompt_text):
            return full[len(prompt_text):]
    return content


@dataclass
class TokenizeStats:
    """Counts from `tokenize_listwise`, logged once as a summary."""

    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    rows_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def tokenize_example(
    example: dict, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
    truncation_side: str = "left", stats: TokenizeStats | None = None,
) -> dict | None:
    """Token ids for one prompt and its k candidates, or None when no response token fits.

    The prompt is tokenised by `tokenize_prompt` (truncated to max_prompt_length on
    `truncation_side`). Each response is tokenised without special tokens and ends with its first
    EOS (appended when absent; a chat template's turn markup after it is dropped);
    prompt + response longer than max_length loses the response's tail. A prompt that alone
    reaches max_length is cut to max_length (per side) and leaves no response token, so the row
    is dropped (counted in stats).
    """
    _check_side(truncation_side)
    stats = stats if stats is not None else TokenizeStats()
    stats.rows += 1
    eos = eos_id(tokenizer)
    prompt = tokenize_prompt(tokenizer, example["prompt"], max_prompt_length=max_prompt_length,
                             truncation_side=truncation_side)
    prompt_ids, truncated = prompt.ids, prompt.truncated
    if max_length is not None and len(prompt_ids) >= max_length:
        prompt_ids = _truncate(prompt_ids, max_length, truncation_side, prompt.lead)
        truncated = True
    stats.prompts_truncated += int(truncated)
    room = None if max_length is None else max_length - len(prompt_ids)
    if room is not None and room <= 0:
        stats.rows_dropped += 1
        return None
    responses_ids = []
    for response in example["responses"]:
        text = _response_text(example["prompt"], prompt.text, response, tokenizer, prompt.templated)
        ids = _ids(tokenizer, text, special=False)
        # A chat template closes the turn with EOS and often more ("<|im_end|>\n"): end at that
        # EOS, as a sampled response does, so EOS is there exactly once and nothing follows it.
        if eos in ids:
            ids = ids[:ids.index(eos) + 1]
        else:
            ids.append(eos)
        if room is not None and len(ids) > room:
            ids = ids[:room]
            stats.responses_truncated += 1
        responses_ids.append(ids)
    scores = example.get("scores")
    return {"prompt_ids": prompt_ids, "responses_ids": responses_ids,
            "scores": list(scores) if scores is not None else [0.0] * len(responses_ids)}


def tokenize_listwise(
    examples: Iterable[dict], tokenizer, *, max_length: int | None, max_prompt_length: int | None,
    truncation_side: str = "left", keep_dropped: bool = False,
) -> tuple[list[dict | None], TokenizeStats]:
    """Tokenise many examples; returns (features, stats). Dropped rows are removed, or kept as
    None when keep_dropped (so positions still match the input). Truncations are logged."""
    stats = TokenizeStats()
    features = [tokenize_example(ex, tokenizer, max_length=max_length,
                                 max_prompt_length=max_prompt_length,
                                 truncation_side=truncation_side, stats=stats) for ex in examples]
    if not keep_dropped:
        features = [f for f in features if f is not None]
    if stats.prompts_truncated or stats.responses_truncated:
        logger.warning("truncated %d of %d prompts (side %r) and %d responses (max_length %s)",
                       stats.prompts_truncated, stats.rows, truncation_side,
                       stats.responses_truncated, max_length)
    if stats.rows_dropped:
        logger.warning("dropped %d of %d rows: the prompt leaves no room for a response token "
                       "(lower max_prompt_length or raise max_length)", stats.rows_dropped, stats.rows)
    return features, stats


# --------------------------------------------------------------------------- batches


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, *, side: str = "right",
             min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one [n, width] long tensor and its attention mask.

    side "right" for training and classifiers (real tokens first), "left" for generation (new
    tokens follow every prompt's last token directly).
    """
    width = max([min_width, *(len(row) for row in rows)])
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not len(row):
            continue
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        values[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return values, mask


class RRHFCollator:
    """Tokenised examples -> one batch of all candidates of several prompts.

    Output: input_ids, attention_mask, labels [N, T] with N = total candidates (right padded;
    labels are the input ids on response tokens and -100 on prompt and padding, unshifted as
    in HF: the model's logits at t predict labels at t + 1); rewards [B, K] float32 and
    candidate_mask [B, K] bool with K = the largest k in the batch; candidate_index [N] long,
    the flat position b * K + j of each candidate in the [B, K] grid.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        K = max(len(f["responses_ids"]) for f in features)
        seqs, labels, index = [], [], []
        rewards = torch.zeros(len(features), K, dtype=torch.float32)
        mask = torch.zeros(len(features), K, dtype=torch.bool)
        for b, f in enumerate(features):
            prompt = list(f["prompt_ids"])
            for j, response in enumerate(f["responses_ids"]):
                seqs.append(prompt + list(response))
                labels.append([IGNORE_INDEX] * len(prompt) + list(response))
                index.append(b * K + j)
            k = len(f["responses_ids"])
            rewards[b, :k] = torch.tensor(f["scores"], dtype=torch.float32)
            mask[b, :k] = True
        input_ids, attention = pad_rows(seqs, self.pad_token_id)
        label_t, _ = pad_rows(labels, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
                "rewards": rewards, "candidate_mask": mask,
                "candidate_index": torch.tensor(index, dtype=torch.long)}
