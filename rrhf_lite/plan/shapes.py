"""Model shapes for the memory plan, without loading weights.

A shape comes from a local `config.json` (a directory, or the file itself) or, for the hub names
the shipped recipes use, from the small table below (numbers copied from the models' published
config.json files; nothing is downloaded). Anything else is an error that says what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rrhf_lite.builtin.sources import SMOLLM2
from rrhf_lite.errors import UserInputError


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a model's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    family: str = "llama"  # "llama" (gated MLP, RMSNorm, RoPE) or "encoder" / "gptj" (reward models)
    weight_bytes: int = 2  # bytes per parameter of the checkpoint as stored (fp32 = 4)
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block (LLaMA family)."""
        H, I = self.hidden_size, self.intermediate_size  # noqa: E741
        if self.family == "llama":
            return {"q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
                    "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I),
                    "down_proj": (I, H)}
        # a plain transformer block: q, k, v, o and a two-matrix MLP
        return {"q_proj": (H, H), "k_proj": (H, H), "v_proj": (H, H), "o_proj": (H, H),
                "fc_in": (H, I), "fc_out": (I, H)}

    def block_params(self) -> int:
        return sum(i * o for i, o in self.block_linears().values())

    def embedding_params(self) -> int:
        """Input embeddings plus the output head (once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def total_params(self) -> int:
        return self.num_layers * self.block_params() + self.embedding_params()


def _llama(v, h, i, layers, heads, kv, tie=False, head_dim=None, wb=2, source=""):
    return ModelShape(v, h, i, layers, heads, kv, head_dim or h // heads, tie, "llama", wb, source)


_LLAMA3_8B = _llama(128256, 4096, 14336, 32, 32, 8, source="Meta-Llama-3-8B config.json")
_LLAMA_7B = _llama(32000, 4096, 11008, 32, 32, 32, source="LLaMA-7B config.json (alpaca-native "
                   "adds a pad token: vocab 32001, a negligible difference)")
# Hub names in the shipped recipes and the Colab notebook; architecture numbers only.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "chavinlo/alpaca-native": _LLAMA_7B,
    "huggyllama/llama-7b": _LLAMA_7B,
    "Qwen/Qwen2.5-0.5B-Instruct": _llama(151936, 896, 4864, 24, 14, 2, tie=True,
                                         source="Qwen2.5-0.5B config.json"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama(49152, 576, 1536, 30, 9, 3, tie=True,
                                                  source="SmolLM2-135M config.json"),
    # reward models (scoring): stored dtype matters, they load as stored
    "OpenAssistant/reward-model-deberta-v3-large-v2": ModelShape(
        128100, 1024, 4096, 24, 16, 16, 64, True, "encoder", 4,
        "DeBERTa-v3-large config.json; checkpoint stored in fp32"),
    "Dahoas/gptj-rm-static": ModelShape(
        50400, 4096, 16384, 28, 16, 16, 256, False, "gptj", 2,
        "GPT-J-6B config.json; value head instead of the LM head, loaded in fp16"),
    "EleutherAI/gpt-j-6B": ModelShape(
        50400, 4096, 16384, 28, 16, 16, 256, False, "gptj", 2,
        "GPT-J-6B config.json; scored in fp16 on a GPU, as the reference"),
    "Skywork/Skywork-Reward-V2-Qwen3-0.6B": _llama(151936, 1024, 3072, 28, 16, 8, tie=True,
                                                   head_dim=128, source="Qwen3-0.6B config.json"),
}

# builtin: models -> the hub name of the same weights (their shapes are the hub model's)
BUILTIN_SHAPES = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def shape_from_config(config: dict, source: str = "config.json") -> ModelShape:
    """A ModelShape from a transformers config dict (LLaMA-like decoders; GPT-J; encoders)."""
    def get(*names, default=None):
        for name in names:
            if config.get(name) is not None:
                return config[name]
        if default is not None:
            return default
        raise UserInputError(f"{source}: no '{names[0]}' in the model config",
                             hint="the plan reads LLaMA-style configs (hidden_size, "
                                  "num_hidden_layers, num_attention_heads, intermediate_size)")

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    model_type = str(config.get("model_type", ""))
    family = "gptj" if model_type == "gptj" else (
        "encoder" if model_type in ("deberta-v2", "bert", "roberta", "deberta") else "llama")
    return ModelShape(
        vocab_size=get("vocab_size"), hidden_size=hidden,
        intermediate_size=get("intermediate_size", "n_inner", default=4 * hidden),
        num_layers=get("num_hidden_layers", "n_layer"), num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        tie_embeddings=bool(config.get("tie_word_embeddings", family != "llama")),
        family=family,
        weight_bytes=_DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2),
        source=source,
    )


def resolve_shape(name_or_path: str) -> ModelShape:
    """The shape of a model: a local config.json first, then the table of known hub names."""
    path = Path(name_or_path)
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name == "config.json" and config_file.is_file():
        return shape_from_config(json.loads(config_file.read_text()), str(config_file))
    name_or_path = BUILTIN_SHAPES.get(name_or_path, name_or_path)
    if name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[name_or_path]
    raise UserInputError(
        f"no shape known for model {name_or_path!r}",
        where="model.name_or_path",
        hint="the plan reads a model's config.json without downloading: pass a local directory "
             "holding it, or one of: " + ", ".join(sorted([*KNOWN_SHAPES, *BUILTIN_SHAPES])),
    )
