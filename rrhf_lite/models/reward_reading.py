"""What a reward model reads and where it reads it: the text of a (prompt, response) pair, and
the reward of a batch of pairs from a sequence classifier, at its last real token (its own
reading) or at the first EOS (the reference scorer's reading of the GPT-J value head).
Used by the score stage (rrhf_lite.stages.score)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rrhf_lite.data.tokenization import pad_rows
from rrhf_lite.errors import UserInputError


def _content(response) -> str:
    return response["content"] if isinstance(response, dict) else response


# --- reward model -----------------------------------------------------------------------------

def reward_model_text(tokenizer, prompt, response, *, joiner: str = "", append_eos: bool = False
                      ) -> tuple[str, bool]:
    """(text the reward model reads, whether a chat template wrote it).

    A string prompt gives prompt + joiner + response (+ EOS). A message-list prompt is rendered
    with the reward model's chat template together with the response as the assistant turn.
    """
    content = _content(response)
    if isinstance(prompt, str):
        text, templated = prompt + joiner + content, False
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError(
                "chat-message prompts need a reward model tokenizer with a chat template",
                where="reward.model", hint="use string prompts or a chat reward model",
            )
        messages = list(prompt) + [{"role": "assistant", "content": content}]
        text, templated = tokenizer.apply_chat_template(messages, tokenize=False), True
    if append_eos and tokenizer.eos_token:
        text += tokenizer.eos_token
    return text, templated


def _free_id(used: set[int], vocab_size: int) -> int:
    for candidate in range(vocab_size - 1, -1, -1):
        if candidate not in used:
            return candidate
    raise RuntimeError("no token id is free to pad with")


def _values_at_first_eos(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         eos: int) -> torch.Tensor:
    """The reference scorer's reading: the value head on every position, taken at each row's
    first EOS (the one appended after the response, unless the text already held one)."""
    head = getattr(model, "score", None)
    if head is None:
        raise UserInputError("read_at first_eos needs a classifier with a `score` head",
                             where="reward.read_at", hint="use read_at last_token")
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    values = head(hidden).squeeze(-1).float()
    is_eos = input_ids == eos
    if not bool(is_eos.any(dim=1).all()):
        raise RuntimeError("a scored row holds no EOS although one was appended")
    ends = is_eos.float().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    return values.gather(1, ends).squeeze(1)


@torch.no_grad()
def reward_model_scores(model, tokenizer, prompts: Sequence, responses: Sequence, *,
                        max_length: int = 512, joiner: str = "", append_eos: bool = False,
                        read_at: str = "last_token") -> list[float]:
    """Rewards for one batch of (prompt, response) pairs from a sequence classifier: its logit
    at the last real token, or (read_at "first_eos", with append_eos) at the first EOS."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        text, templated = reward_model_text(tokenizer, prompt, response, joiner=joiner,
                                            append_eos=append_eos)
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        rows.append(ids[-max_length:])  # keep the end: the response is what is being judged
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    pad = config.pad_token_id
    used = {t for ids in rows for t in ids}
    # Classifiers read the last token that is not the pad id. When pad == EOS (a tokenizer with
    # no pad token) and the text ends with EOS, that would skip the EOS; pad with an id absent
    # from the batch instead (padding sits on the right, so it never touches the real tokens).
    batch_pad = pad if pad is not None and pad not in used else _free_id(used, config.vocab_size)
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_rows(rows, batch_pad)
    if read_at == "first_eos":
        if not append_eos or tokenizer.eos_token_id is None:
            raise UserInputError("read_at first_eos reads the EOS appended to every text",
                                 where="reward.read_at", hint="set append_eos (and an EOS token)")
        return _values_at_first_eos(model, input_ids.to(device), attention_mask.to(device),
                                    int(tokenizer.eos_token_id)).tolist()
    config.pad_token_id = batch_pad
    try:
        logits = model(input_ids=input_ids.to(device),
                       attention_mask=attention_mask.to(device)).logits
    finally:
        config.pad_token_id = pad
    return logits[:, 0].float().tolist()
