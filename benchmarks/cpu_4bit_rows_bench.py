"""Where bitsandbytes' fused AVX512-BF16 4-bit kernel stops paying: its time against dequantise +
matmul for one 4-bit layer, by the number of rows a call multiplies.

A forward call of a 4-bit linear layer multiplies `rows` = batch x new tokens of input rows by
the weight: 1 row per sequence when decoding, batch x prompt length in a prefill. For each of
SmolLM2-135M's linear shapes (q/o 576 -> 576, k/v 576 -> 192, gate/up 576 -> 1536, down
1536 -> 576) and each row count, the script times, side by side in this process, call after call:

- dequantise + matmul: bitsandbytes' own path for an unpacked layer, in float32 compute (what
  a CPU inference model of rrhf-lite computes in);
- fused: `bitsandbytes.functional.gemv_4bit` on a packed copy of the same weight (bf16 input,
  the layout bitsandbytes repacks an eval-mode layer into).

It prints the ratio fused / dequantise (below 1: the fused kernel is faster) per shape and row
count, and the largest row count at which the fused kernel is faster for every shape. On a CPU
without AVX512-BF16 there is no fused kernel: the script says so and records nothing.

    python benchmarks/cpu_4bit_rows_bench.py [--threads 2] [--repeats 21]
"""

from __future__ import annotations

import argparse
import os

import torch

try:
    from benchmarks._common import print_table, write_result
except ImportError:
    from _common import print_table, write_result

from rrhf_lite.models.cpu_4bit import alternating_median_seconds, packed_copy

SHAPES = {"q_o 576x576": (576, 576), "k_v 192x576": (192, 576), "gate_up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}  # (out_features, in_features)
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)


def layer_pair(out_features: int, in_features: int):
    """(unpacked Linear4bit in float32 compute, (packed weight, packed state)) of one weight."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")  # quantises
    layer.support_avx512bf16_for_cpu = False
    layer.eval()
    return layer, packed_copy(layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bitsandbytes.functional as F

    if not F.has_avx512bf16():
        print("This CPU has no AVX512-BF16: bitsandbytes has no fused 4-bit kernel here; nothing "
              "to compare.")
        return

    rows_out, per_rows = [], {r: [] for r in ROWS}
    with torch.no_grad():
        for name, (out_features, in_features) in SHAPES.items():
            layer, (packed, packed_state) = layer_pair(out_features, in_features)
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                x_bf16 = x.to(torch.bfloat16)
                d, f = alternating_median_seconds(
                    lambda layer=layer, x=x: layer(x),
                    lambda x=x_bf16, w=packed, s=packed_state: F.gemv_4bit(x, w, state=s),
                    args.repeats)
                per_rows[rows].append(f / d)
                rows_out.append({"shape": name, "rows": rows, "dequantize_us": round(d * 1e6, 1),
                                 "fused_us": round(f * 1e6, 1), "fused_over_dequantize": round(f / d, 3)})
    summary = [{"rows": r, "worst_ratio": round(max(v), 3), "best_ratio": round(min(v), 3),
                "fused_faster_for_every_shape": max(v) < 1.0} for r, v in per_rows.items()]
    crossover = max((r for r, v in per_rows.items() if max(v) < 1.0), default=0)
    print_table(rows_out, title="fused / dequantise, per 4-bit layer call (below 1: fused faster)")
    print_table(summary, title="over the four shapes")
    print(f"largest row count with the fused kernel faster on every shape: {crossover}")
    load = os.getloadavg()
    write_result("cpu_4bit_rows", {
        "threads": args.threads, "repeats": args.repeats, "load_average_at_end": load,
        "rows": rows_out, "summary": summary, "crossover_rows": crossover,
    }, results_dir=args.out)


if __name__ == "__main__":
    main()
