"""The memory plan of the stages other than training: sample, score, evaluate (on the card) and
merge (on the host). Counted from what each stage loads and runs, not measured (the GPU suite
measures the training step).

- sample: the 4-bit policy, the KV cache of every sequence a generator keeps (prompts x beams
  or returned samples, prompt + new tokens), one prefill block and the last-token logits.
- score: the reward model as stored, plus one forward of a scoring batch.
- evaluate (rrhf_lite.stages.evaluate), the largest of its moments: the held-out candidates
  (sampled from the initial model and scored, as the two stages above); per variant, the 4-bit
  policy with its adapter answering greedily; the answers scored while that policy stays
  loaded (reward model and policy at once); the policy's own scores of the held-out candidates
  (logits of a micro-batch, no graph); the perplexity of every variant's answers under one
  fixed LM, by default the initial model unquantised.
- merge: runs on the CPU (rrhf_lite.stages.merge, device "cpu"): host memory, the base in the
  merge dtype with the adapter, then the merged model reloaded for the check and the 4-bit
  policy for the policy check.
"""

from __future__ import annotations

from rrhf_lite.errors import UserInputError
from rrhf_lite.plan.memory_parts import (
    CUDA_CONTEXT_BYTES,
    Part,
    Regime,
    StepPlan,
    dequantised_weight_bytes,
    lora_params,
    quantised_bytes,
)
from rrhf_lite.plan.shapes import KNOWN_SHAPES, ModelShape, resolve_shape

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


def policy_weight_parts(shape: ModelShape, double_quant: bool) -> list[Part]:
    w, c = quantised_bytes(shape, double_quant)
    return [Part("4-bit weights + constants", w + c, "static", "as in training"),
            Part("embeddings + head", shape.embedding_params() * 2, "static", "16-bit")]


def _context() -> Part:
    return Part("CUDA context", CUDA_CONTEXT_BYTES, "overhead", "estimate, not allocated")


def _generation_parts(shape: ModelShape, regime: Regime, seqs: int, prompt: int, new: int,
                      what: str) -> list[Part]:
    c = regime.compute_bytes
    kv = 2 * shape.num_layers * seqs * (prompt + new) * shape.kv_dim * c
    prefill = seqs * prompt
    return [Part("KV cache", kv, "dynamic", f"{seqs} sequences x {prompt + new} tokens, {what}"),
            Part("prefill block", prefill * (4 * shape.hidden_size + 3 * shape.intermediate_size) * c,
                 "dynamic", f"{prefill} prompt tokens, one block"),
            Part("dequantised weight", dequantised_weight_bytes(shape, regime), "dynamic", ""),
            # last-token logits, processed scores, log-softmax
            Part("next-token logits", 3 * seqs * shape.vocab_size * 4, "dynamic", "fp32, three copies")]


def sampling_plan(recipe, shape: ModelShape, regime: Regime, *, force: bool = False
                  ) -> StepPlan | None:
    """The largest generator's peak (policy or initial model; others have their own shapes)."""
    if "sample" not in recipe.stages and not force:
        return None
    s = recipe.sampling
    best: StepPlan | None = None
    for g in s.generators:
        if g.model not in ("policy", "initial"):
            continue  # another model: its shape is not the policy's
        per_prompt = g.num_candidates if g.method in ("top_p", "greedy") else (
            g.num_beams or g.num_candidates)
        seqs = s.batch_size * per_prompt
        parts = policy_weight_parts(shape, recipe.quantization.double_quant) + _generation_parts(
            shape, regime, seqs, recipe.sampling_prompt_length, s.max_new_tokens, g.method) + [
            _context()]
        plan = StepPlan(parts, f"sampling ({g.method}, {seqs} sequences)")
        if best is None or plan.allocated > best.allocated:
            best = plan
    return best


def reward_shape(recipe) -> ModelShape | None:
    name = recipe.scoring.reward_model
    if not name:
        return None
    if recipe.scoring.reward_format == "gptj_value_head" and name not in KNOWN_SHAPES:
        name = recipe.scoring.reward_base  # a raw checkpoint has no config.json: its base's
    return resolve_shape(name)


def reward_parts(recipe, shape: ModelShape) -> list[Part]:
    sc = recipe.scoring
    tokens = sc.batch_size * sc.max_length
    attention = sc.batch_size * shape.num_heads * sc.max_length**2 * shape.weight_bytes
    attention *= 3 if shape.family == "encoder" else 1  # DeBERTa: content + two position terms
    return [Part("reward model weights", shape.total_params() * shape.weight_bytes, "static",
                 shape.source),
            Part("reward forward activations", tokens * (4 * shape.hidden_size + 2 * shape.intermediate_size)
                 * shape.weight_bytes, "dynamic", f"{sc.batch_size} x {sc.max_length} tokens"),
            Part("attention scores", attention, "dynamic", "eager attention, one layer")]


def scoring_plan(recipe, regime: Regime, *, force: bool = False) -> StepPlan | None:
    shape = reward_shape(recipe)
    if ("score" not in recipe.stages and not force) or shape is None:
        return None
    return StepPlan([*reward_parts(recipe, shape), _context()], "scoring")


def _adapter_part(recipe, shape: ModelShape) -> Part:
    targets = recipe.lora.target_modules
    names = tuple(shape.block_linears()) if targets == "all-linear" else tuple(
        [targets] if isinstance(targets, str) else targets)
    n = lora_params(shape, recipe.lora.r, names)
    return Part("LoRA adapter", n * 4, "static", f"{n / 1e6:.1f} M params, fp32")


def _logits_part(shape: ModelShape, rows: int, positions: int, regime: Regime, what: str) -> Part:
    return Part("logits (no graph)", rows * positions * shape.vocab_size * regime.compute_bytes,
                "dynamic", f"{rows} x {positions} x {shape.vocab_size}, {what}")


def _dtype_bytes(name: str, where: str) -> int:
    """Bytes per weight of a load dtype ("auto": 16-bit on a GPU)."""
    if name in (None, "auto"):
        return 2
    if name not in _DTYPE_BYTES:
        raise UserInputError(f"unknown dtype {name!r}", where=where, hint="bfloat16, float16 or float32")
    return _DTYPE_BYTES[name]


def evaluate_plan(recipe, shape: ModelShape, regime: Regime) -> StepPlan | None:
    """The evaluate stage's largest moment (module docstring); its others in the notes."""
    if "evaluate" not in recipe.stages:
        return None
    ev, train = recipe.evaluate, recipe.train
    policy = policy_weight_parts(shape, recipe.quantization.double_quant) + [_adapter_part(recipe, shape)]
    prompt = recipe.sampling_prompt_length  # evaluation prompts are not cut: planned as sampled
    moments: list[tuple[str, list[Part]]] = []
    candidates = sampling_plan(recipe, shape, regime, force=True)
    if candidates is not None and not ev.ranking_candidates and (ev.best_of_n or ev.ranking_accuracy):
        moments.append(("held-out candidates from the initial model", candidates.parts))
    answers = _generation_parts(shape, regime, ev.batch_size, prompt, ev.max_new_tokens, "greedy")
    moments.append((f"greedy answers ({ev.batch_size} prompts)", [*policy, *answers, _context()]))
    rm = reward_shape(recipe)
    if rm is not None:
        moments.append(("answers scored, the policy still loaded",
                        [*policy, *reward_parts(recipe, rm), _context()]))
    micro = train.candidate_micro_batch_size or 8
    own = min(train.max_length, recipe.sampling.max_new_tokens + 1)
    if ev.ranking_accuracy:
        moments.append(("the policy's own scores of the held-out candidates",
                        [*policy, _logits_part(shape, micro, own, regime, "response positions"),
                         _context()]))
    ppl_name = ev.perplexity_model or recipe.model.name_or_path
    try:
        ppl = resolve_shape(ppl_name)
    except UserInputError:
        ppl = None
    if ppl is not None:
        wb = _dtype_bytes(recipe.model.torch_dtype, "model.torch_dtype")
        moments.append((f"perplexity under {ppl_name}, unquantised", [
            Part("perplexity model weights", ppl.total_params() * wb, "static",
                 f"{ppl.total_params() / 1e9:.2f} B params x {wb} B, unquantised ({ppl.source})"),
            _logits_part(ppl, 8, ev.max_new_tokens + 1, regime, "8 answers per forward"),
            _context()]))
    name, parts = max(moments, key=lambda m: sum(p.bytes for p in m[1] if p.phase != "overhead"))
    notes = [f"{other}: {sum(p.bytes for p in ps if p.phase != 'overhead') / 2**30:.2f} GiB "
             "allocated" for other, ps in moments if other != name]
    if ppl is None:
        notes.append(f"perplexity under {ppl_name}: not counted (no shape known for it)")
    notes.append("evaluation prompts are not cut: planned at the sampling prompt length")
    return StepPlan(parts, name, notes)


def merge_plan(recipe, shape: ModelShape) -> StepPlan | None:
    """Host memory of the merge (it runs on the CPU): the base in the merge dtype with the
    adapter; the merged model reloaded for the check; the 4-bit policy for the policy check."""
    if "merge" not in recipe.stages:
        return None
    wb = _dtype_bytes(recipe.merge.torch_dtype, "merge.torch_dtype")
    base = shape.total_params() * wb
    largest = max(i * o for i, o in shape.block_linears().values())
    parts = [Part("base in the merge dtype", base, "static",
                  f"{shape.total_params() / 1e9:.2f} B params x {wb} B ({recipe.merge.torch_dtype})"),
             _adapter_part(recipe, shape)]
    if recipe.merge.roundtrip_nf4 and recipe.quantization.load_in_4bit:
        parts.append(Part("NF4 round trip of one weight", largest * (0.5 + wb + 4), "dynamic",
                          "packed, restored and an fp32 copy of the largest block linear"))
    policy = sum(p.bytes for p in policy_weight_parts(shape, recipe.quantization.double_quant))
    notes = [f"then the merged model reloaded for the check ({base / 2**30:.2f} GiB) and the "
             f"4-bit policy for the policy check ({policy / 2**30:.2f} GiB), one at a time",
             "host memory, not the card: the pipeline merges on the CPU"]
    return StepPlan(parts, "merging on the CPU", notes, where="host")
