"""Checks that a merged model computes what base + adapter computed.

Logits of a few prompts are compared: against the unmerged PeftModel in the merge's dtype, and,
when the adapter was trained on a 4-bit base, against that 4-bit policy itself, with a tolerance
that follows the path bitsandbytes took for its 4-bit layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rrhf_lite.config.sections import QuantizationSection
from rrhf_lite.errors import UserInputError
from rrhf_lite.models import cpu_4bit
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.utils.precision import parse_dtype

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Default max |merged - reference| allowed, as a fraction of the largest reference logit
# (at least 1.0 of scale, so near-zero logits of tiny models do not make it absurdly tight).
# fp32 only sees summation-order noise; fp16/bf16 see the rounding of W + BA to 10/7 bits.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}

# The same, for the merged model against the 4-bit policy, by the compute dtype its 4-bit layers
# dequantise into (the policy never takes the fused bf16 CPU kernel here: see policy_check).
# Activations rounded at every layer (bf16 on a GPU: 8 bits) drift more than weights rounded
# once, yet a merge that skipped the NF4 round trip must still fail.
POLICY_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}

class MergeVerificationError(UserInputError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""




@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str], max_tokens: int = 256) -> list[torch.Tensor]:
    """Logits [T, V] (float32, CPU) for each prompt, run one at a time so no padding interferes."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :max_tokens]
        if ids.shape[1] == 0:
            continue
        out.append(model(input_ids=ids.to(device)).logits[0].float().cpu())
    if not out:
        raise UserInputError("every verification prompt tokenised to nothing",
                             where="merge verify_prompts", hint="pass non-empty prompts")
    return out


def compare_logits(
    reference: list[torch.Tensor],
    candidate: list[torch.Tensor],
    *,
    dtype: str = "float32",
    tolerance: float | None = None,
) -> dict:
    """Max |candidate - reference| over all prompts and positions, against a tolerance.

    `tolerance` is absolute; by default RELATIVE_TOLERANCE[dtype] times the largest reference
    logit (at least 1). Also reports how often the top-1 token agrees, which is what a user sees.
    """
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate cover different prompts")
    max_diff, scale, agree, positions, nonfinite = 0.0, 0.0, 0, 0, 0
    for ref, got in zip(reference, candidate, strict=True):
        if ref.shape != got.shape:
            raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}")
        # NaN/inf (e.g. a NaN in the adapter) must fail, and Python's max() would skip a NaN.
        nonfinite += int((~torch.isfinite(ref)).sum() + (~torch.isfinite(got)).sum())
        diff = (got - ref).abs().nan_to_num(nan=0.0, posinf=0.0)
        max_diff = max(max_diff, diff.max().item())
        scale = max(scale, ref.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item())
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        positions += ref.shape[0]
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE[dtype] * max(scale, 1.0)
    return {
        "max_abs_diff": max_diff,
        "max_abs_logit": scale,
        "tolerance": tolerance,
        "nonfinite_logits": nonfinite,
        "top1_agreement": agree / max(positions, 1),
        "ok": bool(nonfinite == 0 and max_diff <= tolerance),
    }


def check_adapter_matches(peft_model, adapter_path: Path) -> None:
    """Every tensor in the adapter file must land in the model and vice versa.

    PEFT only warns about mismatched keys and leaves those LoRA weights at their initial
    value (B = 0), so a renamed or truncated adapter would merge "successfully" into a no-op.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(adapter_path / ADAPTER_WEIGHTS), framework="pt") as handle:
        in_file = set(handle.keys())
    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = sorted(expected - in_file), sorted(in_file - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors that match no module (e.g. {unexpected[0]})")
        raise UserInputError(
            "adapter does not fit the base model: " + "; ".join(parts),
            where=str(adapter_path / ADAPTER_WEIGHTS),
            hint="check that the base model is the one the adapter was trained on, and that "
            "the adapter file is complete",
        )


def adapter_effect(base: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """How far the adapter moves the logits; if ~0 the adapter is a no-op (e.g. untrained B=0)."""
    diffs = ((r - b).abs().nan_to_num(nan=0.0, posinf=0.0) for b, r in zip(base, reference, strict=True))
    return max(d.max().item() for d in diffs)


def policy_check(base_model: str, adapter_path: Path, tokenizer, prompts: list[str],
                 merged_logits: list[torch.Tensor], *, merged_dtype: str, device: str,
                 quant_type: str, double_quant: bool, trust_remote_code: bool,
                 tolerance: float | None, compute_dtype: str = "auto") -> dict:
    """Merged logits against the trained policy: the 4-bit base (bitsandbytes) + the adapter.

    The policy computes as training did: dequantise + matmul in the compute dtype, on every CPU
    (bitsandbytes' fused bf16 kernel, which sampling may take on AVX512-BF16 CPUs, is off
    here), so the check and its tolerance do not depend on the CPU. The tolerance is the looser
    of the merged dtype's and the compute dtype's; `compute_path` in the result says which path
    ran on how many layers.
    """
    quantization = QuantizationSection(quant_type=quant_type, double_quant=double_quant,
                                       compute_dtype=compute_dtype)
    policy, _ = load_causal_lm(
        base_model, adapter_path=str(adapter_path), device=device,
        torch_dtype=parse_dtype("auto", device=device),  # what training computed in here
        quantization_config=quantization.bnb_config(device=device),
        fused_cpu_4bit=False, trust_remote_code=trust_remote_code)
    reference = prompt_logits(policy, tokenizer, prompts)
    path = cpu_4bit.compute_path(policy)
    del policy
    precision = path["compute_dtype"] or "float32"
    relative = max(RELATIVE_TOLERANCE[merged_dtype], POLICY_TOLERANCE.get(precision, 8e-2))
    if tolerance is None:
        tolerance = relative * max(max(r.abs().max().item() for r in reference), 1.0)
    check = compare_logits(reference, merged_logits, tolerance=tolerance)
    check["compute_path"] = path
    return check
