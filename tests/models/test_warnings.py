"""Warnings a model load shows the user: only ones the user can act on."""

from __future__ import annotations

import subprocess
import sys

_WRAP = """
{first}
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
import warnings
warnings.warn("`is_gradient_checkpointing` said in a UserWarning", UserWarning)
warnings.warn("another FutureWarning", FutureWarning)
"""


def _stderr(tiny_lm_dir, first: str) -> str:
    # a fresh interpreter with Python's default filters, as `rrhf-lite` runs (pytest resets
    # the filters a module installs while tests are collected)
    code = _WRAP.format(first=first, path=str(tiny_lm_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_peft_wrapping_does_not_show_transformers_checkpointing_deprecation(tiny_lm_dir):
    shown = _stderr(tiny_lm_dir, "import rrhf_lite")
    assert "is deprecated" not in shown
    assert "another FutureWarning" in shown and "said in a UserWarning" in shown  # that one only
    # without rrhf-lite's filter, peft's read of the deprecated property does warn
    assert "`is_gradient_checkpointing` is deprecated" in _stderr(tiny_lm_dir, "")
