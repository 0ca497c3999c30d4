"""A tiny, fully offline world: a character tokenizer and tiny LLaMA / reward models built in-process.

Tests, the tiny-world recipe and the notebook's CPU mode use these instead of hub downloads.
"""

from rrhf_lite.builtin.tiny.models import (
    make_tiny_causal_lm,
    make_tiny_reward_model,
    save_tiny_causal_lm,
    save_tiny_reward_model,
    tiny_llama_config,
)
from rrhf_lite.builtin.tiny.stand_ins import (
    rm_static_rows,
    save_alpaca_like_policy,
    save_gptj_value_head_checkpoint,
    write_rm_static_like,
)
from rrhf_lite.builtin.tiny.tasks import (
    DEFAULT_TASKS,
    TASKS,
    make_splits,
    reward,
    solve,
    write_prompt_sets,
)
from rrhf_lite.builtin.tiny.tokenizer import CHAT_TEMPLATE, build_char_tokenizer
from rrhf_lite.builtin.tiny.warmup import WarmupSettings, build_initial_policy
from rrhf_lite.builtin.tiny.world import measure_policy

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_TASKS",
    "TASKS",
    "WarmupSettings",
    "build_initial_policy",
    "make_splits",
    "measure_policy",
    "reward",
    "solve",
    "write_prompt_sets",
    "build_char_tokenizer",
    "make_tiny_causal_lm",
    "make_tiny_reward_model",
    "save_tiny_causal_lm",
    "save_tiny_reward_model",
    "tiny_llama_config",
    "rm_static_rows",
    "save_alpaca_like_policy",
    "save_gptj_value_head_checkpoint",
    "write_rm_static_like",
]
