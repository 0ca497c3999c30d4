"""Peak memory and speed of one RRHF training step vs k: micro-batch 2 against all at once.

Each configuration runs in a fresh subprocess (honest RSS: no allocator state carried over),
with a small LLaMA (4-bit NF4 base + LoRA, gradient checkpointing) on CPU. For every step we
sample the resident set size (RSS) from /proc every millisecond and record the peak above the
RSS just before the step; big tensors are mmap-ed (MALLOC_MMAP_THRESHOLD_) so freed memory
really leaves the process and the next step starts from the same floor.

    python benchmarks/train_memory_bench.py            # k in 2 4 8 16, writes results JSON
    python benchmarks/train_memory_bench.py --ks 2 4 --steps 2

The goal (issue 3): with micro-batching the step's peak memory stays flat in k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

try:
    from benchmarks._common import environment_info, print_table, write_result
except ImportError:
    from _common import environment_info, print_table, write_result

MODEL = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
             vocab_size=8192)  # a wide vocabulary: logits are where RRHF memory goes
PROMPT_CHARS, RESPONSE_CHARS = 32, 96


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def child(k: int, micro: int | None, steps: int, threads: int) -> dict:
    import gc
    import random

    import torch

    torch.set_num_threads(threads)
    from rrhf_lite.builtin.tiny import save_tiny_causal_lm
    from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = [{"prompt": "".join(rng.choice(letters) for _ in range(PROMPT_CHARS)),
             "responses": ["".join(rng.choice(letters) for _ in range(RESPONSE_CHARS - 8 * (i % 3)))
                           for i in range(k)],
             "scores": [float(rng.randint(0, 4)) for _ in range(k)]}]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_causal_lm(f"{tmp}/m", seed=0, **MODEL)
        model, tok = load_model_for_training(ModelArguments(model_dir, lora_r=16, lora_dropout=0.0))
        config = RRHFConfig(output_dir=f"{tmp}/out", per_device_train_batch_size=1,
                            candidate_micro_batch_size=micro, logprob_backend="torch",
                            max_length=256, max_prompt_length=64, report_to="none",
                            dataloader_pin_memory=False, disable_tqdm=True)
        trainer = RRHFTrainer(model=model, args=config, train_dataset=rows, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        tokens = int(batch["attention_mask"].sum())
        trainer.training_step(model, dict(batch))  # warm-up: allocates the LoRA grads once
        peaks, times = [], []
        for _ in range(steps):
            gc.collect()
            with _PeakSampler() as sampler:
                floor = _rss_bytes()
                start = time.perf_counter()
                trainer.training_step(model, dict(batch))
                times.append(time.perf_counter() - start)
            peaks.append(sampler.peak - floor)
    times.sort()
    step_s = times[len(times) // 2]
    return {"k": k, "micro_batch": micro or k, "mode": "micro-batch" if micro else "all-at-once",
            "tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_step_mb": max(peaks) / 2**20,
            # whole-process high-water mark, imports and model loading included
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(**spec)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "1"}
    rows = []
    for k in args.ks:
        for micro in (None, args.micro):
            spec = {"k": k, "micro": micro, "steps": args.steps, "threads": args.threads}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env, check=False)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                sys.exit(f"child {spec} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(line[-1][len("RESULT "):]))
            print(f"k={k} {rows[-1]['mode']}: {rows[-1]['peak_step_mb']:.1f} MB above floor, "
                  f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    base = {r["k"]: r for r in rows if r["mode"] == "all-at-once"}
    for r in rows:
        r["memory_vs_all"] = r["peak_step_mb"] / base[r["k"]]["peak_step_mb"]
        r["speed_vs_all"] = r["tokens_per_s"] / base[r["k"]]["tokens_per_s"]
    columns = ["k", "mode", "micro_batch", "tokens", "peak_step_mb", "memory_vs_all",
               "tokens_per_s", "speed_vs_all", "max_rss_mb"]
    print_table(rows, columns, title="one RRHF training step (4-bit NF4 + LoRA, CPU)")
    env_info = environment_info()
    path = write_result("train_memory", {
        "description": "peak RSS above the pre-step floor and tokens/s of one training step "
                       "(two-pass exact micro-batching vs all candidates at once)",
        "model": MODEL, "prompt_chars": PROMPT_CHARS, "response_chars": RESPONSE_CHARS,
        "threads": args.threads, "steps": args.steps, "rows": rows,
        "note": "2 shared CPU cores, 1 torch thread: timings are indicative only (at k = 2 both "
                "modes run the identical single-pass step, so their speed ratio shows the noise); "
                "peak_step_mb is the point",
        "environment_checked": env_info["date"],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
