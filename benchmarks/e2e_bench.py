"""End-to-end RRHF training step: rrhf-lite's micro-batched step vs the reference code's step.

One step = forward + backward of the RRHF loss (rank + SFT on the best candidate) for one prompt
with k candidates, then an AdamW update of the LoRA weights. The model is the project's QLoRA
setup: NF4 base (double quantisation, bf16 compute on CUDA), LoRA r=16 on all linear layers,
non-reentrant gradient checkpointing, randomly initialised from a real model's config (no
download: LLaMA-2-7B, V = 32000; Llama-3-8B, V = 128256).

Variants, all on the same model and the same batch:

``reference``     all k candidates in one forward, full logits [k, L, V], float32 log_softmax +
                  gather + mask (the reference code's loss computation, with the paper's length
                  normalisation rather than its padded-length bug), rank + SFT loss.
``rrhf-lite mb=m`` ``RRHFTrainer.training_step`` with ``candidate_micro_batch_size=m``: only
                  response logits are computed, the Triton kernel (CUDA) or the chunked torch
                  backend (CPU) gives the per-candidate sums, and for m < k the exact two-pass
                  micro-batched backward runs.

Per variant: one warm-up step, then the mean of ``--steps`` timed steps; peak memory is
``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (None on CPU).

Building a random 8B NF4 model without a checkpoint: the model is created on the meta device,
every linear layer inside the decoder blocks becomes a ``bnb.nn.Linear4bit`` whose random bf16
weight is made on the GPU and quantised at once (one layer's weight in bf16 at a time, never the
whole model), and embeddings, norms, lm_head and rotary buffers are materialised directly. Then
the same preparation as ``rrhf_lite.models.training_loader.load_model_for_training`` runs
(``prepare_4bit_for_lora`` with non-reentrant checkpointing, then ``get_peft_model`` with
``lora_config_from_args``). A missing-weights checkpoint does not work for this:
transformers leaves missing 4-bit weights unquantised.

Run alone: ``python benchmarks/e2e_bench.py --models llama3-8b`` (CUDA) or ``--dry`` (tiny
configs on CPU); ``benchmarks/gpu_suite.py`` calls :func:`run_e2e`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Real shapes (from the models' published configs); the dry shapes keep the same structure.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    # Dry (CPU) stand-ins: same blocks, tiny widths; the vocabulary ratio of the two is kept.
    "tiny-llama2": dict(vocab_size=320, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0),
    "tiny-llama3": dict(vocab_size=1283, hidden_size=64, intermediate_size=160,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0),
}


def llama_config(name: str):
    from transformers import LlamaConfig

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    # pad/bos/eos ids are irrelevant to a step on random token ids; keep them small and valid.
    return LlamaConfig(**MODEL_CONFIGS[name], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False)


# --------------------------------------------------------------------------- model


def _quantised_linear(linear: torch.nn.Linear, device: torch.device, compute_dtype: torch.dtype,
                      weight_dtype: torch.dtype, std: float, quant_type: str, double_quant: bool):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, quant_storage=torch.uint8, device="meta")
    weight = torch.empty(linear.out_features, linear.in_features, dtype=weight_dtype, device=device)
    weight.normal_(0.0, std)
    # Params4bit.to(device) quantises an unquantised tensor: the bf16 copy is freed right after.
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=torch.uint8,
                                     module=layer).to(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=weight_dtype,
                                                    device=device), requires_grad=False)
    return layer


def build_random_qlora_model(config, device: str | torch.device, model_args=None, seed: int = 0):
    """A randomly initialised NF4 + LoRA causal LM, prepared for training like the real loader.

    ``model_args``: a ``rrhf_lite.models.training_loader.ModelArguments`` (defaults: NF4, double quant, LoRA
    r=16 alpha 32 dropout 0.05 on all linear layers, gradient checkpointing). Returns the
    PeftModel in train mode on ``device``.
    """
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from rrhf_lite.models.cpu_4bit import configure_for_training
    from rrhf_lite.models.training_loader import (
        ModelArguments,
        lora_config_from_args,
        prepare_4bit_for_lora,
    )
    from rrhf_lite.utils.precision import parse_dtype

    args = model_args or ModelArguments(model_name_or_path="<random>")
    device = torch.device(device)
    weight_dtype = parse_dtype(args.torch_dtype, device=device.type)
    compute_dtype = parse_dtype(args.bnb_4bit_compute_dtype, device=device.type)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    std = config.initializer_range
    # transformers' bnb quantiser converts every nn.Linear except the output embedding.
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _quantised_linear(
                        child, device, compute_dtype, weight_dtype, std,
                        args.bnb_4bit_quant_type, args.bnb_4bit_use_double_quant))
    _materialise_rest(model, device, weight_dtype, std)
    _mark_quantised(model, args, compute_dtype)
    model.config.use_cache = False
    # the loader's own k-bit preparation (16-bit embeddings and head under bf16 compute), not
    # peft's fp32 up-cast, so what is measured is what training runs
    model = prepare_4bit_for_lora(model, compute_dtype, precision=args.kbit_precision,
                                  gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, lora_config_from_args(args))
    configure_for_training(model)  # as the real loader: never bitsandbytes' packed CPU layout
    model.train()
    return model


def _mark_quantised(model, args, compute_dtype: torch.dtype) -> None:
    """The attributes from_pretrained sets on a bnb-4bit model: peft reads is_loaded_in_4bit,
    HF Trainer reads quantization_method (no .to()) and hf_quantizer (training allowed)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=torch.uint8)
    model.hf_quantizer = AutoHfQuantizer.from_config(config)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.is_loaded_in_4bit = True


def _materialise_rest(model, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Give every parameter still on the meta device real values; rebuild the rotary buffers."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            if "norm" in f"{module_name}.{name}":
                value.fill_(1.0)
            else:
                value.normal_(0.0, std)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    rotary_owner = model.model
    with torch.device(device):
        rotary_owner.rotary_emb = type(rotary_owner.rotary_emb)(config=model.config)
    left = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    left += [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"still on the meta device after materialising: {left[:5]}")


# --------------------------------------------------------------------------- batch


def make_batch(vocab_size: int, k: int, seq_len: int, prompt_len: int, seed: int = 0) -> dict:
    """One prompt with k full-length candidates (random ids), collated by rrhf-lite's collator."""
    from rrhf_lite.data.tokenization import RRHFCollator

    if not 0 < prompt_len < seq_len:
        raise ValueError(f"need 0 < prompt_len < seq_len, got {prompt_len}, {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    low = 3  # skip pad/bos/eos ids
    prompt = torch.randint(low, vocab_size, (prompt_len,), generator=gen).tolist()
    responses = [torch.randint(low, vocab_size, (seq_len - prompt_len,), generator=gen).tolist()
                 for _ in range(k)]
    scores = [float((j * 7) % k) for j in range(k)]  # distinct rewards: k(k-1)/2 rank pairs
    feature = {"prompt_ids": prompt, "responses_ids": responses, "scores": scores}
    return RRHFCollator(pad_token_id=0)([feature])


def _grid(values: torch.Tensor, batch: dict) -> torch.Tensor:
    B, K = batch["rewards"].shape
    return values.new_zeros(B * K).index_copy(0, batch["candidate_index"], values).view(B, K)


# --------------------------------------------------------------------------- steps


def reference_code_loss(model, batch: dict) -> torch.Tensor:
    """All candidates in one forward; full float32 log_softmax over [k, L, V]; rank + SFT loss.

    Mirrors how the RRHF reference code computes scores (full logits, log_softmax copy, gather,
    mask), with the paper's per-candidate length (the reference's padded-length bug would only
    change a divisor, not the memory or time).
    """
    from rrhf_kernels import reference_logprob_sums
    from rrhf_lite.training.losses import rrhf_loss

    device = next(p for p in model.parameters() if p.requires_grad).device
    ids, mask, labels = (batch[key].to(device) for key in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits  # [k, L, V]
    sums, counts = reference_logprob_sums(logits[:, :-1], labels[:, 1:],
                                          compute_dtype=torch.float32)
    counts_f = counts.float().clamp(min=1)
    loss, _ = rrhf_loss(_grid(sums / counts_f, batch), _grid(sums, batch),
                        _grid(counts_f, batch), batch["rewards"].to(device),
                        batch["candidate_mask"].to(device))
    return loss


def reference_code_step(model, batch: dict) -> float:
    """Forward + backward of :func:`reference_code_loss`; returns the loss."""
    loss = reference_code_loss(model, batch)
    loss.backward()
    return float(loss.detach())


def loss_agreement(model, batch: dict, bf16: bool, backend: str) -> dict[str, float]:
    """Both variants' loss on the same weights, without dropout: they must be the same number
    (else the comparison would not be of the same objective)."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.eval()
    try:
        with torch.no_grad(), mixed_precision(model, bf16) as prepared:
            ref = float(reference_code_loss(prepared, batch))
            trainer = make_trainer(model, len(batch["input_ids"]), bf16, backend,
                                   tempfile.mkdtemp(prefix="rrhf_e2e_"))
            ours = float(trainer.compute_loss(prepared, {k: v.to(device) for k, v in batch.items()}))
    finally:
        model.train()
    return {"reference_loss": ref, "rrhf_lite_loss": ours, "loss_abs_diff": abs(ref - ours)}


@contextlib.contextmanager
def mixed_precision(model, bf16: bool):
    """The model as HF Trainer runs it under bf16: forward inside autocast, its outputs handed
    back in fp32 (accelerate's two wrappers, as Accelerator.prepare_model puts them). Undone on
    exit, so every variant sees the same model. Wrapped here rather than by prepare_model and
    extract_model_from_parallel: after one such round trip a second prepare_model leaves the
    forward without autocast (accelerate 1.x), so every step after the first ran in fp32."""
    if not bf16:
        yield model
        return
    from accelerate.utils import convert_outputs_to_fp32

    device = next(p for p in model.parameters()).device.type
    had_own = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = convert_outputs_to_fp32(torch.autocast(device, dtype=torch.bfloat16)(model.forward))
    try:
        yield model
    finally:
        if had_own:
            model.forward = saved
        else:
            del model.forward


def make_trainer(model, micro_batch: int, bf16: bool, backend: str, output_dir: str, **config_kw):
    """An RRHFTrainer over `model` (a PeftModel), ready for `training_step` calls; `config_kw`
    go to RRHFConfig (e.g. loss_type)."""
    from rrhf_lite.data.tokenization import RRHFCollator
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    config = RRHFConfig(output_dir=output_dir, candidate_micro_batch_size=micro_batch,
                        per_device_train_batch_size=1, learning_rate=1e-4, bf16=bf16,
                        logprob_backend=backend, save_strategy="no", report_to="none",
                        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                        **config_kw)
    # Tokenised features need no tokenizer (the collator is given); the steps get their batch
    # directly, this one-row dataset only satisfies the constructor.
    dummy = [{"prompt_ids": [3], "responses_ids": [[4], [5]], "scores": [0.0, 1.0]}]
    trainer = RRHFTrainer(model=model, args=config, train_dataset=dummy,
                          data_collator=RRHFCollator(0))
    trainer.create_optimizer()
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    return trainer


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(step: Callable[[], float], device: torch.device, steps: int) -> dict[str, Any]:
    """Warm-up step, then `steps` timed steps; peak memory over all of them."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    losses = [step()]  # warm-up: optimizer states, Triton/cuBLAS autotuning
    _sync(device)
    times = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = _peak_gb(device)
    reserved = (torch.cuda.max_memory_reserved(device) / 2**30) if device.type == "cuda" else None
    return {"step_s": sum(times) / len(times), "step_s_min": min(times), "steps": len(times),
            "peak_memory_gb": peak, "peak_reserved_gb": reserved, "model_memory_gb": before,
            "loss": losses[-1], "loss_finite": all(math.isfinite(x) for x in losses)}


def run_e2e(model_name: str, *, device: str = "cuda", k: int = 4, seq_len: int = 512,
            prompt_len: int = 64, micro_batches: tuple[int, ...] = (1, 2), steps: int = 3,
            include_full_kernel: bool = True, backend: str = "auto", bf16: bool | None = None,
            on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Build the model, run every variant, return one row per variant.

    Variants: the reference step, then RRHFTrainer.training_step with candidate micro-batch k
    (if include_full_kernel) and each of `micro_batches`. Rows: model, variant, micro_batch, k,
    seq_len, vocab, peak_memory_gb, peak_reserved_gb, model_memory_gb, step_s, step_s_min,
    steps, loss, loss_finite, build_s, autocast, reference_loss / rrhf_lite_loss /
    loss_abs_diff (both losses on the fresh weights, no dropout), status ("ok", "oom" or
    "error: ..."), and
    memory_vs_reference / speedup_vs_reference once the reference is known. ``on_row`` gets
    each row as soon as it is measured (so a caller can save partial results). ``bf16``: run
    under accelerate's bf16 mixed precision as HF Trainer does (default: on CUDA with bf16).
    """
    dev = torch.device(device)
    config = llama_config(model_name)
    start = time.perf_counter()
    model = build_random_qlora_model(config, dev)
    build_s = time.perf_counter() - start
    batch = make_batch(config.vocab_size, k, seq_len, prompt_len)
    if bf16 is None:
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = bool(bf16)
    base = {"model": model_name, "k": k, "seq_len": seq_len, "vocab": config.vocab_size,
            "build_s": build_s, "autocast": "bf16" if use_bf16 else None}
    try:
        base.update(loss_agreement(model, batch, use_bf16, backend))
    except Exception as err:  # noqa: BLE001 - a sanity check must not cost the measurements
        base.update(loss_abs_diff=None, loss_agreement_error=f"{type(err).__name__}: {err}"[:300])

    def reference_variant(prepared):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = reference_code_step(prepared, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def trainer_variant(mb: int):
        def make(prepared):
            trainer = make_trainer(model, mb, use_bf16, backend,
                                   tempfile.mkdtemp(prefix="rrhf_e2e_"))

            def step():
                loss = trainer.training_step(prepared, dict(batch))
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
                return float(loss)

            return step

        return make

    variants: list[tuple[str, int, Callable]] = [
        ("reference (k at once, fp32 log_softmax)", k, reference_variant)]
    mbs = sorted(set(micro_batches) | ({k} if include_full_kernel else set()), reverse=True)
    variants += [(f"rrhf-lite mb={mb}", mb, trainer_variant(mb)) for mb in mbs]
    rows: list[dict[str, Any]] = []
    try:
        for name, mb, make_step in variants:
            row = {**base, "variant": name, "micro_batch": mb}
            try:
                with mixed_precision(model, use_bf16) as prepared:
                    row.update(measure_step(make_step(prepared), dev, steps))
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError as err:
                row.update(status="oom", error=str(err).splitlines()[0][:300])
            except Exception as err:  # noqa: BLE001 - recorded, the next variant still runs
                row.update(status=f"error: {type(err).__name__}", error=str(err)[:500])
            finally:
                model.zero_grad(set_to_none=True)
            rows.append(row)
            _add_ratios(rows)
            if on_row is not None:
                on_row(row)
    finally:
        model = None  # release it (the variant closures share this cell)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    ref = next((r for r in rows if r["variant"].startswith("reference") and r.get("status") == "ok"),
               None)
    for row in rows:
        if ref is None or row.get("status") != "ok":
            continue
        if row.get("peak_memory_gb") and ref.get("peak_memory_gb"):
            row["memory_vs_reference"] = row["peak_memory_gb"] / ref["peak_memory_gb"]
        if row.get("step_s") and ref.get("step_s"):
            row["speedup_vs_reference"] = ref["step_s"] / row["step_s"]


E2E_COLUMNS = ("model", "variant", "peak_memory_gb", "memory_vs_reference", "step_s",
               "speedup_vs_reference", "model_memory_gb", "loss", "status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="model shapes (default: llama3-8b llama2-7b; --dry: tiny ones)")
    parser.add_argument("--dry", action="store_true", help="tiny configs on CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import print_table, write_result

    device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        torch.set_num_threads(1)  # a shared CPU: more threads mostly wait on each other
    models = args.models or (["tiny-llama3", "tiny-llama2"] if args.dry
                             else ["llama3-8b", "llama2-7b"])
    shape = dict(k=4, seq_len=32, prompt_len=8) if args.dry else dict(k=4, seq_len=512, prompt_len=64)
    rows = []
    for name in models:
        rows += run_e2e(name, device=device, steps=args.steps, **shape)
    print_table(rows, E2E_COLUMNS, title=f"RRHF step, k={shape['k']} x {shape['seq_len']} tokens")
    path = write_result("e2e", {"e2e": rows}, device=device, results_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
