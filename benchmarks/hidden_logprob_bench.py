"""Benchmark: candidate log-probs straight from hidden states vs from [N, T, V] logits.

Two tables, each path run side by side in this process on the same inputs:

- ``op``: the head plus the log-prob reduction, forward + backward of sum_n g_n * S_n w.r.t.
  the hidden states (the head's weight frozen, as under LoRA): what one candidate micro-batch
  costs in the trainer's third pass. Paths: ``logits`` (F.linear, then
  rrhf_kernels.candidate_logprob_sums, the current trainer path), ``hidden_fused``
  (weighted_logprob_sum_from_hidden: gradients made during the forward, the new third pass) and
  ``hidden_autograd`` (candidate_logprob_sums_from_hidden + backward). Peak extra memory beyond
  the inputs (the gradient of the hidden states included) is measured in a fresh process per
  path (CPU: VmHWM after resetting it through /proc/self/clear_refs; CUDA:
  max_memory_allocated) and given in units of one logits buffer (N x T x V in the dtype).
- ``step``: one RRHFTrainer.training_step (micro-batched, LoRA) on a small random LLaMA with the
  given vocabulary, ``logprob_path="logits"`` vs ``"hidden"``, median wall time.

Usage::

    python benchmarks/hidden_logprob_bench.py          # CPU: V = 49152 and 128256
    python benchmarks/hidden_logprob_bench.py --dry    # tiny shapes, no result file (smoke test)
    python benchmarks/hidden_logprob_bench.py --device cuda --dtype bf16 --tokens 8x1024 --hidden 4096

Function API (benchmarks/gpu_suite): ``run_op_bench(shapes, dtype_name, device)`` and
``run_step_bench(vocabs, device)`` return table rows.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence

import torch
import torch.nn.functional as F

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

import rrhf_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OP_PATHS = ("logits", "hidden_fused", "hidden_autograd")
OP_COLUMNS = ["path", "shape", "dtype", "ms", "speed_vs_logits", "peak_extra_mb",
              "peak_extra_vs_logits", "max_abs_err_vs_logits"]
STEP_COLUMNS = ["path", "vocab", "model", "ms", "speed_vs_logits", "loss"]


def make_inputs(shape, dtype, device, seed=0):
    """hidden [N, T, H], weight [V, H], labels [N, T], coefficients [N]. As the trainer passes
    them: the shared prompt already trimmed (first position only), one shorter candidate."""
    n, t, h, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, :1] = -100
    labels[-1, t // 2:] = -100  # one shorter candidate
    return hidden, weight, labels.to(device), torch.randn(n, generator=gen).to(device)


def run_path(path, hidden, weight, labels, coef):
    """(sums, d/d hidden of sum(coef * sums)) on one path."""
    h = hidden.detach().requires_grad_(True)
    if path == "logits":
        logits = F.linear(h, weight)
        sums, _ = rrhf_kernels.candidate_logprob_sums(logits, labels)
        del logits
        (grad,) = torch.autograd.grad((sums * coef.to(sums.dtype)).sum(), h)
    elif path == "hidden_fused":
        total, sums, _ = rrhf_kernels.weighted_logprob_sum_from_hidden(h, weight, labels, coef)
        (grad,) = torch.autograd.grad(total, h)
    else:
        sums, _ = rrhf_kernels.candidate_logprob_sums_from_hidden(h, weight, labels)
        (grad,) = torch.autograd.grad((sums * coef.to(sums.dtype)).sum(), h)
    return sums.detach(), grad


def _memory_case(path, shape, dtype_name, device):
    """In this (fresh) process: peak extra bytes of one run of `path` beyond its inputs."""
    run_path(path, *make_inputs((2, 4, 8, 64), DTYPES[dtype_name], device))  # libraries' one-off set-up
    inputs = make_inputs(shape, DTYPES[dtype_name], device)
    _, mem = peak_extra_memory(lambda: run_path(path, *inputs), device)
    return mem


def _peak_extra(path, shape, dtype_name, device):
    return in_fresh_process(__file__, {"path": path, "shape": list(shape), "dtype": dtype_name,
                                       "device": device, "threads": torch.get_num_threads()},
                            drop_env=["TRITON_INTERPRET"])


def run_op_bench(shapes, dtype_name="fp32", device="cpu", repeat=3, measure_memory=True):
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape, DTYPES[dtype_name], device)
        n, t, _, v = shape
        logits_bytes = n * t * v * DTYPES[dtype_name].itemsize
        base_ms = base_sums = None
        for path in OP_PATHS:
            sums, _ = run_path(path, *inputs)
            timing = time_fn(lambda path=path, inputs=inputs: run_path(path, *inputs), warmup=0,
                             repeat=repeat, device=device)
            if path == "logits":
                base_ms, base_sums = timing["ms"], sums
            row = {"path": path, "shape": "x".join(map(str, shape)), "dtype": dtype_name,
                   "ms": timing["ms"], "ms_min": timing["ms_min"],
                   "speed_vs_logits": base_ms / timing["ms"],
                   "max_abs_err_vs_logits": (sums.double() - base_sums.double()).abs().max().item(),
                   "logits_mb": logits_bytes / 2**20}
            if measure_memory:
                mem = _peak_extra(path, shape, dtype_name, device)
                extra = mem.pop("peak_extra_bytes")
                row["peak_extra_mb"] = None if extra is None else extra / 2**20
                row["peak_extra_vs_logits"] = None if extra is None else extra / logits_bytes
                row["memory_method"] = mem["memory_method"]
            rows.append(row)
            print_table([row], OP_COLUMNS)
        del inputs
        gc.collect()
    return rows


def check_against_reference(shape, dtype_name="fp32", device="cpu", backend="auto"):
    """The fused op (gradients made in the forward) against the float64 reference: a row with
    the largest errors as fractions of the test tolerances (<= 1 passes)."""
    from rrhf_kernels.tolerances import GRAD_ATOL, GRAD_RTOL, HIDDEN_LOWP_RTOL, SCORE_RTOL

    hidden, weight, labels, coef = make_inputs(shape, DTYPES[dtype_name], device, seed=1)
    h = hidden.detach().requires_grad_(True)
    total, sums, _ = rrhf_kernels.weighted_logprob_sum_from_hidden(h, weight, labels, coef,
                                                                   backend=backend)
    (grad,) = torch.autograd.grad(total, h)
    ref_h = hidden.detach().requires_grad_(True)
    logits = F.linear(ref_h, weight).double()  # rounded as the model's head rounds it
    ref, counts = rrhf_kernels.reference_logprob_sums(logits, labels)
    (ref_grad,) = torch.autograd.grad((ref * coef.double()).sum(), ref_h)
    dtype = DTYPES[dtype_name]
    sum_err = (sums.double() - ref).abs()
    grad_err = (grad.double() - ref_grad.double()).abs()
    if dtype in HIDDEN_LOWP_RTOL:
        sum_tol = HIDDEN_LOWP_RTOL[dtype] * ref.abs().max().clamp(min=1e-3)
        grad_tol = HIDDEN_LOWP_RTOL[dtype] * ref_grad.double().abs().max().clamp(min=1e-3)
    else:
        sum_tol = SCORE_RTOL[dtype] * ref.abs() + 1e-5 * counts.clamp(min=1)
        grad_tol = GRAD_RTOL[dtype] * ref_grad.double().abs() + GRAD_ATOL
    sum_frac, grad_frac = float((sum_err / sum_tol).max()), float((grad_err / grad_tol).max())
    return {"name": f"hidden {dtype_name} {'x'.join(map(str, shape))}", "max_sum_err": float(sum_err.max()),
            "sum_err_vs_tol": sum_frac, "max_grad_err": float(grad_err.max()),
            "grad_err_vs_tol": grad_frac, "passed": sum_frac <= 1 and grad_frac <= 1}


def _step_trainer(vocab, path, device, out_dir, hidden_size, layers, k, length):
    from peft import LoraConfig, get_peft_model

    from rrhf_lite.builtin.tiny.models import make_tiny_causal_lm
    from rrhf_lite.data.tokenization import RRHFCollator
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    model = make_tiny_causal_lm(seed=0, vocab_size=vocab, hidden_size=hidden_size,
                                intermediate_size=hidden_size * 3, num_layers=layers,
                                num_heads=4, num_kv_heads=2).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": torch.randint(3, vocab, (length // 4,), generator=gen).tolist(),
             "responses_ids": [torch.randint(3, vocab, (length - i * (length // 16),), generator=gen).tolist()
                               for i in range(k)],
             "scores": [float(i % 3) for i in range(k)]} for _ in range(2)]
    args = RRHFConfig(output_dir=str(out_dir), per_device_train_batch_size=2, logprob_path=path,
                      candidate_micro_batch_size=2, max_length=2 * length, max_prompt_length=length,
                      report_to="none", use_cpu=device == "cpu", disable_tqdm=True)
    trainer = RRHFTrainer(model=model, args=args, train_dataset=rows, data_collator=RRHFCollator(0))
    return trainer, next(iter(trainer.get_train_dataloader()))


def run_step_bench(vocabs, device="cpu", repeat=3, hidden_size=256, layers=2, k=4, length=128,
                   out_dir="/tmp/hidden_logprob_bench"):
    rows = []
    for vocab in vocabs:
        trainers = {p: _step_trainer(vocab, p, device, out_dir, hidden_size, layers, k, length)
                    for p in ("logits", "hidden")}
        base = None
        for path, (trainer, batch) in trainers.items():
            trainer.create_optimizer_and_scheduler(num_training_steps=1)

            def step(trainer=trainer, batch=batch):
                trainer.model.zero_grad(set_to_none=True)
                return trainer.training_step(trainer.model, dict(batch))

            loss = float(step())
            timing = time_fn(step, warmup=0, repeat=repeat, device=device)
            base = base or timing["ms"]
            rows.append({"path": path, "vocab": vocab, "ms": timing["ms"], "ms_min": timing["ms_min"],
                         "speed_vs_logits": base / timing["ms"], "loss": loss,
                         "model": f"llama h={hidden_size} L={layers}, k={k} x {length} tok, micro 2"})
            print_table(rows[-1:], STEP_COLUMNS)
        del trainers
        gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes, write no result file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--tokens", default="2x256", help="N x T of the op table")
    parser.add_argument("--hidden", type=int, default=576, help="H of the op table (SmolLM2: 576)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1, as the test suite: on a busy shared "
                             "CPU each op's thread-pool synchronisation stalls, which punishes the "
                             "tiled path's many ops more than the logits path's few)")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step table")
    add_memory_case_option(parser)
    args = parser.parse_args(argv)
    # internal: one memory measurement in this fresh process
    if answer_memory_case(args, lambda case: _memory_case(case["path"], tuple(case["shape"]),
                                                          case["dtype"], case["device"])):
        return 0
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    n, t = (int(x) for x in args.tokens.lower().split("x"))
    vocabs = [97, 300] if args.dry else args.vocabs
    shapes = [(2, 8, 16, v) for v in vocabs] if args.dry else [(n, t, args.hidden, v) for v in vocabs]
    repeat = 1 if args.dry else args.repeat
    op_rows = run_op_bench(shapes, args.dtype, args.device, repeat)
    step_rows = [] if args.no_step else run_step_bench(
        vocabs, args.device, repeat, **({"hidden_size": 32, "length": 16} if args.dry else {}))
    print()
    print_table(op_rows, OP_COLUMNS, title=f"head + log-prob sums, fwd+bwd, {args.device}")
    if step_rows:
        print_table(step_rows, STEP_COLUMNS, title=f"one RRHF training step, {args.device}")
    if not args.dry:
        path = write_result("hidden_logprob_bench", {
            "device": args.device, "dtype": args.dtype, "shapes": [list(s) for s in shapes],
            "repeat": repeat, "threads": torch.get_num_threads(), "op_rows": op_rows,
            "step_rows": step_rows,
            "method": "wall-clock median, paths side by side in one process; memory per row",
        }, device=args.device)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
