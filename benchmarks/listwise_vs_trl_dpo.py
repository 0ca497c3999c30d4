"""Benchmark: rrhf-lite's listwise objectives against TRL's DPOTrainer, time per prompt and peak
memory of one training step (forward + backward + optimizer), on the real model.

The model is loaded as recipes/smollm2_constraints.yaml loads it (builtin:smollm2-135m-instruct,
NF4 4-bit base, double quantisation, LoRA r 16 / alpha 32 on all linear layers, no dropout, no
gradient checkpointing, max_length 128, candidate_micro_batch_size 8). The data: --prompts
prompts from rrhf_lite.builtin.constraints (chat template, about 70 tokens), each with 4
synthesised responses of 32, 26, 20 and 14 tokens (the recipe samples up to 32 new tokens) and
distinct rewards. Both sides train on the same token ids (rrhf_lite.training.dpo_pairs tokenises
TRL's pairs exactly as RRHF's candidates).

Variants, each step covering all --prompts prompts (one optimiser step):
- k = 2: TRL DPO on each prompt's best-vs-worst pair; ours `dpo_pairs` and `pl_dpo` on the same
  two candidates (at k = 2 both are DPO's sigmoid loss).
- k = 4: TRL DPO on the 6 pairs each 4-candidate list expands to (all pairs with r_i > r_j) in
  two configurations: all pairs in one batch (`trl_dpo`), and 2 pairs per forward with gradient
  accumulation over the rest (`trl_dpo_2xN`, the recipe's DPO batch); ours `rrhf`, `pro`,
  `pl_dpo`, `lipo`, `dpo_pairs` on the 4-candidate lists. Ratios are to TRL at its best on each
  measure: its faster configuration for time, its leaner one for memory.
TRL is given the base model and a `peft_config` with no `ref_model` and its defaults otherwise
(`precompute_ref_log_probs` False): each step it runs the batch once more under no_grad with the
adapter disabled for the reference log-probs. Ours does the same (adapter disabled, no_grad), once
per prompt list, with the prompt shared by its candidates.

Timing: every variant is built first (ours share one loaded model; each TRL variant wraps its own
base), then rounds run the variants one after another (warm-up rounds, then --steps timed ones),
so that a shared CPU's load falls on all alike. Reported per prompt: the median wall time and the
median process CPU time of a step divided by --prompts (one torch thread by default: CPU time is
the work itself, wall time also counts waiting for the cores).

Memory (CPU): the resident set a step adds to the process, VmHWM - VmRSS around the step after
resetting the high-water mark through /proc/self/clear_refs; mallopt(M_MMAP_THRESHOLD, 64 KiB)
first, so that every tensor beyond 64 KiB is its own mapping and is returned to the system when
freed: a variant cannot hide in memory an earlier one freed. Everything counts (torch,
bitsandbytes, Python), the model and the optimiser state (allocated in the warm-up) are the floor.
CUDA: torch.cuda.max_memory_allocated over the step minus memory_allocated before.

    python benchmarks/listwise_vs_trl_dpo.py                    # 1 prompt, 1 warm-up + 2 steps
    python benchmarks/listwise_vs_trl_dpo.py --steps 1 --no-write
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks._common import environment_info, print_table, write_result
except ImportError:  # run as a script: this folder is on sys.path
    from _common import environment_info, print_table, write_result

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2_constraints.yaml"
RESPONSE_TOKENS = (32, 26, 20, 14)  # the 4 candidates' lengths before EOS
REWARDS = (1.0, 2 / 3, 1 / 3, 0.0)
OURS_K2 = ("dpo_pairs", "pl_dpo")
OURS_K4 = ("rrhf", "pro", "pl_dpo", "lipo", "dpo_pairs")
# The goals (ratios to TRL DPO on the same pairs)
GOAL_K2 = {"dpo_pairs": {"time": 0.7, "memory": 0.5}}
GOAL_K4 = {"time": 0.3, "memory": 1.0}
# A pool of ordinary English the synthetic responses are cut from (our own words)
TEXT = ("Here is a short answer to your question. The river runs past the old mill and under a "
        "stone bridge, where children stop to watch the water. In spring the banks turn green, "
        "and by summer the path is busy with walkers and their dogs. Most people come for the "
        "quiet; a few come to fish, and nobody seems to mind the rain. The town keeps a small "
        "museum about the mill, open on weekends, with photographs of the floods and the people "
        "who rebuilt it. ")


# ---------------------------------------------------------------- memory

M_MMAP_THRESHOLD = -3


def return_freed_memory_to_system() -> bool:
    """glibc: serve every allocation over 64 KiB by its own mapping, unmapped when freed."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured_step(step, device: str) -> dict:
    """Run step() once: wall and CPU seconds, and the memory it adds (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS") * 1024
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else _status_kb("VmHWM") * 1024)
    return {"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": (peak - before) / 2**20}


# ---------------------------------------------------------------- data

def make_lists(tokenizer, prompts: int) -> list[dict]:
    """Listwise rows: constraint prompts, 4 responses of RESPONSE_TOKENS tokens, distinct rewards
    in an order that differs between prompts (the best is not always first)."""
    from rrhf_lite.builtin.constraints import make_rows

    pool = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
    rows = []
    for i, row in enumerate(make_rows(prompts, seed=0, held_out=False)):
        responses = [tokenizer.decode(pool[17 * (i + j): 17 * (i + j) + n])
                     for j, n in enumerate(RESPONSE_TOKENS)]
        order = list(range(4))
        random.Random(i).shuffle(order)
        rows.append({"prompt": row["prompt"], "responses": [responses[j] for j in order],
                     "scores": [REWARDS[j] for j in order]})
    return rows


def expanded_pairs(rows: list[dict]) -> list[dict]:
    """Each list's pairs with r_i > r_j as k = 2 rows, better first: 6 per 4-candidate list."""
    pairs = []
    for row in rows:
        for i, j in itertools.permutations(range(len(row["responses"])), 2):
            if row["scores"][i] > row["scores"][j]:
                pairs.append({"prompt": row["prompt"],
                              "responses": [row["responses"][i], row["responses"][j]],
                              "scores": [row["scores"][i], row["scores"][j]]})
    return pairs


# ---------------------------------------------------------------- variants

class Variant:
    """One trainer, its fixed batches, its optimiser: step() is one optimiser step over all the
    batches (gradient accumulation when there are several)."""

    def __init__(self, name: str, group: str, trainer, batches: list[dict], prompts: int,
                 tokens: int):
        self.name, self.group, self.trainer, self.batches = name, group, trainer, batches
        self.prompts, self.tokens = prompts, tokens
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        # what Trainer.train() sets: each batch's loss is scaled by it
        trainer.current_gradient_accumulation_steps = len(batches)
        self.runs: list[dict] = []

    def step(self) -> None:
        trainer = self.trainer
        trainer.model.train()
        for batch in self.batches:
            trainer.training_step(trainer.model, dict(batch))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)


def recipe_pieces():
    """(recipe, model path, ModelArguments, train section) of recipes/smollm2_constraints.yaml."""
    from rrhf_lite.builtin.sources import resolve_model
    from rrhf_lite.config.recipe import load_recipe
    from rrhf_lite.stages.train import model_arguments, train_section

    recipe = load_recipe(RECIPE, [])
    path = resolve_model(recipe.model.name_or_path, seed=recipe.seed, options=recipe.model.builtin)
    return recipe, model_arguments(recipe, path), train_section(recipe)


def our_variants(rows_k2, rows_k4, model, tokenizer, section, out: str):
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    variants = []
    for group, rows, names in (("k=2", rows_k2, OURS_K2), ("k=4", rows_k4, OURS_K4)):
        for loss_type in names if rows else ():
            config = RRHFConfig(
                output_dir=f"{out}/{group}-{loss_type}", loss_type=loss_type, beta=0.1,
                per_device_train_batch_size=len(rows), learning_rate=section.learning_rate,
                lr_scheduler_type="constant", max_length=section.max_length,
                max_prompt_length=section.max_prompt_length,
                candidate_micro_batch_size=section.candidate_micro_batch_size,
                gradient_checkpointing=section.gradient_checkpointing, bf16=False, fp16=False,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False,
                report_to="none")
            trainer = RRHFTrainer(model=model, args=config, train_dataset=rows,
                                  processing_class=tokenizer)
            batch = next(iter(trainer.get_train_dataloader()))
            features = trainer.train_dataset.features
            tokens = sum(len(f["prompt_ids"]) + sum(len(r) for r in f["responses_ids"])
                         for f in features)
            variants.append(Variant(loss_type, group, trainer, [batch], len(rows), tokens))
    return variants


def trl_variant(group: str, pair_rows: list[dict], prompts: int, model_args, section, out: str,
                pairs_per_batch: int | None = None):
    """TRL's DPOTrainer on these pairs, all in one batch or `pairs_per_batch` at a time with
    gradient accumulation; reference = adapter disabled."""
    from datasets import Dataset
    from trl import DPOConfig

    from rrhf_lite.models.training_loader import load_model_for_training, lora_config_from_args
    from rrhf_lite.training.dpo_pairs import pretokenized_dpo_trainer, tokenize_pairs

    base, tokenizer = load_model_for_training(model_args, add_lora=False)
    pairs, _ = tokenize_pairs(pair_rows, tokenizer, max_length=section.max_length,
                              max_prompt_length=section.max_prompt_length)
    config = DPOConfig(
        output_dir=f"{out}/{group}-trl", beta=0.1, loss_type=["sigmoid"],
        per_device_train_batch_size=pairs_per_batch or len(pairs),
        learning_rate=section.learning_rate,
        lr_scheduler_type="constant", max_length=section.max_length, bf16=False, fp16=False,
        activation_checkpointing=section.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=False,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False,
        report_to="none")
    assert not config.precompute_ref_log_probs  # TRL's default: the reference in every step
    trainer = pretokenized_dpo_trainer()(
        model=base, args=config, train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer, peft_config=lora_config_from_args(model_args))
    # no "ref" adapter: the reference is the model with its adapter disabled, as ours
    assert list(trainer.model.peft_config) == ["default"] and trainer.ref_model is None
    batches = list(trainer.get_train_dataloader())
    name = "trl_dpo" if pairs_per_batch is None else f"trl_dpo_{pairs_per_batch}x{len(batches)}"
    return Variant(name, group, trainer, batches, prompts,
                   sum(int(b["input_ids"].numel()) for b in batches))


# ---------------------------------------------------------------- the table

def summarise(variants: list[Variant], warmup: int) -> list[dict]:
    rows = []
    for v in variants:
        timed = v.runs[warmup:]
        rows.append({
            "group": v.group, "variant": v.name, "prompts": v.prompts, "tokens": v.tokens,
            "s_per_prompt": statistics.median(r["wall_s"] for r in timed) / v.prompts,
            "cpu_s_per_prompt": statistics.median(r["cpu_s"] for r in timed) / v.prompts,
            "peak_extra_mb": max(r["peak_extra_mb"] for r in timed),
            "steps": [dict(r) for r in v.runs],
        })
    for row in rows:
        # against TRL at its best on each measure: its fastest and its leanest configuration
        trl = [r for r in rows if r["group"] == row["group"] and r["variant"].startswith("trl_dpo")]
        row["time_vs_trl"] = row["s_per_prompt"] / min(r["s_per_prompt"] for r in trl)
        row["cpu_vs_trl"] = row["cpu_s_per_prompt"] / min(r["cpu_s_per_prompt"] for r in trl)
        row["memory_vs_trl"] = row["peak_extra_mb"] / min(r["peak_extra_mb"] for r in trl)
        row["goal"] = verdict(row)
    return rows


def verdict(row: dict) -> str:
    """The issue's goal for this row, PASS / FAIL on wall and CPU time and memory, or '-'."""
    if row["variant"].startswith("trl_dpo"):
        return "-"
    goal = GOAL_K2.get(row["variant"]) if row["group"] == "k=2" else GOAL_K4
    if goal is None:
        return "-"
    time_ok = max(row["time_vs_trl"], row["cpu_vs_trl"]) <= goal["time"]
    memory_ok = (row["memory_vs_trl"] <= goal["memory"] if row["group"] == "k=2"
                 else row["memory_vs_trl"] < goal["memory"])
    limits = f"time <= {goal['time']}x, memory {'<=' if row['group'] == 'k=2' else '<'} {goal['memory']}x"
    return f"{'PASS' if time_ok and memory_ok else 'FAIL'} ({limits})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1, help="prompts per optimiser step")
    parser.add_argument("--trl-pairs-per-batch", type=int, default=2,
                        help="k = 4: TRL's second configuration, this many pairs per forward "
                             "with gradient accumulation (the recipe's DPO batch: 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--only", choices=("k2", "k4"), help="one group only")
    parser.add_argument("--no-write", action="store_true", help="print, write no result file")
    parser.add_argument("--note", default="", help="a line recorded in the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mmap_set = return_freed_memory_to_system()
    load_before = os.getloadavg()
    started = time.time()

    from rrhf_lite.models.training_loader import load_model_for_training
    from rrhf_lite.training.dpo_pairs import best_worst_pairs

    recipe, model_args, section = recipe_pieces()
    model, tokenizer = load_model_for_training(model_args)
    rows_k4 = make_lists(tokenizer, args.prompts)
    rows_k2 = best_worst_pairs(rows_k4)[0]
    with tempfile.TemporaryDirectory() as out:
        variants = []
        if args.only != "k4":
            variants.append(trl_variant("k=2", rows_k2, args.prompts, model_args, section, out))
        if args.only != "k2":
            for per_batch in (None, args.trl_pairs_per_batch):
                variants.append(trl_variant("k=4", expanded_pairs(rows_k4), args.prompts,
                                            model_args, section, out, per_batch))
        ours = our_variants(rows_k2 if args.only != "k4" else [], rows_k4 if args.only != "k2" else [],
                            model, tokenizer, section, out)
        variants += ours
        variants.sort(key=lambda v: (v.group, not v.name.startswith("trl_dpo")))
        print(f"built {len(variants)} variants in {time.time() - started:.0f} s", flush=True)
        for round_ in range(args.warmup + args.steps):
            for v in variants:
                v.runs.append(measured_step(v.step, device))
                print(f"round {round_} {v.group} {v.name}: {v.runs[-1]['wall_s']:.2f} s, "
                      f"{v.runs[-1]['peak_extra_mb']:.0f} MB", flush=True)
        choices = {f"{v.group} {v.name}": v.trainer.forward_choices for v in variants
                   if hasattr(v.trainer, "forward_choices")}
    rows = summarise(variants, args.warmup)
    columns = ["group", "variant", "tokens", "s_per_prompt", "time_vs_trl", "cpu_s_per_prompt",
               "cpu_vs_trl", "peak_extra_mb", "memory_vs_trl", "goal"]
    print_table(rows, columns, title=f"one training step per {args.prompts} prompts, ratios to TRL "
                                     f"DPO on the same pairs ({device}, {args.threads} thread(s))")
    if args.no_write:
        return
    path = write_result("listwise_vs_trl_dpo", {
        "description": "time per prompt and peak extra memory of one training step (forward + "
                       "backward + optimizer, reference included): rrhf-lite's listwise "
                       "objectives vs TRL's DPOTrainer on the same pairs",
        "model": str(recipe.model.name_or_path), "recipe": "recipes/smollm2_constraints.yaml",
        "data": {"prompts_per_step": args.prompts, "response_tokens": list(RESPONSE_TOKENS),
                 "rewards": list(REWARDS), "source": "rrhf_lite.builtin.constraints train prompts"},
        "trl_reference": "DPOTrainer(model=base, peft_config=LoRA), no ref_model, "
                         "precompute_ref_log_probs False (default): the reference log-probs are "
                         "computed in every step under no_grad with the adapter disabled",
        "memory_method": ("torch.cuda.max_memory_allocated delta" if device == "cuda" else
                          "VmHWM - VmRSS around the step after /proc/self/clear_refs, "
                          f"mallopt(M_MMAP_THRESHOLD, 64 KiB) {'set' if mmap_set else 'NOT set'}"),
        "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "device": device,
        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
        "wall_s": time.time() - started, "forward_choices": choices, "note": args.note,
        "goals": {"k=2": GOAL_K2, "k=4": GOAL_K4}, "rows": rows,
        "environment_checked": environment_info()["date"],
    }, device=device)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
