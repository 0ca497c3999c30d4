"""The memory plan (`rrhf-lite plan`) against one measured training step, part by part.

A random LLaMA with Llama-3-8B's width (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocabulary 128256) but only a few decoder blocks (default 2), loaded in NF4 with LoRA (r 16, all
linear layers, dropout 0.05) by the project's own preparation (e2e_bench.build_random_qlora_model:
prepare_4bit_for_lora + get_peft_model, as load_model_for_training), runs one step of
`RRHFTrainer.training_step` (RRHF, one prompt with k candidates, candidate micro-batches of m,
prompt sharing and the hidden-state log-prob path as the trainer chooses them) under accelerate's
bf16 autocast, as the Trainer runs it. The step before it (same batch) is the warm-up: the
first-batch checks run there and the AdamW states exist from then on.

The profiled step is split into the plan's parts with torch's memory profiler
(benchmarks/_profiled_parts.py says how each tensor is put in a part), at the step's peak and at
the two moments the plan counts (the log-prob pass and the last block's backward) of every chunk
of pass 3; the plan is `rrhf_lite.plan.memory_parts.training_parts` for the same shape, lengths,
micro-batch and dtypes (the CPU regime: bf16 compute, bf16 residual stream, 16-bit embeddings
and head, CPU dropout masks in the input's dtype).

    python benchmarks/plan_by_part.py                    # 8B width, 2 blocks, k 4 x 512 (minutes)
    python benchmarks/plan_by_part.py --quick            # a tiny shape (tests), not written
    python benchmarks/plan_by_part.py --replan FILE      # today's plan against a recorded step

--replan compares the plan as it is now with the measurement a results file recorded (the step
is not run again; the file's rows are replaced and the date of the new comparison added).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Llama-3-8B's published config numbers (e2e_bench.MODEL_CONFIGS["llama3-8b"]), blocks set per run
WIDTHS = {
    "llama3-8b-width": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_attention_heads=32, num_key_value_heads=8),
    "mid": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
                num_key_value_heads=2),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=896, num_attention_heads=4,
                 num_key_value_heads=2),
}
TOLERANCE = 0.05


def model_config(width: str, layers: int):
    from e2e_bench import llama_config

    base = llama_config("llama3-8b").to_dict()
    base.pop("head_dim", None)
    base.update(WIDTHS[width], num_hidden_layers=layers)
    from transformers import LlamaConfig

    return LlamaConfig(**base)


def plan_parts(config, k: int, seq: int, prompt: int, micro: int, share: bool, dtype: str,
               loss: str = "rrhf"):
    from rrhf_lite.plan.memory_parts import Regime, TrainSettings, training_parts
    from rrhf_lite.plan.shapes import shape_from_config

    shape = shape_from_config({**config.to_dict(), "model_type": "llama",
                               "tie_word_embeddings": False}, "random")
    regime = Regime.cpu_qlora(dtype)
    settings = TrainSettings(candidates=k, micro_batch=micro, max_length=seq,
                             response_tokens=seq - prompt, share_prompt=share,
                             prompt_tokens=prompt, per_prompt=k, loss_type=loss)
    return training_parts(shape, settings, regime, "hidden"), regime


def measure(config, k: int, seq: int, prompt: int, micro: int, dtype: str, loss: str = "rrhf") -> dict:
    import _profiled_parts as pp
    import torch
    from e2e_bench import build_random_qlora_model, make_batch, make_trainer, mixed_precision

    from rrhf_lite.models.training_loader import ModelArguments

    name = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    args = ModelArguments(model_name_or_path="<random>", torch_dtype=name,
                          bnb_4bit_compute_dtype=name)
    started = time.perf_counter()
    model = build_random_qlora_model(config, "cpu", args)
    build_s = time.perf_counter() - started
    batch = make_batch(config.vocab_size, k, seq, prompt)
    bf16 = dtype == "bf16"
    trainer = make_trainer(model, micro, bf16, "auto", tempfile.mkdtemp(prefix="rrhf_part_"),
                           loss_type=loss)

    def training_step(batch=batch):
        with mixed_precision(model, bf16) as prepared:
            trainer.training_step(prepared, dict(batch))

    started = time.perf_counter()
    # warm-up on a small batch of the same kind: the first-batch checks decide the log-prob path
    # and prompt sharing, the step leaves gradients and AdamW states (sizes independent of the
    # batch); the gradients stay, as inside an accumulation window (the profiled step is a
    # micro-step that adds to them, as 7 of the 8 of recipes/llama3_8b_qlora_8gb.yaml)
    training_step(make_batch(config.vocab_size, min(k, 2 * micro), prompt + 16, prompt))
    trainer.optimizer.step()
    warm_s = time.perf_counter() - started
    gc.collect()
    started = time.perf_counter()
    profiled = pp.profile_call(training_step)
    step_s = time.perf_counter() - started
    profiled.static = pp.static_storages(model, trainer.optimizer, batch)
    profiled.grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters()
                      if p.grad is not None}
    profiled.lora_weight_bytes = {p.numel() * 2 for n, p in model.named_parameters() if "lora_" in n}
    choices = trainer.forward_choices
    residual = 2 if bf16 else 4
    m = min(micro, k)
    hidden_sizes = {m * (seq - prompt) * config.hidden_size * b for b in (residual, 4)}
    moments = {}
    for label, start, end in [("step peak", -1, -1), *pp.step_windows(profiled)]:
        _, when, live = pp.live_at(profiled, start, end)
        parts = dict(pp.parts_at(profiled, live, hidden_sizes, when))
        moments[label] = {"total": sum(parts.values()), "parts": parts,
                          "categories": dict(pp.categories_at(profiled, live))}
    return {"moments": moments, "forward_choices": choices, "build_s": build_s,
            "warm_step_s": warm_s, "profiled_step_s": step_s,
            "threads": torch.get_num_threads()}


STATIC = ("4-bit weights", "quantisation constants", "embeddings + head", "LoRA parameters",
          "LoRA gradients", "optimizer states")
COLUMNS = ("moment", "part", "plan_mib", "measured_mib", "ratio", "within_5pct")


def compare(plan, measured: dict) -> list[dict]:
    """part | plan | measured | ratio rows: every plan moment against the measured window of the
    same name (the largest over pass 3's chunks), then the step's peak against the plan's."""
    static = {p.name: p.bytes for p in plan.parts if p.phase == "static"}
    rows = []

    def add(moment, plan_parts: dict, got: dict):
        for part in [*plan_parts, *[n for n in got if n not in plan_parts]]:
            want, have = plan_parts.get(part), got.get(part, 0.0)
            ratio = have / want if want else None
            rows.append({"moment": moment, "part": part,
                         "plan_mib": None if want is None else want / 2**20,
                         "measured_mib": have / 2**20, "ratio": ratio,
                         "within_5pct": None if ratio is None else abs(ratio - 1) <= TOLERANCE})
        want, have = sum(plan_parts.values()), sum(got.values())
        rows.append({"moment": moment, "part": "total", "plan_mib": want / 2**20,
                     "measured_mib": have / 2**20, "ratio": have / want,
                     "within_5pct": abs(have / want - 1) <= TOLERANCE})

    for name, parts in plan.moments.items():
        windows = [m for label, m in measured["moments"].items() if label.startswith(name)]
        if not windows:
            continue
        got = dict(max(windows, key=lambda m: m["total"])["parts"])
        if name.startswith(("no-grad", "reference")) and "checkpointed activations" in got:
            # no graph: what outlives a block's call is the residual stream, not checkpoints
            got["residual stream (no graph)"] = got.pop("checkpointed activations")
        add(name, {**static, **{p.name: p.bytes for p in parts}}, got)
    peak = measured["moments"]["step peak"]["parts"]
    add(f"step peak (plan: {plan.peak_phase})", {p.name: p.bytes for p in plan.parts
                                               if p.phase in ("static", "dynamic")}, peak)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", default="llama3-8b-width", choices=sorted(WIDTHS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--loss", default="rrhf", help="train.loss_type (pl_dpo, lipo, dpo_pairs "
                        "add the reference pass)")
    parser.add_argument("--quick", action="store_true", help="tiny width, short candidates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; "
                        "--quick writes only with --out)")
    parser.add_argument("--name", default="plan_by_part")
    parser.add_argument("--replan", default=None, metavar="FILE",
                        help="compare the current plan with the step FILE recorded (no new step)")
    args = parser.parse_args(argv)
    if args.replan:
        return replan(Path(args.replan))
    import torch

    if args.quick:
        args.width, args.seq_len, args.prompt_len = "tiny", 96, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = model_config(args.width, args.layers)
    measured = measure(config, args.k, args.seq_len, args.prompt_len, args.micro_batch, args.dtype,
                       args.loss)
    share = bool(measured["forward_choices"].get("share_prompt"))
    plan, regime = plan_parts(config, args.k, args.seq_len, args.prompt_len, args.micro_batch,
                              share, args.dtype, args.loss)
    rows = compare(plan, measured)
    from _common import print_table, write_result

    print_table(rows, COLUMNS, title=f"plan vs measured by part ({args.width}, {args.layers} blocks, "
                f"k {args.k} x {args.seq_len} tokens, micro-batch {args.micro_batch}, {args.dtype}; "
                "MiB; ratio = measured / plan)")
    counted = [r for r in rows if r["within_5pct"] is not None and r["plan_mib"]]
    off = [r for r in counted if not r["within_5pct"]]
    print(f"{len(counted) - len(off)} of {len(counted)} counted parts and totals within 5 %")
    if args.quick and not args.out:
        return 0
    shape = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads")}
    path = write_result(args.name, {
        "description": "rrhf-lite plan's training-step parts against one profiled "
                       "RRHFTrainer.training_step, part by part (benchmarks/plan_by_part.py)",
        "measurement": "torch.profiler memory profile (profile_memory, record_shapes, with_stack); "
                       "tensors put in plan parts by allocation site (benchmarks/_profiled_parts.py); "
                       "tensors held before the step counted by identity",
        "model": {"width": args.width, **shape, "weights": "random, NF4 + double quant, LoRA r 16 "
                  "all-linear, dropout 0.05, non-reentrant checkpointing"},
        "step": {"k": args.k, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
                 "micro_batch": args.micro_batch, "dtype": args.dtype,
                 "autocast": "cpu bf16 (accelerate's wrappers)" if args.dtype == "bf16" else "none",
                 "loss": args.loss},
        "regime": vars(regime) if hasattr(regime, "__dict__") else str(regime),
        "plan_peak_at": plan.peak_phase, "plan_notes": plan.notes,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "tolerance": TOLERANCE, "rows": rows,
        "measured": {k: v for k, v in measured.items()},
    }, device="cpu", results_dir=args.out)
    print(f"wrote {path}")
    return 0


def replan(path: Path) -> int:
    """Today's plan against the measurement `path` recorded; rewrite its rows (atomically)."""
    import datetime
    import json

    from _common import print_table

    from rrhf_lite.utils.io import atomic_write_text

    record = json.loads(path.read_text())
    model, step = record["model"], record["step"]
    config = model_config(model["width"], model["num_hidden_layers"])
    share = bool(record["measured"]["forward_choices"].get("share_prompt"))
    plan, _ = plan_parts(config, step["k"], step["seq_len"], step["prompt_len"], step["micro_batch"],
                         share, step["dtype"], step.get("loss", "rrhf"))
    rows = compare(plan, record["measured"])
    print_table(rows, COLUMNS, title=f"today's plan vs the step recorded in {path.name} (MiB)")
    record.update(rows=rows, plan_peak_at=plan.peak_phase, plan_notes=plan.notes)
    record.setdefault("replanned", []).append(datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    counted = [r for r in rows if r["within_5pct"] is not None and r["plan_mib"]]
    print(f"{sum(r['within_5pct'] for r in counted)} of {len(counted)} counted parts and totals "
          f"within 5 %; rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
