"""Recipes the tests write: a train-only recipe on a tiny model."""

from __future__ import annotations

from pathlib import Path

import yaml


def train_recipe(path: Path, model_dir, candidates, output_dir, **sections) -> Path:
    """Write a train-only recipe on a tiny model to `path` (full precision: fastest on CPU, one
    step). Each keyword replaces a recipe section; a mapping is merged into a mapping section."""
    raw = {
        "output_dir": str(output_dir), "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "stages": ["train"],
        "quantization": {"load_in_4bit": False},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"candidates": str(candidates)},
        "train": {"max_steps": 1, "gradient_checkpointing": False, "logprob_backend": "torch",
                  "max_length": 64, "max_prompt_length": 32, "gradient_accumulation_steps": 1,
                  "save_steps": 1000, "warmup_ratio": 0.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = Path(path)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
