"""Loading the model to train: the base (NF4 4-bit by default) with LoRA adapters, trainable.

Sampling, scoring and evaluation load theirs with rrhf_lite.models.inference_loader; the
per-candidate log-prob sums of a loaded model are rrhf_lite.training.logprobs'."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from rrhf_lite.config.sections import QuantizationSection
from rrhf_lite.errors import UserInputError
from rrhf_lite.models import cpu_4bit
from rrhf_lite.models.inference_loader import load_tokenizer
from rrhf_lite.utils.precision import dtype_name, parse_dtype
from rrhf_lite.utils.user_files import load_adapter, load_pretrained, user_file_errors

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """What to load and how.

    model_name_or_path: hub name or local directory of a causal LM (safetensors only).
    tokenizer_name_or_path: defaults to the model's.
    load_in_4bit: quantise the base to 4-bit with bitsandbytes (QLoRA); needs use_lora.
    bnb_4bit_quant_type: "nf4" or "fp4". bnb_4bit_compute_dtype: "auto" | "bfloat16" | "float16"
        | "float32" ("auto": bf16 on a CUDA device that supports it, fp16 on other CUDA, fp32 on
        CPU). bnb_4bit_use_double_quant: quantise the quantisation constants too.
    bnb_4bit_quant_storage: dtype the packed 4-bit weights are stored in: "auto" | "uint8" |
        "bfloat16" | "float16" | "float32". FSDP flattens each wrapped block into one tensor of
        one dtype (and ZeRO-3 partitions in one dtype), so there the storage must equal the
        other weights' dtype (torch_dtype); "auto" picks that under FSDP / ZeRO-3 (read from
        the environment accelerate launch sets) and uint8 otherwise.
    torch_dtype: dtype of the non-quantised weights, same choices and "auto" rule.
    use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules: PEFT LoRA settings;
        target modules "all-linear" or a list / comma-separated string of module names.
    gradient_checkpointing: non-reentrant activation checkpointing.
    trust_remote_code: off unless you trust the model repository.
    attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None = transformers' choice.
    adapter_init_path: start from an existing LoRA adapter (iterated RRHF) instead of a fresh one.
    base_origin: where model_name_or_path came from, recorded with the trained adapter (its
        rrhf_lite.json and adapter_config.json) so the adapter names a base that loads elsewhere:
        {"name": what the user gave (a builtin: name, hub name or local path), "seed" and
        "options": a built-in's build settings}. None: model_name_or_path itself.
    kbit_precision: what happens to the weights that are not 4-bit under QLoRA. "auto": the
        frozen embeddings and output head keep their load dtype, and the norms follow the
        compute dtype where that is safe (see kbit_precision_plan); "fp32": peft's
        prepare_model_for_kbit_training, every non-4-bit weight up-cast to fp32 (the old path).
    """

    model_name_or_path: str
    tokenizer_name_or_path: str | None = None
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_storage: str = "auto"
    torch_dtype: str = "auto"
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    adapter_init_path: str | None = None
    kbit_precision: str = "auto"
    base_origin: dict | None = None


def sharded_engine() -> str | None:
    """"fsdp" or "zero3" when accelerate launched an engine that shards the weights, else None.

    Read from the environment accelerate launch exports (ACCELERATE_USE_FSDP,
    ACCELERATE_DEEPSPEED_ZERO_STAGE), since the model loads before the Trainer exists.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return "fsdp"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "zero3"
    return None


def resolve_quant_storage(name: str, weight_dtype: torch.dtype) -> torch.dtype:
    """bnb_4bit_quant_storage: "auto" -> the weights' dtype under FSDP / ZeRO-3, else uint8."""
    engine = sharded_engine()
    if name == "auto":
        return weight_dtype if engine else torch.uint8
    hint = "use 'auto', 'uint8', 'bfloat16', 'float16' or 'float32'"
    storage = torch.uint8 if name == "uint8" else parse_dtype(
        name, where="bnb_4bit_quant_storage", auto=False, hint=hint)
    if engine and storage != weight_dtype:
        raise UserInputError(
            f"under {engine} bnb_4bit_quant_storage ({name}) must equal the weights' dtype "
            f"({str(weight_dtype).removeprefix('torch.')})", where="bnb_4bit_quant_storage",
            hint="use 'auto', or set torch_dtype and bnb_4bit_quant_storage to the same dtype")
    return storage


def _target_modules(value: str | list[str]) -> str | list[str]:
    if isinstance(value, str) and value != "all-linear":
        return [m.strip() for m in value.split(",") if m.strip()]
    return value


def lora_config_from_args(args: ModelArguments):
    """A peft.LoraConfig for causal LMs from ModelArguments."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=_target_modules(args.lora_target_modules), bias="none",
                      task_type="CAUSAL_LM")


KBIT_PRECISIONS = ("auto", "fp32")
_logged_reasons: set[str] = set()


def kbit_precision_plan(compute_dtype: torch.dtype) -> tuple[bool, str]:
    """(up-cast the norms to fp32, why) for a QLoRA model computing in `compute_dtype`.

    The frozen embeddings and output head always keep their load dtype: no adapter trains them,
    and the hidden-state log-prob path reads a 16-bit head directly. The norms decide the
    residual stream's dtype (a 4-bit layer returns its input's dtype): 16-bit norms keep it in
    the load dtype, fp32 norms make it fp32 from the first block on (twice the checkpointed
    activations).
    - bfloat16: fp32's exponent range, so the residual stream follows it; losses and LoRA
      gradients stay within bf16 tolerance of the fp32 up-cast
      (tests/models/test_training_loader.py, both CPU 4-bit paths).
    - float16: range up to 65504 only; a residual stream in fp16 can overflow where a model has
      large activations, which a random test model cannot show, so the norms stay fp32 (as
      peft does) and the stream with them until it is measured on an fp16 card.
    - float32: nothing is 16-bit; nothing to decide.
    """
    if compute_dtype == torch.bfloat16:
        return False, ("bfloat16 compute: embeddings, head and norms stay in their load dtype, "
                       "residual stream in bfloat16 (fp32's exponent range)")
    if compute_dtype == torch.float16:
        return True, ("float16 compute: embeddings and head stay in their load dtype; norms "
                      "up-cast to fp32, so the residual stream is fp32 (fp16 overflows above "
                      "65504, not yet measured safe for real models)")
    return False, f"{dtype_name(compute_dtype)} compute: no 16-bit weights to keep or up-cast"


def _to_head_dtype(head, args):
    hidden = args[0]
    if hidden.dtype != head.weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        return (hidden.to(head.weight.dtype), *args[1:])
    return None


def _log_once(message: str) -> None:
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.info("rrhf-lite: %s", message)


def _enable_checkpointing(model, ckpt_kwargs: dict) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)


def prepare_4bit_for_lora(model, compute_dtype: torch.dtype, *, precision: str = "auto",
                          gradient_checkpointing: bool = True, ckpt_kwargs: dict | None = None):
    """Freeze a 4-bit model for LoRA training and enable checkpointing.

    precision "fp32": peft's prepare_model_for_kbit_training (every non-4-bit weight in fp32).
    "auto": no fp32 copies of frozen 16-bit weights: embeddings and head keep their load dtype;
    norms (and other small non-4-bit weights) as kbit_precision_plan decides, the reason
    logged once.
    """
    ckpt_kwargs = ckpt_kwargs if ckpt_kwargs is not None else {"use_reentrant": False}
    if precision not in KBIT_PRECISIONS:
        raise UserInputError(f"unknown kbit_precision {precision!r}", where="kbit_precision",
                             hint="use 'auto' or 'fp32'")
    if precision == "fp32":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    upcast_norms, reason = kbit_precision_plan(compute_dtype)
    if upcast_norms:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        keep = set()
        for module in (getattr(model, "get_input_embeddings", lambda: None)(), head):
            if module is not None:
                keep.update(id(p) for p in module.parameters())
        for param in model.parameters():
            if (param.dtype in (torch.float16, torch.bfloat16) and id(param) not in keep
                    and type(param).__name__ != "Params4bit"):
                param.data = param.data.float()
        if head is not None and getattr(head, "weight", None) is not None:
            # the fp32 stream meets the 16-bit head: cast its input, not a copy of the head
            # (a pre-hook, so the hidden-state path, which bypasses head.forward, reads it too)
            head.register_forward_pre_hook(_to_head_dtype)
    _log_once(reason)
    if gradient_checkpointing:
        _enable_checkpointing(model, ckpt_kwargs)
    return model


def load_model_for_training(args: ModelArguments, *, add_lora: bool = True):
    """Load (model, tokenizer) ready for RRHF training.

    4-bit + LoRA (default): NF4 base via bitsandbytes, frozen, with no fp32 copies of its 16-bit
    embeddings and head (prepare_4bit_for_lora; kbit_precision "fp32" is peft's up-cast), then
    a PEFT LoRA adapter. load_in_4bit=False: full-precision LoRA.
    use_lora=False: full fine-tuning (4-bit then is refused: quantised weights cannot train).
    Gradient checkpointing is non-reentrant. Weights load from safetensors only.

    Several processes (torchrun / accelerate launch): each rank loads one 4-bit copy onto its own
    GPU (LOCAL_RANK), or the CPU without CUDA. Under FSDP / ZeRO-3 the 4-bit storage dtype
    follows the weights' dtype (see bnb_4bit_quant_storage) and the fp32 up-cast of the k-bit
    preparation is skipped (one dtype per sharded block); checkpointing is enabled directly.

    add_lora=False: the prepared base without its adapter, for a trainer that wraps it itself
    with lora_config_from_args(args) (TRL's DPOTrainer does, and then disables that adapter
    for its reference model).
    """
    from transformers import AutoModelForCausalLM

    if args.load_in_4bit and not args.use_lora:
        raise UserInputError("4-bit weights cannot be fine-tuned directly", where="load_in_4bit",
                             hint="enable LoRA, or set load_in_4bit: false for full fine-tuning")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(args.torch_dtype, device=device)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code, "use_safetensors": True}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    compute_dtype = parse_dtype(args.bnb_4bit_compute_dtype, device=device)
    if args.load_in_4bit:
        # the one 4-bit config every stage loads the base with; the storage dtype follows the
        # sharding engine, which only training knows
        section = QuantizationSection(
            quant_type=args.bnb_4bit_quant_type, double_quant=args.bnb_4bit_use_double_quant,
            compute_dtype=dtype_name(compute_dtype))
        kwargs["quantization_config"] = section.bnb_config(
            device=device, quant_storage=resolve_quant_storage(args.bnb_4bit_quant_storage, dtype))
        # one process per GPU: each loads its shards onto its own local device (ZeRO-3 places
        # the weights itself: transformers refuses a device_map there)
        if sharded_engine() != "zero3":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": local if device == "cuda" else "cpu"}
    # the files checked first; loader errors, missing or unexpected weights: exit 2
    model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, what="model",
                            **kwargs)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path,
                               padding_side="right", trust_remote_code=args.trust_remote_code,
                               require_eos=True)
    model.config.use_cache = False  # no KV cache while training (and it clashes with checkpointing)
    cpu_4bit.configure_for_training(model)  # never bitsandbytes' packed CPU inference layout
    ckpt_kwargs = {"use_reentrant": False}
    if args.load_in_4bit and not sharded_engine():
        model = prepare_4bit_for_lora(model, compute_dtype, precision=args.kbit_precision,
                                      gradient_checkpointing=args.gradient_checkpointing,
                                      ckpt_kwargs=ckpt_kwargs)
    elif args.gradient_checkpointing:
        _enable_checkpointing(model, ckpt_kwargs)
        if args.use_lora:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if args.use_lora and add_lora:
        from peft import get_peft_model

        if args.adapter_init_path:
            model = load_adapter(model, args.adapter_init_path, is_trainable=True)
        else:
            with user_file_errors("recipe key lora.target_modules", "LoRA adapter",
                                  "name modules the model has (e.g. q_proj, v_proj), or use "
                                  "all-linear"):
                model = get_peft_model(model, lora_config_from_args(args))
    return model, tokenizer
