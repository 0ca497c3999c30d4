"""The DPO family's reference model in the memory plan (rrhf_lite.training.trainer).

With LoRA the reference is the base with the adapter disabled: no second model. In full
fine-tuning (lora.enabled false) the trainer keeps a frozen copy of the initial model, in the
policy's dtype and on its device, for the whole run: the policy's weights once more, with no
gradient and no optimizer state. Its no-grad forward runs before the policy's pass and frees its
activations, so only the weights add to the step's peak.
"""

from __future__ import annotations

from dataclasses import replace

from rrhf_lite.plan.memory_parts import Part, StepPlan
from rrhf_lite.training.objectives import REFERENCE_LOSS_TYPES

# the policy's weight parts in memory_parts.static_parts when nothing is quantised
POLICY_WEIGHT_PARTS = ("block weights", "embeddings + head")
REFERENCE_PART = "reference model (frozen copy)"


def with_reference(recipe, plan: StepPlan) -> StepPlan:
    """`plan` (a training step's) with the reference model's weights added where it is a second
    model (full fine-tuning), and a note saying so; unchanged for rrhf/pro and with LoRA (the
    reference is the adapter disabled: recipe_memory.reference_note says so, and the plan counts
    its pass as a moment)."""
    loss_type = recipe.train.loss_type
    if loss_type not in REFERENCE_LOSS_TYPES or recipe.lora.enabled:
        return plan
    weights = sum(p.bytes for p in plan.parts if p.name in POLICY_WEIGHT_PARTS)
    part = Part(REFERENCE_PART, weights, "static",
                f"full fine-tuning + {loss_type}: the policy's weights again, no gradient")
    note = (f"reference ({loss_type}): a frozen copy of the initial model, "
            f"{weights / 2**30:.2f} GiB (lora.enabled is false: no adapter to disable)")
    at = next((i for i, p in enumerate(plan.parts) if p.phase != "static"), len(plan.parts))
    return replace(plan, parts=[*plan.parts[:at], part, *plan.parts[at:]], notes=[*plan.notes, note])
