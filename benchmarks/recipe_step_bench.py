"""The 8 GB recipe's training step against `rrhf-lite plan`, on a GPU.

recipes/llama3_8b_qlora_8gb.yaml's model (Llama-3-8B's published shape, all 32 blocks) built with
random weights (no download: e2e_bench.build_random_qlora_model, NF4 + double quantisation, the
recipe's LoRA, bf16, prepared as the trainer's loader prepares it), then one
`RRHFTrainer.training_step` with the recipe's train settings (candidate micro-batch, prompt
sharing, log-prob path, loss) on one prompt of max_prompt_length tokens with k candidates of
max_length tokens under bf16 autocast, as the Trainer runs it. A warm-up step on a small batch
comes first (first-batch checks, gradients, AdamW states); the measured step adds to the kept
gradients, as 7 of the recipe's 8 accumulation micro-steps do.

Measured: torch.cuda.max_memory_allocated over the step. Planned:
`rrhf_lite.plan.memory_parts.training_parts` for the same shape (the prompt and response lengths
of the measured batch) and the recipe's own plan (its worst case: responses as long as
max_length allows). `--dry` (the GPU suite's CPU run): a tiny width with 2 blocks on the CPU, the
step runs, nothing is measured, both plans are computed.

    python benchmarks/recipe_step_bench.py            # CUDA
    python benchmarks/recipe_step_bench.py --dry      # CPU, tiny
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

RECIPE = ROOT / "recipes" / "llama3_8b_qlora_8gb.yaml"
TOLERANCE = 0.05
DRY = dict(width="tiny-llama3", seq_len=48, prompt_len=16)


def _llama_config(shape, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size,
                       num_hidden_layers=layers or shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       head_dim=shape.head_dim, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=shape.tie_embeddings,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def plan_for(recipe, shape, settings, path: str):
    from rrhf_lite.plan.memory_parts import training_parts
    from rrhf_lite.plan.recipe_memory import regime_for

    return training_parts(shape, settings, regime_for(recipe), path)


def run_recipe_step(recipe_path: str | Path = RECIPE, device: str = "cuda", dry: bool = False,
                    on_row=None) -> dict:
    """Build, warm up, measure one step; return (and hand `on_row`) the row."""
    import dataclasses

    import torch
    from e2e_bench import build_random_qlora_model, make_batch, make_trainer, mixed_precision

    from rrhf_lite.config.recipe import load_recipe
    from rrhf_lite.models.training_loader import ModelArguments
    from rrhf_lite.plan.recipe_memory import logprob_path_for, train_settings
    from rrhf_lite.plan.shapes import resolve_shape, shape_from_config

    recipe = load_recipe(str(recipe_path), [])
    full = resolve_shape(recipe.model.name_or_path)
    recipe_settings = train_settings(recipe)
    recipe_plan = plan_for(recipe, full, recipe_settings, logprob_path_for(recipe, full)[0])
    if dry:
        from e2e_bench import llama_config

        config = llama_config(DRY["width"])
        seq, prompt = DRY["seq_len"], DRY["prompt_len"]
    else:
        config = _llama_config(full)
        seq, prompt = recipe.train.max_length, recipe.train.max_prompt_length or 256
    shape = shape_from_config({**config.to_dict(), "model_type": "llama"}, "random")
    t = recipe.train
    args = ModelArguments(model_name_or_path="<random>", torch_dtype="bfloat16",
                          bnb_4bit_compute_dtype="bfloat16", lora_r=recipe.lora.r,
                          lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                          lora_target_modules=recipe.lora.target_modules,
                          bnb_4bit_use_double_quant=recipe.quantization.double_quant)
    started = time.perf_counter()
    model = build_random_qlora_model(config, device, args)
    build_s = time.perf_counter() - started
    k, micro = recipe_settings.per_prompt, recipe_settings.micro_batch
    trainer = make_trainer(model, micro, True, "auto", tempfile.mkdtemp(prefix="rrhf_recipe_"),
                           share_prompt=t.share_prompt, logprob_path=t.logprob_path,
                           loss_type=t.loss_type)
    batch = make_batch(config.vocab_size, k, seq, prompt)

    def step(rows):
        with mixed_precision(model, True) as prepared:
            trainer.training_step(prepared, {key: v.to(device) for key, v in rows.items()})

    step(make_batch(config.vocab_size, min(k, 2 * micro), prompt + 16, prompt))  # warm-up
    trainer.optimizer.step()  # AdamW states; the gradients stay (an accumulation micro-step)
    gc.collect()
    measured = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    step_s = time.perf_counter() - started
    choices = trainer.forward_choices
    same = dataclasses.replace(recipe_settings, candidates=k, max_length=seq, prompt_tokens=prompt,
                               response_tokens=seq - prompt,
                               share_prompt=bool(choices.get("share_prompt")),
                               first_batch_checks=False)
    plan = plan_for(recipe, shape, same, choices.get("logprob_path", "hidden"))
    row = {"recipe": Path(recipe_path).name, "model": recipe.model.name_or_path,
           "layers": shape.num_layers, "hidden": shape.hidden_size, "vocab": shape.vocab_size,
           "k": k, "micro_batch": micro, "seq_len": seq, "prompt_len": prompt,
           "forward_choices": choices, "device": device, "dry": dry,
           "meas_gib": None if measured is None else measured / 2**30,
           "plan_gib": plan.allocated / 2**30, "plan_peak_at": plan.peak_phase,
           "plan_parts_gib": {p.name: p.bytes / 2**30 for p in plan.parts if p.phase != "overhead"},
           "recipe_plan_gib": recipe_plan.allocated / 2**30,
           "recipe_plan_on_card_gib": recipe_plan.on_card / 2**30,
           "err": None if measured is None else plan.allocated / measured - 1,
           "build_s": build_s, "step_s": step_s}
    row["within_5pct"] = None if row["err"] is None else abs(row["err"]) <= TOLERANCE
    if on_row is not None:
        on_row(row)
    return row  # the model goes with this frame (the GPU suite frees memory after each item)


COLUMNS = ("recipe", "layers", "k", "micro_batch", "seq_len", "prompt_len", "meas_gib", "plan_gib",
           "err", "plan_peak_at", "recipe_plan_gib")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--dry", action="store_true", help="tiny width on the CPU, not measured")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    if device == "cpu" and not args.dry:
        print("no CUDA device: run with --dry for the CPU smoke run", file=sys.stderr)
        return 2
    row = run_recipe_step(args.recipe, device, args.dry)
    from _common import print_table, write_result

    print_table([row], COLUMNS, title="recipe training step: measured vs plan (GiB)")
    if not args.dry:
        path = write_result("recipe_step", {"tolerance": TOLERANCE, "rows": [row]}, device=device,
                            results_dir=args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
