"""bitsandbytes' fused AVX512-BF16 4-bit CPU kernel, emulated in plain torch for machines without it.

On such a CPU bitsandbytes repacks an eval-mode layer's weight (`_convert_weight_packed_for_cpu`,
plain torch, runs anywhere) and then calls `functional.gemv_4bit` on the packed layout, which
only the native kernel reads. Patching the capability check plus this emulation of that one
call makes every machine take the fused path exactly as an AVX512-BF16 CPU does: the same
repacking of the same layers, the same bf16 arithmetic, so a regression shows on CI machines
without the instruction set. Where the native kernel exists, tests compare the two.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 32  # output rows per packing block, as bitsandbytes packs them


def unpack_code_indices(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The 4-bit code index of every weight element, [out, in], read from the packed layout.

    Packed: [out, in / 2] bytes; each run of 32 bytes holds 64 indices of one block of 32 rows
    and two neighbouring columns, rows 0-15 in the low nibbles and rows 16-31 in the high ones.
    """
    groups = packed.reshape(-1, ROW_BLOCK).to(torch.int32)
    pairs = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # [.., 64]: (row in block, column)
    pairs = pairs.reshape(out_features // ROW_BLOCK, in_features // 2, ROW_BLOCK, 2)
    return pairs.transpose(1, 2).reshape(out_features, in_features)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """x @ W.T in bf16, W dequantised from the packed layout and its bf16 scales."""
    out_features, in_features = (int(n) for n in state.shape)
    indices = unpack_code_indices(packed.view(torch.uint8), out_features, in_features)
    scales = state.absmax.to(torch.bfloat16)  # [in / blocksize, out] after packing
    per_element = scales.t().repeat_interleave(state.blocksize, dim=1)  # [out, in]
    weight = state.code.to(torch.bfloat16)[indices.long()] * per_element
    x2 = x.reshape(-1, in_features).to(torch.bfloat16)
    return (x2 @ weight.t()).reshape(*x.shape[:-1], out_features)


def emulated_gemv_4bit(original):
    """A stand-in for bitsandbytes.functional.gemv_4bit: packed weights here, the rest as before."""

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            result = packed_matmul(A, B, state)
            if out is not None:
                out.copy_(result)
                return out
            return result
        return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B,
                        state=state)

    return gemv_4bit
