"""Benchmark: one RRHF training step with each prompt run once for its k candidates (packed rows,
share_prompt true) vs every candidate row repeating its prompt (share_prompt false).

A random LLaMA of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
vocab 49152, tied embeddings) with LoRA r 8 on q_proj and v_proj, gradient checkpointing on (the
recipe default), one prompt per step, all candidates in one chunk (candidate_micro_batch_size
None, the default) unless --micro. Per shape (prompt P, response R, k):
- ms: RRHFTrainer.training_step wall time, median of --repeat; both modes in this process,
  their repeats interleaved (unshared, shared, unshared, ...) so that a busy shared CPU slows
  both alike; cpu_ms: the process's CPU time over the same steps (with one thread, the work
  itself: robust to other jobs taking the cores, which wall time is not);
- peak_extra_mb: peak memory of one step beyond what the process held before it (CPU: the
  first step of a fresh process per mode, after the trainer's one-off decisions, VmHWM after resetting it through /proc/self/clear_refs; CUDA: in this
  process, max_memory_allocated after reset_peak_memory_stats);
- tokens: what the model runs (unshared k(P + R); packed P + kR, plus padding);
- loss_diff: |loss shared - loss unshared| on the same batch (same numbers expected).

Usage::

    python benchmarks/shared_prompt_bench.py           # CPU fp32: 200/100/k6, 30/30/k2, 30/30/k4
    python benchmarks/shared_prompt_bench.py --dry     # tiny model and shapes, no result file
    python benchmarks/shared_prompt_bench.py --device cuda --attn sdpa

Function API (benchmarks/gpu_suite): ``run_shared_bench(shapes, device, ...)`` returns rows;
``check_exactness(device, attn)`` one row comparing packed and unshared sums and gradients.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Sequence

import torch

try:
    from benchmarks._common import print_table, time_fn, write_result
    from benchmarks._memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )
except ImportError:  # run as a script: this folder is on sys.path
    from _common import print_table, time_fn, write_result
    from _memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )

SHAPES = ((200, 100, 6), (30, 30, 2), (30, 30, 4))  # (prompt, response, k): HH-like, then short
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_layers": 30,
           "num_heads": 9, "num_kv_heads": 3, "tie_word_embeddings": True,
           "max_position_embeddings": 2048}
TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
        "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 256}
COLUMNS = ["mode", "shape", "tokens", "ms", "speed_vs_unshared", "cpu_ms", "cpu_speed_vs_unshared",
           "peak_extra_mb",
           "memory_vs_unshared", "loss_diff"]
MODES = ("unshared", "shared")


def build(shape, share, device="cpu", attn="sdpa", dry=False, micro=None, checkpointing=True,
          out_dir="/tmp/shared_prompt_bench"):
    """(trainer, batch) for one mode: the same model weights and batch for both modes."""
    from peft import LoraConfig, get_peft_model

    from rrhf_lite.builtin.tiny.models import make_tiny_causal_lm
    from rrhf_lite.data.tokenization import RRHFCollator
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    config = dict(TINY if dry else SMOLLM2)
    tied = config.pop("tie_word_embeddings", False)
    model = make_tiny_causal_lm(seed=0, attn_implementation=attn, **config).to(device)
    if tied:  # as SmolLM2: the head is the input embedding
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    model.train()
    prompt, response, k = shape
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": [1] + torch.randint(3, vocab, (prompt - 1,), generator=gen).tolist(),
             "responses_ids": [torch.randint(3, vocab, (response - 1,), generator=gen).tolist() + [2]
                               for _ in range(k)],
             "scores": [float(i) for i in range(k)]}]
    args = RRHFConfig(output_dir=str(out_dir), per_device_train_batch_size=1, share_prompt=share,
                      candidate_micro_batch_size=micro, max_length=prompt + response,
                      max_prompt_length=prompt, report_to="none", use_cpu=device == "cpu",
                      disable_tqdm=True, save_strategy="no")
    trainer = RRHFTrainer(model=model, args=args, train_dataset=rows, data_collator=RRHFCollator(0))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def step(trainer, batch) -> float:
    trainer.model.zero_grad(set_to_none=True)
    return float(trainer.training_step(trainer.model, dict(batch)))


def memory_case(shape, share, device, **kw) -> dict:
    """In this (fresh) process: peak memory of its first step beyond what was held before it."""
    trainer, batch = build(shape, share, device, **kw)
    # the trainer's one-off decisions (small forwards) before the measure, not a whole step: a
    # warm-up step would leave its freed memory in the process and hide the next step's peak
    inputs = trainer._prepare_inputs(dict(batch))
    trainer._output_head(trainer.model, inputs)
    trainer._share_prompt(trainer.model, inputs)
    _, mem = peak_extra_memory(lambda: step(trainer, batch), device)
    return mem


def _peak_extra(shape, share, device, **kw) -> dict:
    return in_fresh_process(__file__, {"shape": list(shape), "share": share, "device": device,
                                       "threads": torch.get_num_threads(), **kw})


def _cuda_peak_extra(trainer, batch) -> dict:
    _, mem = peak_extra_memory(lambda: step(trainer, batch), "cuda")
    return {**mem, "memory_method": mem["memory_method"] + ", in process"}


def _tokens(trainer, batch, share) -> int:
    if not share:
        return int(batch["input_ids"].numel())
    from rrhf_lite.training.shared_prompt import pack_chunk

    groups = trainer._prompt_groups(batch)
    return pack_chunk(batch["input_ids"], batch["attention_mask"], batch["labels"], groups).tokens


def run_shared_bench(shapes=SHAPES, device="cpu", repeat=3, attn="sdpa", dry=False, micro=None,
                     checkpointing=True, measure_memory=True) -> list[dict]:
    """Rows (unshared, shared) per shape: time, memory, tokens and loss difference."""
    kw = {"attn": attn, "dry": dry, "micro": micro, "checkpointing": checkpointing}
    rows = []
    for shape in shapes:
        built = {mode: build(shape, mode == "shared", device, **kw) for mode in MODES}
        losses = {mode: step(*built[mode]) for mode in MODES}  # warm-up, and the exactness check
        assert (built["shared"][0].forward_choices["share_prompt"] is True
                and built["unshared"][0].forward_choices["share_prompt"] is False)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu_times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(repeat):
            for mode in MODES:
                started = time.process_time()
                times[mode].append(time_fn(lambda pair=built[mode]: step(*pair), warmup=0, repeat=1,
                                           device=device)["ms"])
                cpu_times[mode].append((time.process_time() - started) * 1e3)
        label = "P{} R{} k{}".format(*shape)
        shape_rows = []
        for mode in MODES:
            ms = sorted(times[mode])[len(times[mode]) // 2]
            row = {"mode": mode, "shape": label, "tokens": _tokens(*built[mode], mode == "shared"),
                   "ms": ms, "ms_min": min(times[mode]), "ms_all": times[mode],
                   "cpu_ms": statistics.median(cpu_times[mode]), "cpu_ms_all": cpu_times[mode],
                   "loss": losses[mode], "loss_diff": abs(losses[mode] - losses["unshared"]),
                   "attn": attn, "micro": micro, "checkpointing": checkpointing}
            if measure_memory:  # CUDA: in this process (the peak counter resets per step)
                mem = (_cuda_peak_extra(*built[mode]) if device.startswith("cuda")
                       else _peak_extra(shape, mode == "shared", device, **kw))
                extra = mem.pop("peak_extra_bytes")
                row["peak_extra_mb"] = None if extra is None else extra / 2**20
                row["memory_method"] = mem["memory_method"]
            shape_rows.append(row)
        base = shape_rows[0]
        for row in shape_rows:
            row["speed_vs_unshared"] = base["ms"] / row["ms"]
            row["cpu_speed_vs_unshared"] = base["cpu_ms"] / row["cpu_ms"]
            if base.get("peak_extra_mb") and row.get("peak_extra_mb") is not None:
                row["memory_vs_unshared"] = row["peak_extra_mb"] / base["peak_extra_mb"]
        print_table(shape_rows, COLUMNS)
        rows += shape_rows
        del built
        gc.collect()
    return rows


def check_exactness(device="cpu", attn="sdpa", tolerance=1e-5) -> dict:
    """Packed vs unshared rows on a small random fp32 LLaMA (k = 3, 1, 2, one-token and
    truncated responses): per-candidate log-prob sums and every parameter's gradient of
    sum_i w_i S_i. Passed when each error is <= tolerance x max(1, |reference|)."""
    from rrhf_lite.builtin.tiny.models import make_tiny_causal_lm
    from rrhf_lite.data.tokenization import RRHFCollator
    from rrhf_lite.training.logprobs import chunk_logprob_sums
    from rrhf_lite.training.segment_attention import use_segments

    base = attn.removeprefix("segments-")  # "segments-sdpa": rrhf_lite.training.segment_attention over sdpa
    model = make_tiny_causal_lm(seed=0, hidden_size=64, intermediate_size=128, num_heads=4,
                                num_kv_heads=2, attn_implementation=base).to(device)
    if attn != base and not use_segments(model.config):
        raise ValueError(f"segment attention cannot stand in for {base!r}")
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=gen).tolist()

    features = [{"prompt_ids": ids(9), "responses_ids": [ids(6) + [2], [2], ids(11)], "scores": [0.0] * 3},
                {"prompt_ids": ids(4), "responses_ids": [ids(3) + [2]], "scores": [0.0]},
                {"prompt_ids": [1] + ids(20), "responses_ids": [ids(7) + [2], ids(2)], "scores": [0.0] * 2}]
    batch = RRHFCollator(0)(features)
    args = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
    groups = (batch["candidate_index"] // batch["rewards"].shape[1]).to(device)
    weights = torch.linspace(-1.0, 2.0, len(args[0]), device=device)
    out = {}
    for mode, g in (("unshared", None), ("shared", groups)):
        model.zero_grad(set_to_none=True)
        sums, _ = chunk_logprob_sums(model, *args, backend="torch", groups=g)
        (weights * sums).sum().backward()
        out[mode] = (sums.detach().double(), [p.grad.double() for p in model.parameters()])
    (ref, ref_grads), (got, grads) = out["unshared"], out["shared"]
    sum_err = float(((got - ref).abs() / ref.abs().clamp(min=1)).max())
    grad_err = max(float(((g - r).abs() / r.abs().max().clamp(min=1)).max())
                   for g, r in zip(grads, ref_grads, strict=True))
    return {"name": f"shared prompt exactness {attn} fp32", "device": device, "attn": attn,
            "max_sum_err": sum_err, "max_grad_err": grad_err, "tolerance": tolerance,
            "passed": sum_err <= tolerance and grad_err <= tolerance}


def _shape(text: str) -> tuple[int, int, int]:
    prompt, response, k = (int(x) for x in text.lower().replace("x", ",").split(","))
    return prompt, response, k


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny model and shapes, write no result file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=None,
                        help="prompt,response,k triples (default 200,100,6 30,30,2 30,30,4)")
    parser.add_argument("--micro", type=int, default=None, help="candidate_micro_batch_size")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: on a busy shared CPU the process's "
                             "CPU time then measures the work, free of thread-pool waits)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    add_memory_case_option(parser)
    args = parser.parse_args(argv)

    def measure(case: dict) -> dict:  # internal: one memory measurement in this fresh process
        shape, share, device = tuple(case.pop("shape")), case.pop("share"), case.pop("device")
        return memory_case(shape, share, device, **case)

    if answer_memory_case(args, measure):
        return 0
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    shapes = args.shapes or ([(6, 5, 3), (4, 3, 2)] if args.dry else list(SHAPES))
    repeat = 1 if args.dry else args.repeat
    rows = run_shared_bench(shapes, args.device, repeat, args.attn, args.dry, args.micro,
                            not args.no_checkpointing, measure_memory=not args.no_memory)
    print()
    title = (f"one RRHF training step, shared prompt vs unshared, {args.device}, {args.attn}, "
             f"{'tiny' if args.dry else 'SmolLM2-135M shape'} fp32")
    print_table(rows, COLUMNS, title=title)
    if not args.dry:
        path = write_result("shared_prompt_bench", {
            "device": args.device, "dtype": "fp32", "attn": args.attn, "shapes": [list(s) for s in shapes],
            "model": SMOLLM2, "lora": "r 8 on q_proj, v_proj", "micro": args.micro,
            "checkpointing": not args.no_checkpointing, "repeat": repeat,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows,
            "method": "training_step wall-clock median, modes interleaved in one process; "
                      "memory in a fresh process per row",
        }, device=args.device)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
