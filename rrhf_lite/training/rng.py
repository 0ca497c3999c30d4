"""The random state a training step draws from (the CPU generator and every CUDA device's), saved
and restored so that the trainer's gradient pass replays the dropout masks of its first pass."""

from __future__ import annotations

import torch


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
