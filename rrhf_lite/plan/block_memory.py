"""What one checkpointed LLaMA decoder block holds while the backward recomputes it and runs its
own backward: the terms of the training plan's two block moments (rrhf_lite.plan.memory_parts).

Counted from the code that runs, and checked term by term against torch's memory profiler on the
CPU (benchmarks/plan_by_part.py, benchmarks/_profiled_parts.py; docs/memory.md):
- LlamaRMSNorm computes in fp32: under a 16-bit residual stream each norm saves an fp32 copy of
  its input (4 bytes per element, not the stream's 2); under an fp32 stream the input itself.
- peft's LoRA layer casts its input to the LoRA weights' dtype (fp32) unless CUDA autocast is on
  (its check reads CUDA's autocast only): on a GPU under autocast the dropout runs on the 16-bit
  input; on the CPU it runs on an fp32 copy. CUDA's dropout keeps a 1-byte mask; the CPU's keeps
  its noise tensor in the input's dtype. lora_A saves its (dropped-out) input, as the autocast
  copy when that input is not already in the compute dtype; each of q, k, v has its own dropout.
  Autocast also caches a 16-bit copy of every LoRA weight the block uses.
- bitsandbytes' 4-bit matmul saves no input, returns its input's dtype and dequantises its weight
  to the compute dtype for the forward and for the input's gradient; peft clones its output.
- the gated MLP saves gate, silu(gate) and up; while down_proj runs, its input (silu * up), the
  MLP's input and the residual after attention are alive too.
- attention: packed chunks (prompt sharing) run rrhf_lite.training.segment_attention (each
  prompt's block, then each response against its prompt and itself: gathered and, under
  grouped-query attention, repeated keys and values, a float copy of the boolean mask that sdpa
  makes); unpacked rows run transformers' sdpa (keys and values repeated to every head).
The widest moment of the recompute is inside down_proj: its base matmul (the dequantised weight)
or its LoRA branch (the CPU's fp32 copies), whichever is larger; the widest moment of the block's
backward is down_proj's gradient: its LoRA branch (two input-sized gradients in the dropout's
dtype) or its base matmul (a dequantised weight and the input's gradient).
Regimes other than the measured one (a GPU under bf16 or fp16 autocast) follow the same rules,
counted, not yet measured (the GPU suite's recipe item measures the 8B recipe's step).
"""

from __future__ import annotations

from dataclasses import dataclass

from rrhf_lite.plan.shapes import ModelShape

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ChunkLayout:
    """The tokens of one chunk of candidates as the model runs them."""

    tokens: int  # T: all positions of the chunk's rows
    rows: int  # rows the model runs (packed: prompts of the chunk; unpacked: candidates)
    responses: int  # m: candidates in the chunk
    prompt_tokens: int  # P: a prompt's tokens (packed only)
    response_tokens: int  # R: a candidate's response tokens (packed only)
    row_tokens: int  # L: a row's width (unpacked)
    packed: bool


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what a block makes, from the regime (rrhf_lite.plan.memory_parts.Regime)."""

    residual: int  # the residual stream (and what a 4-bit layer returns)
    compute: int
    attention: int  # q, k, v and the attention output (autocast: the compute dtype)
    autocast: bool
    cuda: bool

    @property
    def peft_casts(self) -> bool:
        """peft casts a LoRA layer's input to fp32 unless CUDA autocast is on."""
        return not (self.autocast and self.cuda)

    def lora(self, input_bytes: int, dropout: bool) -> tuple[int, int, int, int]:
        """(dropout's dtype, mask, saved lora_A input, transient) bytes per input element of a
        LoRA layer whose input has `input_bytes`."""
        d = 4 if self.peft_casts else input_bytes
        cast = 4 if self.peft_casts and input_bytes != 4 else 0  # peft's copy, freed after dropout
        mask = (1 if self.cuda else d) if dropout else 0
        if self.autocast and d != self.compute:
            saved, transient = self.compute, cast + (d if dropout else 0)  # autocast copy saved
        else:
            saved, transient = (d if dropout or cast else 0), 0
        return d, mask, saved, transient


def dtypes_of(regime) -> Dtypes:
    return Dtypes(regime.residual_bytes, regime.compute_bytes,
                  regime.compute_bytes if regime.autocast else regime.residual_bytes,
                  regime.autocast, regime.device == "cuda")


def _input_bytes(name: str, dt: Dtypes) -> int:
    return dt.attention if name == "o_proj" else dt.residual


def lora_saved(shape: ModelShape, r: int, targets, dropout: float, dt: Dtypes, tokens: int
               ) -> dict[str, float]:
    """Bytes the block's LoRA layers save (masks, lora_A inputs, lora_A outputs) for `tokens`
    tokens, plus the autocast copies of their weights."""
    linears = shape.block_linears()
    masks = inputs = outputs = weights = 0.0
    shared_input = {}  # no dropout and no copy: lora_A keeps its group's input (counted once)
    for name, (i, o) in linears.items():
        if name not in targets:
            continue
        _, mask, saved, _ = dt.lora(_input_bytes(name, dt), dropout > 0)
        masks += mask * i * tokens
        if saved:
            inputs += saved * i * tokens
        else:
            group = "qkv" if name in ("q_proj", "k_proj", "v_proj") else "gate_up" if name in (
                "gate_proj", "up_proj") else name
            shared_input[group] = _input_bytes(name, dt) * i * tokens
        outputs += r * (dt.compute if dt.autocast else 4) * tokens
        weights += r * (i + o) * dt.compute if dt.autocast else 0
    return {"LoRA dropout masks": masks, "LoRA inputs kept by lora_A": inputs + sum(shared_input.values()),
            "lora_A outputs": outputs, "LoRA weights, autocast copies": weights}


def attention_saved(shape: ModelShape, layout: ChunkLayout, dt: Dtypes) -> float:
    """Bytes attention saves for backward over one chunk (see the module docstring)."""
    a, rb = dt.attention, dt.residual
    Dq, Dkv, heads = shape.q_dim, shape.kv_dim, shape.num_heads
    gqa = shape.num_kv_heads < shape.num_heads
    kv = Dq if gqa else Dkv  # repeated to every query head, or the key/value heads themselves
    T = layout.tokens
    if not layout.packed:
        L, rows = layout.row_tokens, layout.rows
        return (a * Dq * T + 2 * a * kv * T + a * Dq * T + 4 * heads * T  # q, k, v, out, lse
                + a * rows * L * L)  # sdpa's float copy of the boolean mask
    P, m, R, prompts = layout.prompt_tokens, layout.responses, layout.response_tokens, layout.rows
    prompt_rows = prompts * P
    q_kept = rb * Dq * T if a == rb else a * Dq * prompt_rows  # the roped q under the prompt slice
    prompt_kv = 2 * a * kv * prompt_rows if gqa else 2 * rb * Dkv * T  # repeated, or views of k, v
    response = (a * Dq * m * R  # gathered queries
                + 2 * a * kv * m * (P + R)  # gathered (and repeated) keys and values
                + a * Dq * m * R + 8 * m * R  # the valid responses' outputs, gathered, and their index
                + a * m * R * (P + R))  # the float copy of the boolean response mask
    prompt_mask = a * prompts * P * P if prompts > 1 else 0  # one prompt: causal, no mask
    outputs = a * Dq * (prompt_rows + m * R) + 4 * heads * (prompt_rows + m * R)
    return q_kept + prompt_kv + response + prompt_mask + outputs


def norm_saved(shape: ModelShape, dt: Dtypes, tokens: int) -> float:
    """The two norms' saved inputs: fp32 copies under a 16-bit stream (the first norm's input is
    the checkpoint itself under an fp32 one) and their rsqrt statistics."""
    copies = 2 * 4 * shape.hidden_size if dt.residual != 4 else 4 * shape.hidden_size
    return (copies + 8) * tokens


def block_saved(shape: ModelShape, s, dt: Dtypes, layout: ChunkLayout) -> dict[str, float]:
    """Everything the recomputed block saves for its backward, by term (bytes over the chunk)."""
    T = layout.tokens
    terms = {"norms' fp32 inputs": norm_saved(shape, dt, T),
             "attention": attention_saved(shape, layout, dt),
             "MLP (gate, silu, up)": 3 * dt.residual * shape.intermediate_size * T}
    terms.update(lora_saved(shape, s.lora_r, set(s.lora_targets), s.lora_dropout, dt, T))
    return terms


def _down_lora(shape: ModelShape, s, dt: Dtypes, T: int) -> tuple[float, float, int]:
    """(saved, transient bytes, dropout dtype) of down_proj's LoRA branch over the chunk."""
    if "down_proj" not in s.lora_targets:
        return 0.0, 0.0, dt.residual
    d, mask, saved, transient = dt.lora(dt.residual, s.lora_dropout > 0)
    return (mask + saved) * shape.intermediate_size * T, transient * shape.intermediate_size * T, d


def recompute_moment(shape: ModelShape, s, dt: Dtypes, layout: ChunkLayout) -> dict[str, float]:
    """The widest moment of the recompute, inside down_proj: {"recomputed block": saved tensors
    made so far, "recompute transients": down_proj's input, the MLP's input, the residual, and
    either its base matmul's dequantised weight and output or its LoRA branch's copies}."""
    T, H, I = layout.tokens, shape.hidden_size, shape.intermediate_size  # noqa: E741
    saved = sum(block_saved(shape, s, dt, layout).values())
    lora_saved_down, lora_transient, _ = _down_lora(shape, s, dt, T)
    rb = dt.residual
    common = rb * I * T + rb * H * T + (rb * H * T if rb != 4 else 0)  # silu*up, MLP input, residual
    base = max(i * o for i, o in shape.block_linears().values()) * dt.compute + rb * H * T
    lora = rb * H * T + lora_transient  # peft's clone of the base output, the branch's copies
    if base > lora + lora_saved_down:  # the base matmul, before the LoRA branch saved anything
        return {"recomputed block": saved - lora_saved_down, "recompute transients": common + base}
    return {"recomputed block": saved, "recompute transients": common + lora}


def backward_moment(shape: ModelShape, s, dt: Dtypes, layout: ChunkLayout) -> dict[str, float]:
    """The widest moment of the block's backward, around down_proj. Autograd runs the nodes made
    last first, so down_proj's LoRA branch goes before its base matmul. The larger of: the LoRA
    branch's gradient (two input-sized gradients in the dropout's dtype; lora_A's input
    released); then, the branch done (its mask and lora_A input released), the base matmul's
    (the branch's input gradient, the matmul's own and a dequantised weight; up_proj's backward
    after it holds as much). {"recomputed block": saved tensors not yet released, "gradients in
    flight", "dequantised weight"}; the block output's gradient is the caller's."""
    T, I = layout.tokens, shape.intermediate_size  # noqa: E741
    saved = sum(block_saved(shape, s, dt, layout).values())
    on_down = "down_proj" in s.lora_targets
    d, mask, kept, _ = dt.lora(dt.residual, s.lora_dropout > 0)
    dequant = max(i * o for i, o in shape.block_linears().values()) * dt.compute
    rb = dt.residual
    branch = (saved - kept * I * T, 2 * d * I * T, 0.0)
    base = (saved - (mask + kept) * I * T, 2 * rb * I * T, dequant)
    block, grads, weight = max(branch, base, key=sum) if on_down else (saved, rb * I * T, dequant)
    return {"recomputed block": block, "gradients in flight": grads, "dequantised weight": weight}


def forward_moment(shape: ModelShape, s, dt: Dtypes, layout: ChunkLayout, lora: bool = True
                   ) -> dict[str, float]:
    """The widest moment of the last block run without a graph (pass 1 scores every chunk so;
    the DPO family's reference pass too, with the adapter disabled: `lora` False).
    The residual stream: the input embeddings (the model keeps its variable), the block's input
    and the residual after attention. Inside the MLP, besides its input, the largest of: up_proj's
    matmul (silu(gate), a dequantised weight, the output), the product silu(gate) * up with both
    factors, down_proj's base matmul (the product, a dequantised weight, its output), its LoRA
    branch (the product, the base output's clone, peft's copy and the dropout's noise and output,
    or then the autocast copy: nothing is saved, the noise goes when the dropout returns).
    Autocast keeps a 16-bit copy of every LoRA weight it cast until the forward ends: every
    block's so far."""
    T, H, I = layout.tokens, shape.hidden_size, shape.intermediate_size  # noqa: E741
    rb = dt.residual
    dequant = max(i * o for i, o in shape.block_linears().values()) * dt.compute
    stream = (3 if shape.num_layers > 1 else 2) * rb * H * T
    branch = 0.0
    if lora and "down_proj" in s.lora_targets:
        d = 4 if dt.peft_casts else rb
        cast = 4 if dt.peft_casts and rb != 4 else 0
        dropout = s.lora_dropout > 0
        noise = ((1 if dt.cuda else d) + d) if dropout else 0  # the noise (mask) and the output
        copy = dt.compute if dt.autocast and d != dt.compute else 0
        branch = rb * I * T + rb * H * T + (cast + max(noise, (d if dropout else 0) + copy)) * I * T
    linears = shape.block_linears()

    def cast_weights(done: tuple[str, ...]) -> float:
        """LoRA weights autocast has cast by then: every earlier block's, this block's `done`."""
        if not (lora and dt.autocast):
            return 0.0
        per = {n: s.lora_r * (i + o) * dt.compute for n, (i, o) in linears.items() if n in s.lora_targets}
        return (shape.num_layers - 1) * sum(per.values()) + sum(per.get(n, 0) for n in done)

    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    # (activations, dequantised weight, LoRA weights cast so far) at each candidate moment
    moments = [(2 * rb * I * T, dequant, cast_weights((*attn, "gate_proj"))),  # up_proj's matmul
               (3 * rb * I * T, 0.0, cast_weights((*attn, "gate_proj", "up_proj"))),  # silu * up
               (rb * I * T + rb * H * T, dequant, cast_weights((*attn, "gate_proj", "up_proj"))),
               (branch, 0.0, cast_weights((*attn, "gate_proj", "up_proj")))]  # down's LoRA branch
    inside, weight, weights = max(moments, key=sum)
    return {"residual stream (no graph)": stream,
            "forward activations (no graph)": rb * H * T + inside,  # + the MLP's input
            "LoRA weights, autocast copies": weights, "dequantised weight": weight}
