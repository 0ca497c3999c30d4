"""Sampling speed of a 4-bit model on the CPU: bitsandbytes' fused AVX512-BF16 kernel vs
dequantise + matmul, side by side in one process, and the per-call choice between them that
rrhf-lite makes (the fused kernel for calls of up to the crossover measured on this CPU).

The model is a random LLaMA of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV
heads, intermediate 1536, vocab 49152, tied embeddings): every layer packs, so with
the fused variant all of them take the fused kernel for every call where the CPU has it. Each variant
loads the same saved checkpoint through rrhf_lite.models.inference_loader.load_causal_lm, then times a prefill
(one forward over the prompts) and top-p sampling of a fixed number of new tokens (EOS off).

On a CPU without AVX512-BF16 the fused kernel does not exist: the script says so, measures the
dequantise path alone and records that (the ratio column stays empty).

    python benchmarks/cpu_4bit_bench.py [--batch 4] [--prompt-len 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

try:
    from benchmarks._common import print_table, time_fn, write_result
except ImportError:
    from _common import print_table, time_fn, write_result

from rrhf_lite.models import cpu_4bit

SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=2048)


def save_random_model(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


# variant -> what configure_for_inference takes
VARIANTS = {"dequantise + matmul (fp32)": False, "fused bf16 kernel, every call": 1 << 30,
            "per call (measured crossover)": "auto"}


def measure(model_dir: Path, variant: str, args) -> dict:
    # The tokenizer is not needed: prompts are random ids, sampling never stops early.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)).eval()
    paths = cpu_4bit.configure_for_inference(model, fused=VARIANTS[variant])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (args.batch, args.prompt_len), generator=generator)
    mask = torch.ones_like(ids)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    def sample():
        torch.manual_seed(0)
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.9,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       eos_token_id=None, pad_token_id=0)

    first = time_fn(prefill, warmup=1, repeat=args.repeat)
    gen = time_fn(sample, warmup=1, repeat=args.repeat)
    used = cpu_4bit.compute_path(model)
    return {"variant": variant, "path": used["path"], "fused_layers": paths.fused,
            "max_rows": paths.max_rows,
            "prefill_ms": first["ms"], "sample_s": gen["ms"] / 1000,
            "new_tokens_per_s": args.batch * args.new_tokens / (gen["ms"] / 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    available = cpu_4bit.fused_kernel_available()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(Path(tmp) / "model")
        names = list(VARIANTS) if available else list(VARIANTS)[:1]
        rows = [measure(model_dir, name, args=args) for name in names]
        base = rows[0]
        for row in rows:
            row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
            row["sample_speedup"] = base["sample_s"] / row["sample_s"]
    note = None if available else (
        "this CPU has no AVX512-BF16: bitsandbytes' fused kernel does not exist here; only the "
        "dequantise path was measured")
    print_table(rows, title=f"4-bit sampling on the CPU, batch {args.batch}, prompt "
                f"{args.prompt_len}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    if note:
        print(note)
    path = write_result("cpu_4bit", {
        "settings": {**vars(args), "threads": torch.get_num_threads(), "model_shape": SHAPE},
        "fused_kernel_available": available, "note": note, "rows": rows,
        "load_average_after": os.getloadavg()})
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
