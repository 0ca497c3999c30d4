"""Tiny local stand-ins of the paper's HH setup, in the same formats as the real files.

- an Alpaca-like policy: a LLaMA causal LM whose tokenizer puts BOS before every prompt;
- an rm-static-like data set: rows {"prompt", "response", "chosen", "rejected"} with the
  "\\n\\nHuman: ... \\n\\nAssistant:" dialogue format of Dahoas/rm-static;
- the raw GPT-J reward checkpoint: `hf_ckpt.pt`, a torch.save'd flat state dict with the keys
  the reference scorer defines (`transformer.*` of a GPT-J body, `v_head.weight` of a linear
  value head without bias, plus the causal-mask buffers older transformers saved), and beside
  it a base directory holding only the GPT-J config.json and the tokenizer (what
  EleutherAI/gpt-j-6B gives the conversion).

With these, `rrhf-lite run recipes/hh_paper.yaml` runs offline with `--set` overrides of names
and sizes only (tests/pipeline/test_paper_recipes.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rrhf_lite.builtin.tiny.models import save_tiny_causal_lm
from rrhf_lite.builtin.tiny.tokenizer import build_char_tokenizer

_TOPICS = ["a cake", "a bike", "the tides", "a poem", "tea", "a garden", "chess", "rain"]


def save_alpaca_like_policy(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random LLaMA whose tokenizer adds BOS (id 1), as LLaMA's does."""
    directory = save_tiny_causal_lm(directory, seed=seed)
    build_char_tokenizer(add_bos=True).save_pretrained(directory)
    return Path(directory)


def rm_static_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like Dahoas/rm-static: a dialogue prompt, a chosen and a rejected answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        prompt = (f"\n\nHuman: Tell me about {topic}, please ({i})."
                  + (f"\n\nAssistant: Sure.\n\nHuman: More on {topic}?" if i % 2 else "")
                  + "\n\nAssistant:")
        chosen = f" Here is a short note on {topic}."
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen,
                     "rejected": " I would rather not."})
    return rows


def write_rm_static_like(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rm_static_rows(n, seed)),
                    encoding="utf-8")
    return path


def tiny_gptj_config(**overrides):
    from transformers import GPTJConfig

    settings = {"vocab_size": 100, "n_positions": 1024, "n_embd": 32, "n_layer": 2, "n_head": 4,
                "rotary_dim": 4, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
                "tie_word_embeddings": False, **overrides}
    return GPTJConfig(**settings)


def save_gptj_value_head_checkpoint(directory: str | Path, seed: int = 0,
                                    legacy_buffers: bool = True) -> tuple[Path, Path]:
    """Write `directory`/base (config.json + tokenizer, no weights) and `directory`/rm/hf_ckpt.pt
    (the raw reward checkpoint). Returns (checkpoint directory, base directory)."""
    from transformers import GPTJModel

    directory = Path(directory)
    base, rm = directory / "base", directory / "rm"
    base.mkdir(parents=True, exist_ok=True)
    rm.mkdir(parents=True, exist_ok=True)
    config = tiny_gptj_config()
    config.save_pretrained(base)
    build_char_tokenizer().save_pretrained(base)
    torch.manual_seed(seed)
    body = GPTJModel(config)
    state = {f"transformer.{k}": v.clone() for k, v in body.state_dict().items()}
    state["v_head.weight"] = torch.randn(1, config.n_embd)
    if legacy_buffers:  # what GPT-J checkpoints saved by transformers 4.x also hold
        mask = torch.tril(torch.ones(config.n_positions, config.n_positions, dtype=torch.bool))
        for layer in range(config.n_layer):
            state[f"transformer.h.{layer}.attn.bias"] = mask.view(1, 1, *mask.shape)
            state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, rm / "hf_ckpt.pt")
    return rm, base
