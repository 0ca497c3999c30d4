"""The generate stage: answer prompts, or chat, with a base, adapter or merged model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rrhf_lite.builtin.sources import loadable_model
from rrhf_lite.errors import UserInputError
from rrhf_lite.generation.candidates import generate_candidates
from rrhf_lite.models.adapter_record import (
    FULL_PRECISION,
    choose_quantization,
    flag_choice,
    read_adapter_record,
)
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.stages.adapter_base import adapter_base_model
from rrhf_lite.utils.io import check_text


def generate_texts(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                   max_prompt_length: int | None = None, seed: int | None = None,
                   progress: bool = False) -> list[str]:
    """One answer per prompt, in order: greedy when temperature is 0 (what the evaluator
    scores), else sampled with temperature and top_p.

    Args:
        model, tokenizer: from rrhf_lite.models.inference_loader.load_causal_lm (or any causal LM whose
            tokenizer pads on the left and has a pad token).
        prompts: strings or chat-message lists.
        max_new_tokens: the most tokens per answer.
        batch_size: prompts per generate call.
        max_prompt_length: longer prompts keep their last tokens.
        seed: seeds sampling.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    method = "greedy" if temperature <= 0 else "top_p"
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch",
                      disable=not progress):
        batch = list(prompts[start:start + batch_size])
        rows = generate_candidates(model, tokenizer, batch, method=method, num_candidates=1,
                                   temperature=max(temperature, 1e-5), top_p=top_p,
                                   max_new_tokens=max_new_tokens,
                                   max_prompt_length=max_prompt_length)
        answers.extend(row[0] for row in rows)
    return answers


def chat_loop(model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.0,
              top_p: float = 1.0, input_fn: Callable[[str], str] = input,
              print_fn: Callable[[str], Any] = print) -> list[dict]:
    """Interactive chat on stdin/stdout until EOF, an empty line, "/exit" or "/quit".

    With a chat template the whole conversation is the prompt of each turn; without one, each
    line is a fresh plain-text prompt. "/reset" forgets the conversation.

    Args:
        model, tokenizer: from load_causal_lm.
        max_new_tokens, temperature, top_p: as generate_texts.
        input_fn, print_fn: where lines come from and go to (tests pass their own).

    Returns:
        The conversation as chat messages.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    history: list[dict] = []
    print_fn("chat: type a message; an empty line, /exit or Ctrl-D ends, /reset starts over")
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            print_fn("(conversation reset)")
            continue
        history.append({"role": "user", "content": line})
        prompt = list(history) if templated else line
        answer = generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p)[0]
        history.append({"role": "assistant", "content": answer})
        print_fn(answer)
    return history


def generate_load_kwargs(model: str | None, adapter: str | None, load_in_4bit: bool | None,
                         ) -> dict:
    """What generate loads: load_causal_lm's arguments for a --model / --adapter / --load-in-4bit
    choice. With an adapter, the base and its precision default to what the adapter's record
    (rrhf_lite.json) says training used; a --load-in-4bit / --no-load-in-4bit that differs wins
    and is said once. Without a record, or without an adapter: the base as given, in full
    precision unless --load-in-4bit (rrhf-lite's default 4-bit settings)."""
    if not adapter:
        if not model:
            raise UserInputError("no model given", where="generate",
                                 hint="pass --model (a base or merged model), or --adapter")
        return {"model_name_or_path": loadable_model(model),
                "load_in_4bit": bool(load_in_4bit)}
    record = read_adapter_record(adapter)
    base = adapter_base_model(adapter, model, record=record)
    flag = {True: "--load-in-4bit", False: "--no-load-in-4bit"}.get(load_in_4bit)
    quantization = choose_quantization(
        adapter, requested=flag_choice(load_in_4bit, record), asked_by=flag or "",
        without_record=FULL_PRECISION, record=record,
        hint="--load-in-4bit for a base trained in 4-bit")
    return {"model_name_or_path": base, "adapter_path": adapter,
            "quantization_config": quantization.bnb_config(),
            "torch_dtype": (record or {}).get("torch_dtype") or "auto"}


def run_generate_command(args) -> None:
    """The CLI's `generate` subcommand: answer --prompt values (as one user message each when
    the tokenizer has a chat template), or chat when there are none.

    Reads args.model (None: the adapter's base), args.adapter, args.prompt (list or None),
    args.max_new_tokens, args.temperature, args.top_p, args.load_in_4bit (True, False or None:
    as the adapter was trained), args.trust_remote_code.
    """
    for number, prompt in enumerate(args.prompt or [], start=1):
        check_text(prompt, f"--prompt {number}")  # invalid UTF-8 in argv, before the model loads
    load = generate_load_kwargs(getattr(args, "model", None), getattr(args, "adapter", None),
                                getattr(args, "load_in_4bit", None))
    model, tokenizer = load_causal_lm(
        load.pop("model_name_or_path"), **load,
        trust_remote_code=getattr(args, "trust_remote_code", False),
    )
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p)
    if args.prompt:
        # A chat model is asked as in chat: each --prompt becomes one user message (a bare
        # string after no template markup is not what an instruct model was trained on).
        templated = bool(getattr(tokenizer, "chat_template", None))
        prompts = [[{"role": "user", "content": p}] if templated else p for p in args.prompt]
        for prompt, answer in zip(args.prompt, generate_texts(model, tokenizer, prompts,
                                                              **settings), strict=True):
            print(f"### prompt\n{prompt}\n### answer\n{answer}\n")
    else:
        chat_loop(model, tokenizer, **settings)
