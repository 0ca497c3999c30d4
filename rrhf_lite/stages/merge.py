"""Merge stage: fold a LoRA adapter into a full-precision copy of its base model, then check it.

Why the steps are in this order:
- The base is loaded unquantised (fp16, bf16 or fp32). Merging into 4-bit weights would
  re-quantise W + BA and throw most of the adapter's update away.
- The adapter was trained against NF4 weights, not the original ones. `roundtrip_nf4` passes
  every linear weight that was 4-bit during training through quantise -> dequantise with the
  training's settings, so the merged model computes what the trained policy computed.
- Reference logits come from the unmerged PeftModel (base + adapter as it ran in training);
  the merged model is saved, reloaded from disk and compared with them. That checks the
  artefact a user will ship, not an object in memory.
- With the round trip, the reloaded model is also compared with the trained policy itself:
  the 4-bit base through bitsandbytes + the adapter, on the path training computed (dequantise
  + matmul in the compute dtype), never on bitsandbytes' fused bf16 CPU kernel: that kernel's
  rounding is a property of sampling speed on some CPUs, not of the merge, and a check that
  took it would pass or fail by the CPU it ran on. The report names the path.
- Everything is written to a temporary sibling directory and renamed at the end, so a crash
  or a failed verification never leaves a half-written model behind.
"""

from __future__ import annotations

import datetime
import gc
import math
from pathlib import Path
from typing import Any

import torch

from rrhf_lite.errors import UserInputError
from rrhf_lite.models.adapter_record import (
    FULL_PRECISION,
    BaseQuantization,
    choose_quantization,
    read_adapter_record,
    recorded_quantization,
)
from rrhf_lite.stages.adapter_base import adapter_base_model
from rrhf_lite.stages.merge_checks import (
    ADAPTER_WEIGHTS,
    MergeVerificationError,
    adapter_effect,
    check_adapter_matches,
    compare_logits,
    policy_check,
    prompt_logits,
)
from rrhf_lite.stages.model_card import merged_card, run_results, write_card
from rrhf_lite.utils.io import atomic_directory, write_json
from rrhf_lite.utils.precision import auto_dtype_name, dtype_name, parse_dtype
from rrhf_lite.utils.report_files import environment_versions
from rrhf_lite.utils.user_files import (
    check_adapter_config,
    check_output_path,
    load_adapter,
    load_pretrained,
    user_file_errors,
)

DEFAULT_VERIFY_PROMPTS = [
    "The capital of France is",
    "Human: How do I make a cup of tea?\n\nAssistant:",
    "def fibonacci(n):",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPORT_NAME = "merge_report.json"


def merged_dtype(name: str | torch.dtype) -> torch.dtype:
    """The merged model's dtype: a name (fp16, bf16, fp32 and their spellings) or a torch.dtype."""
    return parse_dtype(name, where="merge torch_dtype", auto=False, hint=(
        "use one of float16, bfloat16, float32 (merging into 4-bit weights is not supported)"))


# ----------------------------------------------------------------------------- input checks


def check_adapter_dir(adapter_path: str | Path) -> dict:
    """Return the adapter's config; refuse anything but a local safetensors PEFT adapter."""
    path = Path(adapter_path)
    if not path.is_dir():
        raise UserInputError(
            "adapter directory not found", where=str(path),
            hint="pass the directory the train stage wrote (it holds adapter_config.json)",
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserInputError(
            "not a PEFT adapter directory (no adapter_config.json)", where=str(path),
            hint="pass the directory the train stage wrote, e.g. RUN_DIR/adapter",
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserInputError(
                f"adapter weights are only in pickle files ({', '.join(pickles)}); rrhf-lite "
                "loads safetensors only, because unpickling a file can run arbitrary code",
                where=str(path),
                hint="if you trust the file, convert it once: load it with torch.load and save "
                f"with safetensors.torch.save_file as {ADAPTER_WEIGHTS}",
            )
        raise UserInputError(
            f"no {ADAPTER_WEIGHTS} in the adapter directory", where=str(path),
            hint="the directory holds an adapter config but no weights; was training finished?",
        )
    return check_adapter_config(path)  # a JSON object with sane LoRA numbers, intact weights


def check_output_dir(output_dir: str | Path, force: bool, inputs: list[str | Path]) -> Path:
    """Refuse a non-empty existing output directory (unless force) or one that holds an input."""
    out = check_output_path(output_dir, str(output_dir))  # not a file, not under one, writable
    if out.exists() and not out.is_dir():
        raise UserInputError("output path exists and is a file", where=str(out),
                             hint="choose a directory path for the merged model")
    resolved = out.resolve()
    for item in inputs:
        src = Path(item)
        if src.exists() and (resolved == src.resolve() or resolved in src.resolve().parents):
            raise UserInputError(
                f"output directory would overwrite the input {src}", where=str(out),
                hint="write the merged model to a new directory",
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserInputError(
            "output directory already exists and is not empty", where=str(out),
            hint="choose another directory, or pass --force to replace its contents",
        )
    return out


# ----------------------------------------------------------------------------- NF4 round trip


def roundtrip_4bit(
    model: torch.nn.Module,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: list[str] | None = None,
) -> dict:
    """Replace each linear weight W by dequantize(quantize(W)), as bitsandbytes stores it.

    Hugging Face's 4-bit loading quantises every nn.Linear except the output head (and any
    `llm_int8_skip_modules`), whether or not LoRA targets it, so that is the set we round-trip.
    Returns how many modules changed and by how much.
    """
    import bitsandbytes.functional as bnbf

    if quant_type not in ("nf4", "fp4"):
        raise UserInputError(f"unknown 4-bit quant type {quant_type!r}",
                             where="merge quant_type", hint="use nf4 or fp4")
    head = model.get_output_embeddings()
    skip = set(skip_modules or [])
    count, max_change, total_change, total_numel = 0, 0.0, 0.0, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip):
            continue
        weight = module.weight.data
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        restored = bnbf.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)
        change = (restored.float() - weight.float()).abs()
        max_change = max(max_change, change.max().item())
        total_change += change.sum().item()
        total_numel += change.numel()
        weight.copy_(restored)
        count += 1
    return {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "modules": count,
        "max_abs_change": max_change,
        "mean_abs_change": total_change / max(total_numel, 1),
    }


# ----------------------------------------------------------------------------- loading / saving


def _load_base(base_model: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, str(base_model), what="base model", dtype=dtype,
                           use_safetensors=True, trust_remote_code=trust_remote_code)


def _load_tokenizer(adapter_path: Path, base_model: str, trust_remote_code: bool):
    """The adapter's own tokenizer if training saved one (it may carry a chat template)."""
    from transformers import AutoTokenizer

    has_own = any((adapter_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = str(adapter_path) if has_own else base_model
    with user_file_errors(str(source), "tokenizer", "check the tokenizer files there"):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def _save_merged(model, tokenizer, directory: Path, max_shard_size: str | int) -> None:
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)


# ----------------------------------------------------------------------------- the stage


def _roundtrip_choice(adapter_path: Path, record: dict | None, roundtrip_nf4: bool | None,
                      quant_type: str | None, double_quant: bool | None,
                      without_record: bool, device: str) -> BaseQuantization:
    """The 4-bit format to round-trip the base through (load_in_4bit False: none), from the
    caller's choice and the adapter's record (see merge_adapter)."""
    trained = recorded_quantization(record) if record else None
    like = trained if trained and trained.load_in_4bit else BaseQuantization(
        True, compute_dtype=auto_dtype_name(device))  # rrhf-lite's QLoRA defaults
    requested = None
    if (roundtrip_nf4, quant_type, double_quant) != (None, None, None):
        on = roundtrip_nf4 if roundtrip_nf4 is not None else bool(trained and trained.load_in_4bit)
        requested = BaseQuantization(
            on, quant_type or like.quant_type,
            like.double_quant if double_quant is None else double_quant, like.compute_dtype)
    if requested is not None and not requested.load_in_4bit:
        requested = FULL_PRECISION
    fallback = like if without_record else FULL_PRECISION
    return choose_quantization(adapter_path, requested=requested, record=record,
                               asked_by="the merge's round-trip settings",
                               without_record=fallback,
                               hint="--roundtrip-nf4 / --no-roundtrip-nf4")



def merge_adapter(
    base_model: str | Path | None,
    adapter_path: str | Path,
    output_dir: str | Path,
    *,
    torch_dtype: str | torch.dtype = "float16",
    roundtrip_nf4: bool | None = None,
    roundtrip_without_record: bool = False,
    check_4bit_policy: bool | None = None,
    quant_type: str | None = None,
    blocksize: int = 64,
    double_quant: bool | None = None,
    skip_modules: list[str] | None = None,
    verify_prompts: list[str] | None = None,
    tolerance: float | None = None,
    allow_mismatch: bool = False,
    max_shard_size: str | int = "5GB",
    device: str = "cpu",
    force: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge a LoRA adapter into its base and save a standalone model in `output_dir`.

    base_model: hub name, local directory or builtin: name; None takes the base the adapter
      records (rrhf_lite.json), else the one its adapter_config.json names.
    roundtrip_nf4: pass the base's linear weights through 4-bit quantisation first, so the
      merged model matches the policy that was trained on the 4-bit base. None: as the
      adapter's record says training loaded its base (quant_type and double_quant too, when
      they are None); without a record, roundtrip_without_record (default False) with the
      defaults nf4 + double quantisation. A choice that differs from the record wins and is
      said once.
    check_4bit_policy: also compare the merged model with the 4-bit base (bitsandbytes, same
      quant settings) + adapter, i.e. the policy as it ran; default: when roundtrip_nf4.
    verify_prompts: prompts whose logits are compared; None uses a few defaults, [] skips it.
    tolerance: absolute max logit difference allowed (default: per-dtype, relative to scale).
    allow_mismatch: keep the output even when verification fails (report ok=False);
      otherwise a failed check raises MergeVerificationError and writes nothing.
    device: where to merge and verify ("cpu", or "cuda" when the model fits in GPU memory
      at torch_dtype: much faster NF4 round trip and verification for 7B+ models).
    Returns the report that is also written to output_dir/merge_report.json.
    """
    dtype = merged_dtype(torch_dtype)
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserInputError(f"tolerance must be a finite number >= 0, got {tolerance}",
                             where="merge tolerance", hint="e.g. 0.05, or leave it unset")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} requested but CUDA is not available",
                             where="merge device", hint="use device='cpu'")
    adapter_path = Path(adapter_path)
    check_adapter_dir(adapter_path)
    record = read_adapter_record(adapter_path)
    base_model = adapter_base_model(adapter_path, str(base_model) if base_model else None,
                                    record=record, flag="--base")
    quant = _roundtrip_choice(adapter_path, record, roundtrip_nf4, quant_type, double_quant,
                              roundtrip_without_record, str(device))
    out = check_output_dir(output_dir, force, inputs=[adapter_path, base_model])
    prompts = DEFAULT_VERIFY_PROMPTS if verify_prompts is None else list(verify_prompts)

    tokenizer = _load_tokenizer(adapter_path, base_model, trust_remote_code)
    model = _load_base(base_model, dtype, trust_remote_code).to(device)
    report: dict[str, Any] = {
        "base_model": base_model,
        "adapter": str(adapter_path),
        "dtype": dtype_name(dtype),
        "device": str(device),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        "trained_base": record.get("quantization") if record else None,
        "roundtrip": None,
        "warnings": [],
    }
    if quant.load_in_4bit:
        report["roundtrip"] = roundtrip_4bit(
            model, quant_type=quant.quant_type, blocksize=blocksize,
            double_quant=quant.double_quant, skip_modules=skip_modules,
        )
    base_logits = prompt_logits(model, tokenizer, prompts) if prompts else None

    peft_model = load_adapter(model, str(adapter_path), is_trainable=False)
    check_adapter_matches(peft_model, adapter_path)
    reference = prompt_logits(peft_model, tokenizer, prompts) if prompts else None
    merged = peft_model.merge_and_unload()
    del peft_model, model

    with atomic_directory(out, overwrite=True) as tmp:
        _save_merged(merged, tokenizer, tmp, max_shard_size)
        del merged
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["files"] = sorted(p.name for p in tmp.iterdir())
        if prompts:
            # Reload what was written: the check covers the files, not just the object in memory.
            reloaded = _load_base(str(tmp), dtype, trust_remote_code).to(device)
            got = prompt_logits(reloaded, tokenizer, prompts)
            del reloaded
            check = compare_logits(reference, got, dtype=dtype_name(dtype), tolerance=tolerance)
            check["adapter_effect"] = adapter_effect(base_logits, reference)
            check["prompts"] = len(reference)
            check["compute_path"] = {"path": "full precision", "compute_dtype": dtype_name(dtype)}
            if check["adapter_effect"] == 0.0:
                report["warnings"].append("the adapter does not change any logit: it is a no-op "
                                          "(untrained, or its LoRA B weights are all zero)")
            report["verification"] = check
            report["ok"] = check["ok"]
            report["max_abs_diff"] = check["max_abs_diff"]
            if quant.load_in_4bit if check_4bit_policy is None else check_4bit_policy:
                report["policy_verification"] = policy_check(
                    base_model, adapter_path, tokenizer, prompts, got,
                    merged_dtype=dtype_name(dtype), device=device, quant_type=quant.quant_type,
                    double_quant=quant.double_quant, compute_dtype=quant.compute_dtype,
                    trust_remote_code=trust_remote_code,
                    tolerance=tolerance)
                report["ok"] = report["ok"] and report["policy_verification"]["ok"]
        else:
            report["verification"] = None
            report["ok"] = True
            report["max_abs_diff"] = None
        report["output_dir"] = str(out)
        write_json(tmp / REPORT_NAME, report)
        write_card(tmp, merged_card(record, report, run_results(adapter_path), adapter_path))
        if not report["ok"] and not allow_mismatch:
            check = report["verification"]
            against = "base + adapter"
            if check["ok"]:  # the 4-bit policy check is the one that failed
                check = report["policy_verification"]
                path = check["compute_path"]
                against = (f"the 4-bit policy ({path['path']} path on "
                           f"{path['fused_layers'] + path['dequantize_layers']} 4-bit layers)")
            what = (f"{check['nonfinite_logits']} NaN/inf logits" if check["nonfinite_logits"]
                    else f"max |logit diff| {check['max_abs_diff']:.4g} > tolerance "
                    f"{check['tolerance']:.4g}")
            raise MergeVerificationError(
                f"merged model does not reproduce {against}: {what} "
                f"(top-1 agreement {check['top1_agreement']:.1%}); nothing was written",
                where=str(adapter_path),
                hint="the adapter may be corrupted or trained on another base; if the "
                "difference is only low-precision noise, merge in float32 or raise the tolerance",
            )
    return report
