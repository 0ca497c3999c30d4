"""Loading models for inference (sampling, scoring, generation) and turning prompts into text.

Training loads its own model (4-bit + LoRA, trainable); this module loads frozen models in eval
mode: a causal LM (optionally with a PEFT adapter on top) and a sequence-classification reward
model. Only safetensors weights are ever read.

Prompts are tokenised by rrhf_lite.data.tokenization.prompt_token_ids, the function the trainer uses,
so the response we generate is exactly what follows the prompt the trainer sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rrhf_lite.config.sections import QuantizationSection
from rrhf_lite.data.tokenization import pad_rows, prompt_token_ids
from rrhf_lite.errors import UserInputError
from rrhf_lite.models import cpu_4bit
from rrhf_lite.utils.io import looks_like_local_path
from rrhf_lite.utils.precision import pretrained_dtype
from rrhf_lite.utils.user_files import (
    check_tokenizer_source,
    load_adapter,
    load_pretrained,
    user_file_errors,
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_model_source(name_or_path: str, what: str) -> None:
    """A path that looks local but does not exist gets a clear error instead of a hub lookup."""
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise UserInputError(
            f"{what} not found", where=name_or_path, hint="check the path (or use a hub name)"
        )


def load_tokenizer(
    name_or_path: str, *, padding_side: str = "left", trust_remote_code: bool = False,
    require_eos: bool = False,
):
    """Load a tokenizer; set pad = eos when it has no pad token; set the padding side.

    Args:
        name_or_path: hub name or local directory.
        padding_side: "left" for generation (new tokens follow the prompt directly),
            "right" for training and scoring.
        trust_remote_code: run tokenizer code shipped with the model (off by default).
        require_eos: refuse a tokenizer without an EOS token (training: every response ends
            with one).
    """
    from transformers import AutoTokenizer

    _check_model_source(str(name_or_path), "tokenizer")
    check_tokenizer_source(str(name_or_path))  # a local directory holds tokenizer files
    with user_file_errors(str(name_or_path), "tokenizer", "check the model name or directory "
                          "(tokenizer.json or tokenizer.model beside tokenizer_config.json)"):
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code
        )
    if require_eos and tokenizer.eos_token_id is None:
        raise UserInputError("the tokenizer has no EOS token", where=str(name_or_path),
                             hint="responses end with EOS; use a tokenizer that defines one")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserInputError(
                "the tokenizer has neither a pad nor an EOS token", where=str(name_or_path),
                hint="use a tokenizer that defines an EOS token",
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked anyway
    tokenizer.padding_side = padding_side
    return tokenizer


def _quantization_config(load_in_4bit: bool, quantization_config):
    """The caller's BitsAndBytesConfig (a recipe's, see QuantizationSection.bnb_config); else,
    with load_in_4bit, rrhf-lite's default 4-bit settings (those `train` uses by default)."""
    if quantization_config is not None or not load_in_4bit:
        return quantization_config
    return QuantizationSection().bnb_config()


def _from_pretrained(auto_class, name_or_path: str, *, torch_dtype, load_in_4bit, trust_remote_code,
                     device, what: str, quantization_config=None, fused_cpu_4bit: bool | int | str = True):
    _check_model_source(str(name_or_path), what)
    dtype = pretrained_dtype(torch_dtype)
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "dtype": dtype,
    }
    quant = _quantization_config(load_in_4bit, quantization_config)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}  # 4-bit weights are placed at load time
    # the files checked first; loader errors, missing or unexpected weights: exit 2
    model = load_pretrained(auto_class, str(name_or_path), what=what, **kwargs)
    if quant is None:
        model.to(device)
    else:  # which of bitsandbytes' CPU paths each 4-bit layer takes (no-op on a GPU)
        cpu_4bit.configure_for_inference(model, fused=fused_cpu_4bit)
    return model.eval()


def _local_adapter_dir(adapter_path: str) -> str:
    """A local directory holding adapter_config.json and adapter_model.safetensors.

    PEFT falls back to a pickled adapter_model.bin when there is no safetensors file; we refuse
    that, and for hub adapters we fetch only the safetensors files.
    """
    path = Path(adapter_path).expanduser()
    if not path.exists():
        _check_model_source(adapter_path, "adapter")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(
                adapter_path, allow_patterns=["adapter_config.json", "adapter_model.safetensors"]
            ))
        except Exception as err:  # network, missing repo: the user must fix the name
            raise UserInputError(
                f"cannot fetch the adapter ({err})", where=adapter_path,
                hint="give a local adapter directory or a valid hub name",
            ) from None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserInputError(
                f"missing {name}", where=str(path),
                hint="an adapter directory saved by PEFT with safe_serialization=True",
            )
    return str(path)


def load_causal_lm(
    model_name_or_path: str,
    *,
    adapter_path: str | None = None,
    torch_dtype: str | torch.dtype = "auto",
    load_in_4bit: bool = False,
    quantization_config=None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    fused_cpu_4bit: bool | int | str = True,
):
    """Load a causal LM and its tokenizer for generation.

    Args:
        model_name_or_path: hub name or local directory of the base (or merged) model.
        adapter_path: a PEFT (LoRA) adapter directory or hub name applied on top, or None.
        torch_dtype: "auto", "float32", "bfloat16", "float16" or a torch.dtype.
        load_in_4bit: load the base in 4-bit through bitsandbytes with rrhf-lite's default
            settings (NF4, double quantisation).
        quantization_config: a BitsAndBytesConfig to load the base with instead: the recipe's
            (QuantizationSection.bnb_config), so the base is the one the adapter was trained on.
        trust_remote_code: run model code shipped with the checkpoint (off by default).
        device: where to put the model; default cuda if available, else cpu.
        fused_cpu_4bit: 4-bit on a CPU with AVX512-BF16: let the layers whose shapes allow it
            use bitsandbytes' fused bf16 kernel for small calls (logits within bf16 rounding of
            training's): True or "auto" = calls up to the crossover measured on this CPU, an int
            N = calls of up to N input rows (rrhf_lite.models.cpu_4bit). False: dequantise +
            matmul everywhere, as training computes.

    Returns:
        (model, tokenizer): model in eval mode; tokenizer pads on the left and has a pad token
        (eos when it had none), which is also set on the model's generation config.
    """
    from transformers import AutoModelForCausalLM

    device = str(device or default_device())
    tokenizer = load_tokenizer(
        model_name_or_path, padding_side="left", trust_remote_code=trust_remote_code
    )
    model = _from_pretrained(
        AutoModelForCausalLM, model_name_or_path, torch_dtype=torch_dtype,
        load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code, device=device,
        what="causal LM", quantization_config=quantization_config, fused_cpu_4bit=fused_cpu_4bit,
    )
    if adapter_path:
        model = load_adapter(
            model, _local_adapter_dir(str(adapter_path)), is_trainable=False
        ).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_model(
    path: str,
    *,
    torch_dtype: str | torch.dtype = "auto",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    fused_cpu_4bit: bool | int | str = True,
):
    """Load a Hugging Face sequence-classification reward model (one label) and its tokenizer.

    Args: as load_causal_lm (no adapter). The tokenizer pads on the right and truncates on the
    left (the end of the response is what the reward model reads).

    Returns:
        (model, tokenizer) with model.config.pad_token_id set, so the model can find the last
        real token of each padded row.
    """
    from transformers import AutoModelForSequenceClassification

    device = str(device or default_device())
    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    tokenizer.truncation_side = "left"
    model = _from_pretrained(
        AutoModelForSequenceClassification, path, torch_dtype=torch_dtype,
        load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code, device=device,
        what="reward model", fused_cpu_4bit=fused_cpu_4bit,
    )
    if model.config.num_labels != 1:
        raise UserInputError(
            f"a reward model needs exactly one output label, this one has {model.config.num_labels}",
            where=str(path), hint="use a sequence-classification model with num_labels=1",
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- prompts ---------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[dict]],
                   max_prompt_length: int | None = None,
                   device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Tokenise prompts (strings or message lists) as one left-padded batch.

    Returns {"input_ids", "attention_mask"}: [batch, length] tensors on `device`.
    """
    rows = [prompt_token_ids(tokenizer, p, max_prompt_length=max_prompt_length) for p in prompts]
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, side="left", min_width=1)
    return {"input_ids": input_ids.to(device or "cpu"),
            "attention_mask": attention_mask.to(device or "cpu")}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def decode_new_tokens(tokenizer, token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> str:
    """Text of generated ids, cut at the first EOS (the EOS itself and any padding dropped)."""
    ids = list(token_ids)
    for index, token in enumerate(ids):
        if token in eos_token_ids:
            ids = ids[:index]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)
