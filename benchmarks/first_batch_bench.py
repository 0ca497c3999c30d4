"""Benchmark: the first training step's extra peak memory from the trainer's one-off checks
(choose_output_head, the share_prompt check), as a fraction of one [k, R, V] fp32 logits buffer.

A random LLaMA with Llama 3's vocabulary (128256) but a small width, fp32 LoRA, hidden-state
log-prob path (what the trainer picks for a LLaMA), one prompt with k candidates per step. Per
share_prompt setting (auto, true, false) and check version (today's; "old": the check before
issue 30, which scored whole candidates through the logits path), two fresh processes:
- with_checks: peak memory of the first training step (the checks run inside it);
- decided: the same step after the checks ran outside the measured window.
extra = with_checks - decided; extra_vs_logits = extra / (k x R x V x 4 bytes). CPU: VmHWM after
resetting it through /proc/self/clear_refs (benchmarks/_memory.py).

Usage::

    python benchmarks/first_batch_bench.py            # k 8, prompt 41 + response 200 (issue 30)
    python benchmarks/first_batch_bench.py --dry      # k 4, 16 + 48 tokens, no result file
"""

from __future__ import annotations

import argparse

import torch

try:
    from benchmarks._common import print_table, write_result
    from benchmarks._memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )
except ImportError:  # run as a script: this folder is on sys.path
    from _common import print_table, write_result
    from _memory import (
        add_memory_case_option,
        answer_memory_case,
        in_fresh_process,
        peak_extra_memory,
    )

LLAMA3_VOCAB = 128256
MODEL = {"vocab_size": LLAMA3_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
         "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 1024}
COLUMNS = ["share_prompt", "checks", "with_checks_mb", "decided_mb", "extra_mb", "extra_vs_logits",
           "logprob_path", "shared"]


def build(prompt: int, response: int, k: int, share, out_dir="/tmp/first_batch_bench"):
    from peft import LoraConfig, get_peft_model

    from rrhf_lite.builtin.tiny.models import make_tiny_causal_lm
    from rrhf_lite.data.tokenization import RRHFCollator
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    model = make_tiny_causal_lm(seed=0, attn_implementation="sdpa", **MODEL)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    model.train()
    gen = torch.Generator().manual_seed(0)
    vocab = MODEL["vocab_size"]
    rows = [{"prompt_ids": [1] + torch.randint(3, vocab, (prompt - 1,), generator=gen).tolist(),
             "responses_ids": [torch.randint(3, vocab, (response - 1,), generator=gen).tolist() + [2]
                               for _ in range(k)],
             "scores": [float(i) for i in range(k)]}]
    args = RRHFConfig(output_dir=str(out_dir), per_device_train_batch_size=1, share_prompt=share,
                      max_length=prompt + response, max_prompt_length=prompt, report_to="none",
                      use_cpu=True, disable_tqdm=True, save_strategy="no", logprob_backend="torch")
    trainer = RRHFTrainer(model=model, args=args, train_dataset=rows, data_collator=RRHFCollator(0))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    return trainer, next(iter(trainer.get_train_dataloader()))


def _old_checks() -> None:
    """The share_prompt check as it was: whole candidates, through the logits path."""
    from rrhf_lite.training import logprobs

    original = logprobs.packing_agrees

    def whole(model, input_ids, attention_mask, labels, groups, most=3, *, head=None, tokens=None):
        return original(model, input_ids, attention_mask, labels, groups, most, head=None,
                        tokens=10**9)

    logprobs.packing_agrees = whole


def memory_case(case: dict) -> dict:
    """In this (fresh) process: peak memory of the first step, checks inside it or not."""
    if case["checks"] == "old":
        _old_checks()
    trainer, batch = build(case["prompt"], case["response"], case["k"], case["share"])
    if not case["with_checks"]:  # decide outside the measured window
        inputs = trainer._prepare_inputs(dict(batch))
        trainer._output_head(trainer.model, inputs)
        trainer._share_prompt(trainer.model, inputs)

    def step():
        trainer.model.zero_grad(set_to_none=True)
        return float(trainer.training_step(trainer.model, dict(batch)))

    _, mem = peak_extra_memory(step, "cpu")
    return {**mem, **{k: v for k, v in trainer.forward_choices.items() if not k.endswith("reason")}}


def measure(prompt: int, response: int, k: int, share, checks: str = "new") -> dict:
    case = {"prompt": prompt, "response": response, "k": k, "share": share, "checks": checks,
            "threads": torch.get_num_threads()}
    with_checks = in_fresh_process(__file__, {**case, "with_checks": True})
    decided = in_fresh_process(__file__, {**case, "with_checks": False})
    a, b = with_checks["peak_extra_bytes"], decided["peak_extra_bytes"]
    if a is None or b is None:
        raise RuntimeError(f"a measurement failed: {with_checks} {decided}")
    logits = k * response * MODEL["vocab_size"] * 4
    return {"share_prompt": str(share).lower(), "checks": checks, "with_checks_mb": a / 2**20,
            "decided_mb": b / 2**20, "extra_mb": (a - b) / 2**20, "extra_vs_logits": (a - b) / logits,
            "logits_mb": logits / 2**20, "logprob_path": with_checks.get("logprob_path"),
            "shared": with_checks.get("share_prompt"), "memory_method": with_checks["memory_method"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="small shape, no result file")
    add_memory_case_option(parser)
    args = parser.parse_args(argv)
    if answer_memory_case(args, memory_case):
        return
    prompt, response, k = (16, 48, 4) if args.dry else (41, 200, 8)
    rows = [measure(prompt, response, k, share, checks)
            for checks in ("new", "old") for share in ("auto", True, False)]
    print_table(rows, COLUMNS, title=f"first step's extra peak, k {k} x ({prompt} + {response}) "
                f"tokens, vocab {MODEL['vocab_size']} (one logits buffer {rows[0]['logits_mb']:.0f} MB)")
    if not args.dry:
        path = write_result("first_batch_bench", {"model": MODEL, "shape": {
            "prompt": prompt, "response": response, "k": k}, "rows": rows}, "cpu")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
