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

from dataclasses import dataclass, field

from rrhf_lite.plan.shapes import ModelShape

GiB = 2**30
BLOCK = 64  # bitsandbytes 4-bit block size
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS workspace: an estimate, not counted
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on the dynamic part: an assumption
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "adafactor": 0}


@dataclass(frozen=True)
class Regime:
    """The dtypes of a step. GPU: bf16/fp16 compute under autocast; CPU: fp32 throughout.

    compute_bytes: activations of the 4-bit matmuls and attention. residual_bytes: the residual
    stream (fp32 once prepare_model_for_kbit_training has up-cast embeddings and norms).
    lora_input_bytes: what a LoRA A matrix saves of its (dropped-out) input: fp32 without
    autocast, the autocast copy otherwise.
    """

    compute_bytes: int = 2
    residual_bytes: int = 4
    lora_input_bytes: int = 2
    logits_bytes: int = 4  # logits as the log-prob kernel sees them (accelerate returns fp32)
    autocast: bool = True
    frozen_bytes: int = 4  # embeddings and head: fp32 after peft's up-cast, 2 when kept 16-bit

    @classmethod
    def qlora(cls, half: str = "bf16") -> Regime:
        """The trainer's QLoRA dtypes since issue 30 (training_loader.kbit_precision_plan):
        embeddings and head stay 16-bit; the residual stream follows bf16 compute, and stays
        fp32 (norms up-cast) under fp16."""
        return cls(2, 2 if half == "bf16" else 4, 2, 4, True, 2)

    @classmethod
    def cpu(cls) -> Regime:
        return cls(4, 4, 4, 4, False)

    @classmethod
    def gpu(cls, compute_bytes: int = 2) -> Regime:
        return cls(compute_bytes, 4, 2, 4, True)


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
    """(packed 4-bit weights, quantisation constants) of every decoder-block linear layer."""
    weights = shape.num_layers * shape.block_params()
    blocks = weights / BLOCK
    consts = blocks * (1 + 4 / 256) if double_quant else blocks * 4
    return weights / 2, consts


def lora_params(shape: ModelShape, r: int, targets) -> int:
    linears = shape.block_linears()
    return shape.num_layers * sum(r * (i + o) for name, (i, o) in linears.items() if name in targets)


def static_parts(shape: ModelShape, s: TrainSettings, regime: Regime) -> list[Part]:
    parts = []
    if s.load_in_4bit:
        w, c = quantised_bytes(shape, s.double_quant)
        parts += [Part("4-bit weights", w, "static", "0.5 byte per block weight"),
                  Part("quantisation constants", c, "static",
                       "absmax per 64 weights: uint8 + fp32 per 256 blocks" if s.double_quant
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


def block_saved_bytes_per_token(shape: ModelShape, s: TrainSettings, regime: Regime) -> float:
    """Bytes one decoder block saves for backward, per token (LLaMA block, LoRA on `targets`).

    Counted from what autograd keeps: bitsandbytes' MatMul4Bit keeps only the packed weight
    (never its input); each LoRA layer keeps its dropout mask (1 byte) and lora_A's input (the
    dropped-out copy; without dropout and autocast the layer's input itself, shared); the second
    norm keeps its fp32 input (the residual after attention; the block's own input is the
    checkpoint); RoPE keeps only cos/sin; attention (flash / memory-efficient kernels) keeps q,
    k, v, its output and the log-sum-exp; the MLP keeps gate, silu(gate) and up.
    """
    H, I, Dq, Dkv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim  # noqa: E741
    c, rb = regime.compute_bytes, regime.residual_bytes
    mlp_dtype = rb  # a 4-bit layer returns its input's dtype: fp32 after the up-cast norm
    targets = set(s.lora_targets)
    widths = {n: io[0] for n, io in shape.block_linears().items()}
    if s.lora_dropout > 0 or regime.autocast:
        mask = 1 if s.lora_dropout > 0 else 0
        lora = sum((mask + regime.lora_input_bytes) * widths[n] for n in targets if n in widths)
    else:  # lora_A keeps the shared input of its group: norm outputs, attention output, product
        groups = [({"q_proj", "k_proj", "v_proj"}, rb * H), ({"gate_proj", "up_proj"}, rb * H),
                  ({"o_proj"}, c * Dq), ({"down_proj"}, mlp_dtype * I)]
        lora = sum(size for names, size in groups if names & targets)
    attn = c * (2 * Dq + 2 * Dkv) + 4 * shape.num_heads  # q, k, v, out + lse
    return rb * H + attn + 3 * mlp_dtype * I + lora + 8  # + 2 rsqrt statistics


def block_backward_transient_per_token(shape: ModelShape, regime: Regime) -> float:
    """Gradients alive inside one block's backward: the incoming and outgoing residual
    gradients plus the MLP's three intermediate gradients (the widest moment)."""
    rb = regime.residual_bytes
    return 2 * rb * shape.hidden_size + 3 * rb * shape.intermediate_size


def dequantised_weight_bytes(shape: ModelShape, regime: Regime) -> float:
    """bitsandbytes multiplies a 4-bit layer by dequantising it to the compute dtype first."""
    return max(i * o for i, o in shape.block_linears().values()) * regime.compute_bytes


def logits_path(shape: ModelShape, m: int, positions: int, regime: Regime) -> list[Part]:
    """Today's log-prob path: logits [m, positions, V], kept for the kernel's backward, and
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
    pass 3 holds the hidden states at the response positions, their gradient (made during the
    forward, kept for the backward) and the kernel's tiles over the 16-bit (or fp32) head."""
    rb, tokens = regime.residual_bytes, m * positions
    head_bytes = regime.frozen_bytes if regime.autocast else 4
    return [Part("hidden states (response positions)", tokens * shape.hidden_size * rb, "dynamic",
                 f"{m} x {positions} x {shape.hidden_size} x {rb} B"),
            Part("their gradient, made in the forward", tokens * shape.hidden_size * rb, "dynamic",
                 "same shape"),
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


def chunk_tokens(s: TrainSettings) -> int:
    """Tokens the model runs for one chunk of m candidates: m x max_length unshared; packed, each
    prompt of the chunk once plus m responses (at worst as long as the responses allow)."""
    m = min(s.micro_batch, s.candidates)
    if not s.share_prompt or s.prompt_tokens is None or s.per_prompt is None:
        return m * s.max_length
    response = min(s.response_tokens or s.max_length, s.max_length)
    prompt = min(s.prompt_tokens, s.max_length - response) if response < s.max_length else 1
    # a chunk may straddle two prompts, never more than the batch has
    prompts = min(m, -(-(m - 1) // s.per_prompt) + 1, -(-s.candidates // s.per_prompt))
    return min(m * s.max_length, prompts * prompt + m * response)


def training_parts(shape: ModelShape, s: TrainSettings, regime: Regime,
                   logprob_path: str = "logits") -> StepPlan:
    """Peak of one training step: the static parts plus the larger of two moments of pass 3,
    the log-prob backward (all checkpoints + logits buffers) and the last block's backward
    (all checkpoints + the recomputed block + gradients in flight + a dequantised weight)."""
    m = min(s.micro_batch, s.candidates)
    T = chunk_tokens(s)
    positions = min(s.response_tokens or s.max_length, s.max_length)
    rb = regime.residual_bytes
    layers = shape.num_layers
    ckpt_tensors = layers + 1 if s.checkpointing else 1
    ckpt = Part("checkpointed activations", ckpt_tensors * T * shape.hidden_size * rb, "dynamic",
                f"({layers} + 1) x {T} tokens x {shape.hidden_size} x {rb} B"
                + (" (packed)" if T < m * s.max_length else ""))
    block_saved = block_saved_bytes_per_token(shape, s, regime) * T
    if not s.checkpointing:  # every block keeps its activations
        ckpt = Part("activations (no checkpointing)", layers * block_saved, "dynamic", "")
    block = [Part("recomputed block", block_saved, "dynamic", "saved tensors of one block"),
             Part("gradients in flight", block_backward_transient_per_token(shape, regime) * T,
                  "dynamic", "residual and MLP gradients"),
             Part("dequantised weight", dequantised_weight_bytes(shape, regime), "dynamic",
                  "largest block linear, compute dtype")]
    logits = LOGPROB_PATHS[logprob_path](shape, m, positions, regime)
    hidden_grad = Part("hidden-state gradient", T * shape.hidden_size * rb, "dynamic",
                       "gradient reaching the last block")
    at_logits = [ckpt, *logits]
    at_block = [ckpt, *block, hidden_grad]
    moments = [("log-prob backward", at_logits), ("last block's backward", at_block)]
    if s.first_batch_checks:
        moments.append(("first-batch checks", first_batch_checks(shape, s, regime)))
    phase, dynamic = max(moments, key=lambda item: sum(p.bytes for p in item[1]))
    parts = static_parts(shape, s, regime) + dynamic
    if regime.autocast:
        dyn = sum(p.bytes for p in dynamic)
        parts += [Part("CUDA context", CUDA_CONTEXT_BYTES, "overhead", "estimate, not allocated"),
                  Part("allocator slack", ALLOCATOR_SLACK * dyn, "overhead",
                       f"{ALLOCATOR_SLACK:.0%} of the dynamic part, an assumption")]
    others = ", ".join(f"the {name} {sum(p.bytes for p in parts) / GiB:.2f} GiB"
                       for name, parts in moments if name != phase)
    notes = [f"log-probs from {'hidden states' if logprob_path == 'hidden' else 'logits'}; "
             f"peak at the {phase}; dynamic memory at {others}"]
    return StepPlan(parts, phase, notes)
