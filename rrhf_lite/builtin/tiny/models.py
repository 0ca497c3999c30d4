"""Tiny randomly initialised LLaMA causal LMs and reward models, sized for CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rrhf_lite.builtin.tiny.tokenizer import build_char_tokenizer


def tiny_llama_config(
    vocab_size: int = 100,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    **overrides,
) -> LlamaConfig:
    """A LLaMA config with the char tokenizer's special ids (pad 0, bos 1, eos 2)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )


def make_tiny_causal_lm(seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()


def make_tiny_reward_model(seed: int = 0, **config_overrides) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = tiny_llama_config(num_labels=1, **config_overrides)
    return LlamaForSequenceClassification(config).eval()


def _save(model, directory: str | Path, chat_template: bool) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    build_char_tokenizer(chat_template=chat_template).save_pretrained(directory)
    return directory


def save_tiny_causal_lm(
    directory: str | Path, seed: int = 0, chat_template: bool = False, **config_overrides
) -> Path:
    """Write a tiny causal LM and its tokenizer to `directory` (safetensors); return the path."""
    return _save(make_tiny_causal_lm(seed, **config_overrides), directory, chat_template)


def save_tiny_reward_model(
    directory: str | Path, seed: int = 0, chat_template: bool = False, **config_overrides
) -> Path:
    """Write a tiny sequence-classification reward model and its tokenizer; return the path."""
    return _save(make_tiny_reward_model(seed, **config_overrides), directory, chat_template)
