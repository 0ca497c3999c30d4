"""Will it fit? The training step's peak GPU memory by part, from a model's shape and a recipe.

No weights are loaded and no GPU is needed: every part is a count of the tensors that the step
holds at its peak, written out below with where each number comes from. The step is
rrhf-lite's (rrhf_lite.training.trainer): NF4 base + LoRA, non-reentrant gradient checkpointing, the
candidates of a batch in micro-batches of m (pass 1 scores all without a graph, pass 3 re-runs
each micro-batch with autograd), log-probs from the logits (`logits_path`).

Where the numbers come from (see `Regime` for the dtypes):
- static: 4-bit weights (0.5 byte per weight), their quantisation constants (one absmax per
  64 weights: 1 byte with double quantisation plus a fp32 constant per 256 blocks, else fp32),
  the embeddings and head up-cast to fp32 by peft's prepare_model_for_kbit_training, LoRA
  parameters (fp32), their gradients (fp32) and the optimizer's states (AdamW: 2 x fp32).
- checkpointed activations: the input of every decoder block and the last block's output
  ((layers + 1) x tokens x hidden, in the residual stream's dtype, fp32 after the up-cast).
- the recomputed block: what one block saves for backward when checkpointing re-runs it
  (`block_saved_bytes_per_token`), plus the gradients in flight and the one dequantised weight.
- logits and log-prob buffers: `logits_path` (today's path: logits of the response positions,
  kept for the backward of the log-prob kernel, and their gradient). A path that never builds
  the [N, T, V] logits (hidden-state log-probs) is added as another function with the same
  signature, chosen by the `logprob_path` argument of `training_parts`.
- overhead: the CUDA context and the caching allocator's slack; not in torch's allocated
  statistics, so kept apart from the allocated total.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rrhf_lite.plan.block_memory import (
    ChunkLayout,
    backward_moment,
    dtypes_of,
    forward_moment,
    recompute_moment,
)
from rrhf_lite.plan.shapes import ModelShape

GiB = 2**30
BLOCK = 64  # bitsandbytes 4-bit block size
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS workspace: an estimate, not counted
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on the dynamic part: an assumption
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "adafactor": 0}
# The objectives with a reference model (rrhf_lite.training.objectives.REFERENCE_LOSS_TYPES; a
# test checks they agree): with LoRA the reference is the base with the adapter disabled.
REFERENCE_LOSS_TYPES = ("pl_dpo", "lipo", "dpo_pairs")


@dataclass(frozen=True)
class Regime:
    """The dtypes of a step. GPU: bf16/fp16 compute under autocast; CPU: fp32 throughout, or bf16
    under CPU autocast (the measured regime of benchmarks/plan_by_part.py).

    compute_bytes: activations of the 4-bit matmuls and attention under autocast. residual_bytes:
    the residual stream (fp32 once the norms are up-cast). frozen_bytes: embeddings and head.
    device: "cuda" or "cpu": dropout masks (1 byte on CUDA, the input's dtype on the CPU) and
    whether peft copies a LoRA layer's input to fp32 (unless CUDA autocast is on;
    rrhf_lite.plan.block_memory).
    """

    compute_bytes: int = 2
    residual_bytes: int = 4
    logits_bytes: int = 4  # logits as the log-prob kernel sees them (accelerate returns fp32)
    autocast: bool = True
    frozen_bytes: int = 4  # embeddings and head: fp32 after peft's up-cast, 2 when kept 16-bit
    device: str = "cuda"

    @classmethod
    def qlora(cls, half: str = "bf16") -> Regime:
        """The trainer's QLoRA dtypes since issue 30 (training_loader.kbit_precision_plan):
        embeddings and head stay 16-bit; the residual stream follows bf16 compute, and stays
        fp32 (norms up-cast) under fp16."""
        return cls(2, 2 if half == "bf16" else 4, 4, True, 2)

    @classmethod
    def cpu(cls) -> Regime:
        return cls(4, 4, 4, False, 4, "cpu")

    @classmethod
    def cpu_qlora(cls, dtype: str = "bf16") -> Regime:
        """QLoRA on the CPU (benchmarks/plan_by_part.py): bf16 under CPU autocast, or fp32."""
        return replace(cls.qlora("bf16"), device="cpu") if dtype == "bf16" else cls.cpu()

    @classmethod
    def gpu(cls, compute_bytes: int = 2) -> Regime:
        """peft's k-bit preparation (kbit_precision fp32): everything but the 4-bit weights fp32."""
        return cls(compute_bytes, 4, 4, True, 4)


@dataclass(frozen=True)
class TrainSettings:
    """The recipe's numbers the training plan needs."""

    candidates: int  # N = prompts per step x k
    micro_batch: int  # m
    max_length: int  # tokens of the longest candidate (prompt + response)
    response_tokens: int | None = None  # logits positions kept; None = max_length (worst case)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj")
    lora_dropout: float = 0.05
    double_quant: bool = True
    optimizer: str = "adamw"
    checkpointing: bool = True
    load_in_4bit: bool = True
    share_prompt: bool = False  # packed rows: each prompt once per chunk
    prompt_tokens: int | None = None  # max_prompt_length (for packing and the first-batch checks)
    per_prompt: int | None = None  # k
    first_batch_checks: bool = False  # count the trainer's one-off checks as a moment
    loss_type: str = "rrhf"  # the DPO family adds the reference pass (REFERENCE_LOSS_TYPES)


@dataclass
class Part:
    name: str
    bytes: float
    phase: str  # "static" | "dynamic" | "overhead"
    source: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class StepPlan:
    parts: list[Part]
    peak_phase: str  # which moment of the step the dynamic parts belong to
    notes: list[str] = field(default_factory=list)
    moments: dict[str, list[Part]] = field(default_factory=dict)  # every moment's dynamic parts
    where: str = "card"  # "host": a stage that runs on the CPU (merge)

    def total(self, phases=("static", "dynamic")) -> float:
        return sum(p.bytes for p in self.parts if p.phase in phases)

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should read."""
        return self.total(("static", "dynamic"))

    @property
    def on_card(self) -> float:
        return self.total(("static", "dynamic", "overhead"))


# ---------------------------------------------------------------------------- static parts


def quantised_bytes(shape: ModelShape, double_quant: bool) -> tuple[float, float]:
    """(packed 4-bit weights, quantisation constants) of every decoder-block linear layer.

    Constants per layer (bitsandbytes' QuantState, counted on a loaded model): one absmax per 64
    weights (uint8 with double quantisation, whose own fp32 absmax covers 256 blocks, plus its
    256-entry fp32 code table and an fp32 offset; else fp32), and the 16-entry fp32 NF4 table."""
    weights = consts = 0.0
    for i, o in shape.block_linears().values():
        blocks = -(-i * o // BLOCK)
        weights += i * o / 2
        consts += (blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 if double_quant else blocks * 4) + 16 * 4
    return shape.num_layers * weights, shape.num_layers * consts


def lora_params(shape: ModelShape, r: int, targets) -> int:
    linears = shape.block_linears()
    return shape.num_layers * sum(r * (i + o) for name, (i, o) in linears.items() if name in targets)


def static_parts(shape: ModelShape, s: TrainSettings, regime: Regime) -> list[Part]:
    parts = []
    if s.load_in_4bit:
        w, c = quantised_bytes(shape, s.double_quant)
        parts += [Part("4-bit weights", w, "static", "0.5 byte per block weight"),
                  Part("quantisation constants", c, "static",
                       "absmax per 64 weights: uint8 + fp32 per 256 blocks, code tables" if s.double_quant
                       else "fp32 absmax per 64 weights")]
        embed_bytes = regime.frozen_bytes  # 4: peft's k-bit up-cast; 2: kept in the load dtype
    else:
        parts.append(Part("block weights", shape.num_layers * shape.block_params() * 2, "static",
                          "16-bit"))
        embed_bytes = 2
    parts.append(Part("embeddings + head", shape.embedding_params() * embed_bytes, "static",
                      f"V x H x {1 if shape.tie_embeddings else 2}, "
                      + ("fp32 after the k-bit up-cast" if embed_bytes == 4 else "16-bit, frozen")
                      if s.load_in_4bit else "V x H, 16-bit"))
    n = lora_params(shape, s.lora_r, s.lora_targets)
    opt = OPTIMIZER_STATE_BYTES.get(s.optimizer, 8)
    parts += [Part("LoRA parameters", n * 4, "static", f"{n / 1e6:.1f} M params, fp32"),
              Part("LoRA gradients", n * 4, "static", "fp32, kept across micro-batches"),
              Part("optimizer states", n * opt, "static", f"{s.optimizer}: {opt} bytes/param")]
    return parts


# ---------------------------------------------------------------------------- activations


def dequantised_weight_bytes(shape: ModelShape, regime: Regime) -> float:
    """bitsandbytes multiplies a 4-bit layer by dequantising it to the compute dtype first."""
    return max(i * o for i, o in shape.block_linears().values()) * regime.compute_bytes


def final_norm_input_bytes(shape: ModelShape, tokens: int) -> float:
    """The final norm saves its input in fp32 (an fp32 copy of a 16-bit stream, or the last
    block's fp32 output): kept from the forward until its backward, after the log-prob pass."""
    return 4 * shape.hidden_size * tokens


def logits_path(shape: ModelShape, m: int, positions: int, regime: Regime) -> list[Part]:
    """The logits log-prob path: logits [m, positions, V], kept for the kernel's backward, and
    their gradient (the kernel's own chunk buffers are small next to these)."""
    n = m * positions * shape.vocab_size
    parts = [Part("logits (kept for backward)", n * regime.logits_bytes, "dynamic",
                  f"{m} x {positions} x {shape.vocab_size} x {regime.logits_bytes} B"),
             Part("logits gradient", n * regime.logits_bytes, "dynamic", "same shape")]
    if regime.autocast:
        parts.append(Part("16-bit logits gradient", n * regime.compute_bytes, "dynamic",
                          "cast back through accelerate's fp32 output"))
    if regime.autocast and regime.frozen_bytes == 4:  # a 16-bit head needs no copy
        parts.append(Part("head weight, autocast copy", shape.vocab_size * shape.hidden_size
                          * regime.compute_bytes, "dynamic", "fp32 head cast for the matmul, saved"))
    return parts


# rrhf_kernels._hidden_tiles' tile budget (a test checks these equal the kernel's constants)
TILE_SHARE, MIN_TILE, MAX_TILE = 0.07, 2**15, 2**24


def hidden_tile_bytes(tokens: int, vocab: int, weight_bytes: int) -> float:
    """Peak bytes of the hidden-state path's tiles: the kernel's tile (elements: TILE_SHARE of the
    [tokens, V] logits' bytes over the per-element cost, clamped) in the head's dtype, its fp32
    copy and one fp32 temporary."""
    per_element = 8 if weight_bytes == 4 else 10
    budget = min(MAX_TILE, max(MIN_TILE, int(TILE_SHARE * tokens * vocab * weight_bytes / per_element)))
    return min(budget, tokens * vocab) * (weight_bytes + 8)


def hidden_path(shape: ModelShape, m: int, positions: int, regime: Regime) -> list[Part]:
    """Log-probs from hidden states (rrhf_kernels.weighted_logprob_sum_from_hidden): no logits;
    pass 3 holds the hidden states at the response positions (fp32 under autocast: accelerate's
    wrapper hands the model's outputs back in fp32), their gradient (made during the forward,
    kept for the backward) with the kernel's [rows, H] chunk buffers, and its tiles over the
    16-bit (or fp32) head."""
    out_bytes = 4 if regime.autocast else regime.residual_bytes
    tokens, H = m * positions, shape.hidden_size
    head_bytes = regime.frozen_bytes if regime.autocast else 4
    rows = min(tokens, 512)  # rrhf_kernels._hidden_tiles.ROW_TARGET tokens per chunk
    return [Part("hidden states (response positions)", tokens * H * out_bytes, "dynamic",
                 f"{m} x {positions} x {H} x {out_bytes} B"),
            Part("their gradient, made in the forward",
                 tokens * H * out_bytes + rows * H * (8 + 2 * head_bytes), "dynamic",
                 "same shape, and a chunk's fp32 accumulator, head-dtype copy and product"),
            Part("log-prob tiles", hidden_tile_bytes(tokens, shape.vocab_size, head_bytes), "dynamic",
                 "head tiles, fp32 copy + temporary")]


def first_batch_checks(shape: ModelShape, s: TrainSettings, regime: Regime) -> list[Part]:
    """The trainer's one-off checks before the first step (no graph): choose_output_head runs one
    candidate (logits at 4 positions, twice), the share_prompt check up to 3 candidates cut after
    CHECK_TOKENS = 8 response tokens; counted as one forward block of the longer of the two."""
    prompt = min(s.prompt_tokens or s.max_length, s.max_length)
    tokens = max(s.max_length, 3 * min(prompt + 8, s.max_length))
    c = regime.compute_bytes
    return [Part("first-batch check forward", tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * c,
                 "dynamic", f"{tokens} tokens, one block, no graph"),
            Part("first-batch check logits", 2 * 4 * shape.vocab_size * 4, "dynamic",
                 "4 positions, twice")]


LOGPROB_PATHS = {"logits": logits_path, "hidden": hidden_path}


def chunk_layout(s: TrainSettings) -> ChunkLayout:
    """How the model runs one chunk of m candidates: m rows of max_length unshared; packed, each
    prompt of the chunk once plus m responses (at worst as long as the responses allow)."""
    m = min(s.micro_batch, s.candidates)
    if not s.share_prompt or s.prompt_tokens is None or s.per_prompt is None:
        return ChunkLayout(m * s.max_length, m, m, 0, 0, s.max_length, False)
    response = min(s.response_tokens or s.max_length, s.max_length)
    # responses as long as max_length allows leave no room for a prompt: m x max_length at worst
    prompt = min(s.prompt_tokens, s.max_length - response)
    # a chunk may straddle two prompts, never more than the batch has
    prompts = min(m, -(-(m - 1) // s.per_prompt) + 1, -(-s.candidates // s.per_prompt))
    return ChunkLayout(prompts * prompt + m * response, prompts, m, prompt, response,
                       s.max_length, True)


def chunk_tokens(s: TrainSettings) -> int:
    """Tokens the model runs for one chunk of candidates (chunk_layout)."""
    return chunk_layout(s).tokens


def forward_inputs_bytes(shape: ModelShape, layout: ChunkLayout, regime: Regime) -> float:
    """What the forward hands every checkpointed block and keeps until the backward: the rotary
    tables (cos and sin in the stream's dtype) and the boolean 4-D mask; packed, also the segment
    layout (the responses' boolean masks, key and query indices) and the position ids."""
    T = layout.tokens
    rotary = 2 * regime.residual_bytes * shape.head_dim * T
    if not layout.packed:
        return rotary + layout.rows * layout.row_tokens**2
    m, P, R = layout.responses, layout.prompt_tokens, layout.response_tokens
    segments = m * R * (P + R) + 8 * m * (P + R) + 9 * m * R + 8 * T
    return rotary + T * T + segments


def no_grad_forward(shape: ModelShape, s: TrainSettings, dt, layout: ChunkLayout, inputs: Part,
                    lora: bool) -> list[Part]:
    """A chunk's forward without a graph: no checkpoints kept, the last block's widest moment."""
    parts = forward_moment(shape, s, dt, layout, lora)
    source = "the last block, no graph" + ("" if lora else ", LoRA off (the base)")
    out = [inputs, Part("residual stream (no graph)", parts["residual stream (no graph)"], "dynamic",
                        "input embeddings, the block's input, the residual after attention"),
           Part("forward activations (no graph)", parts["forward activations (no graph)"],
                "dynamic", source)]
    if parts["LoRA weights, autocast copies"]:
        out.append(Part("LoRA weights, autocast copies", parts["LoRA weights, autocast copies"],
                        "dynamic", "every block's, cached until the forward ends"))
    if parts["dequantised weight"]:
        out.append(Part("dequantised weight", parts["dequantised weight"], "dynamic",
                        "largest block linear, compute dtype"))
    return out


def training_parts(shape: ModelShape, s: TrainSettings, regime: Regime,
                   logprob_path: str = "logits") -> StepPlan:
    """Peak of one training step: the static parts plus the largest of the moments of pass 3
    (and the first-batch checks when asked): the log-prob pass, the last block's recompute and
    the last block's backward (rrhf_lite.plan.block_memory), each over the checkpoints."""
    layout = chunk_layout(s)
    m, T = layout.responses, layout.tokens
    positions = min(s.response_tokens or s.max_length, s.max_length)
    rb, H = regime.residual_bytes, shape.hidden_size
    layers = shape.num_layers
    dt = dtypes_of(regime)
    if s.checkpointing:
        ckpt = Part("checkpointed activations", layers * T * H * rb, "dynamic",
                    f"{layers} block inputs x {T} tokens x {H} x {rb} B"
                    + (" (packed)" if layout.packed else ""))
    else:  # every block keeps what its backward needs
        saved = recompute_moment(shape, s, dt, layout)["recomputed block"]
        ckpt = Part("activations (no checkpointing)", layers * saved, "dynamic", "every block's")
    inputs = Part("rotary tables + attention mask", forward_inputs_bytes(shape, layout, regime),
                  "dynamic", "inputs of every block, kept from the forward")
    held = [ckpt, inputs]
    final_norm = Part("final norm's saved input", final_norm_input_bytes(shape, T), "dynamic",
                      f"{T} x {H} x 4 B (fp32)")
    # during the log-prob forward the last block's output is alive too (under an fp32 stream it
    # is the final norm's saved input itself)
    last_out = rb * H * T if rb != 4 else 0
    in_forward = [replace(ckpt, bytes=ckpt.bytes + last_out,
                          source=ckpt.source + " + the last block's output"), inputs, final_norm]
    if logprob_path == "hidden":
        kernel = [*in_forward, *hidden_path(shape, m, positions, regime)]
        norm_backward = [*held, final_norm, Part(
            "gradients in flight", 5 * 4 * H * T, "dynamic",
            "the final norm's backward: five fp32 [T, H] temporaries")]
        logprob = max(kernel, norm_backward, key=lambda parts: sum(p.bytes for p in parts))
    else:
        logprob = [*in_forward, *logits_path(shape, m, positions, regime)]
    recompute = recompute_moment(shape, s, dt, layout)
    backward = backward_moment(shape, s, dt, layout)
    grad_in = rb * H * T  # the gradient reaching the block's output
    at_recompute = [*held, Part("recomputed block", recompute["recomputed block"], "dynamic",
                                "what the block saves for its backward (block_memory)"),
                    Part("recompute transients", recompute["recompute transients"], "dynamic",
                         "inside down_proj: its input, the MLP input, the residual, and its "
                         "matmul's or LoRA branch's temporaries"),
                    Part("gradients in flight", 2 * grad_in, "dynamic",
                         "the gradient reaching the block, and the engine's second copy")]
    at_backward = [*held, Part("recomputed block", backward["recomputed block"], "dynamic",
                               "saved tensors not yet released"),
                   Part("gradients in flight", backward["gradients in flight"] + grad_in, "dynamic",
                        "down_proj's input gradients and the block output's"),
                   Part("dequantised weight", backward["dequantised weight"], "dynamic",
                        "largest block linear, compute dtype")]
    moments = [("log-prob pass", logprob),
               ("last block's recompute", at_recompute),
               ("last block's backward", [p for p in at_backward if p.bytes]),
               ("no-grad forward (pass 1)", no_grad_forward(shape, s, dt, layout, inputs, True))]
    if s.loss_type in REFERENCE_LOSS_TYPES:
        # before pass 1, the same chunks under no_grad with the adapter disabled; the sums [N]
        # stay for the loss, in every later moment
        moments.append(("reference pass (adapter disabled)",
                        no_grad_forward(shape, s, dt, layout, inputs, False)))
        sums = Part("reference log-prob sums", 4 * s.candidates, "dynamic",
                    f"{s.candidates} candidates x 4 B, kept for the loss")
        moments = [(name, parts if name.startswith("reference") else [*parts, sums])
                   for name, parts in moments]
    if s.first_batch_checks:
        moments.append(("first-batch checks", first_batch_checks(shape, s, regime)))
    phase, dynamic = max(moments, key=lambda item: sum(p.bytes for p in item[1]))
    parts = static_parts(shape, s, regime) + dynamic
    if regime.autocast and regime.device == "cuda":
        dyn = sum(p.bytes for p in dynamic)
        parts += [Part("CUDA context", CUDA_CONTEXT_BYTES, "overhead", "estimate, not allocated"),
                  Part("allocator slack", ALLOCATOR_SLACK * dyn, "overhead",
                       f"{ALLOCATOR_SLACK:.0%} of the dynamic part, an assumption")]
    others = ", ".join(f"the {name} {sum(p.bytes for p in parts) / GiB:.2f} GiB"
                       for name, parts in moments if name != phase)
    notes = [f"log-probs from {'hidden states' if logprob_path == 'hidden' else 'logits'}; "
             f"peak at the {phase}; dynamic memory at {others}"]
    return StepPlan(parts, phase, notes, moments={name: parts for name, parts in moments})
