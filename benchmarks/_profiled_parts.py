"""Memory of one training step by part, measured with torch's memory profiler.

`torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)` records every
allocation and free of torch's allocator with the op and the Python stack it came from; its
`MemoryProfile` (torch.profiler._memory_profiler, a private API: torch 2.13 here) turns them into
a timeline of tensors, each with a category (PARAMETER, OPTIMIZER_STATE, INPUT, ACTIVATION,
GRADIENT, TEMPORARY, AUTOGRAD_DETAIL, or none).

The profiler's categories say what a tensor is to autograd, not which of the plan's parts it
belongs to (a recomputed block's saved tensors are AUTOGRAD_DETAIL to it, a checkpoint is an
ACTIVATION, a gradient in flight TEMPORARY or AUTOGRAD_DETAIL). So each live tensor is put in a
plan part by where it was made, read from its allocation's stack, first rule that matches:

- held before the step: by identity (storage address) with the model's and the optimizer's
  tensors: 4-bit weights, quantisation constants, embeddings + head, LoRA parameters, optimizer
  states, other weights (norms, rotary buffers), and the batch;
- the LoRA gradients: the storages the parameters' .grad hold after the step;
- made while a checkpointed block is recomputed in the backward (torch.utils.checkpoint's
  recompute_fn): a dequantised 4-bit weight when bitsandbytes' dequantise op made it; else
  recompute transients when the profiler's category is TEMPORARY (made and freed without
  autograd reading it: down_proj's input, peft's fp32 copies, ...); else the recomputed block
  (what the block saves for its backward);
- made elsewhere in the backward: a dequantised weight as above, else gradients in flight (the
  residual and MLP gradients, the hidden-state gradient scattered back to every position);
- made in the forward by rrhf_kernels (the hidden-state log-prob path): the gradient it makes
  during the forward (hidden-states-sized), else its tiles;
- made in the forward inside a block's layers (attention, MLP, norms, 4-bit layers, dropout):
  a LoRA weight's autocast copy (a cast inside a linear, of a LoRA weight's size), else
  forward activations (no graph) (with a graph they are freed at once, the block recomputes
  them in the backward);
- made by the trainer's reference pass outside the model: the reference log-prob sums;
- made in the forward by a block's call itself or the input embedding: checkpointed
  activations (what outlives the forward of a block under non-reentrant checkpointing is its
  output, the next block's input; without a graph, the residual stream);
- made in the forward by the trainer's gather of the response positions: hidden states
  (response positions); by the final norm: its saved input;
- anything else made in the forward: rotary tables + attention mask (and positions, layouts).

Moments: the step's global peak, and per chunk of pass 3 the two moments the plan counts: the
log-prob pass (from the hidden-state kernel's call to the first recomputed block) and the last
block's backward (from the first recomputed block to the second, or to the end of the backward).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# the trainer's functions and the libraries' frames the rules look for in an allocation's stack
RECOMPUTE = "checkpoint.py"  # ...(NNNN): recompute_fn
BACKWARD = "_engine_run_backward"
KERNEL = "rrhf_kernels"
DEQUANTISE = "dequantize"
# modules inside a decoder block (the block's own residual adds are its outputs: checkpoints)
INNER = ("nn.Module: LlamaAttention", "nn.Module: LlamaMLP", "nn.Module: Linear4bit",
         "nn.Module: LlamaRMSNorm_", "nn.Module: Dropout")


@dataclass
class Site:
    """Where one allocation was made: its op and the names of its enclosing calls, innermost first."""

    names: tuple[str, ...]

    def has(self, *parts: str) -> bool:
        return any(p in n for n in self.names for p in parts)

    @property
    def in_recompute(self) -> bool:
        return any(RECOMPUTE in n and "recompute_fn" in n for n in self.names)

    @property
    def in_backward(self) -> bool:
        return self.has(BACKWARD)


@dataclass
class Profiled:
    """One profiled call: the tensor timeline, allocation sites and window marks."""

    timeline: list  # (t_ns, action, (TensorKey, version), nbytes) for the device
    categories: Any
    sites: dict  # TensorKey -> Site
    calls: list[tuple[int, int, str]]  # (start_ns, end_ns, name) of Python calls
    t_end: int = 0
    untracked: list = field(default_factory=list)  # (t_ns, ptr, signed bytes, Site) of allocations no tensor owns
    static: dict = field(default_factory=dict)  # storage address -> (part name, bytes)
    grads: set = field(default_factory=set)  # storage addresses of the parameters' .grad
    lora_weight_bytes: set = field(default_factory=set)  # sizes of the LoRA weights' 16-bit copies


def profile_call(fn: Callable[[], Any], device: str = "cpu") -> Profiled:
    """Run fn() under the memory profiler; return its timeline with allocation sites."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _EventType

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    memory = prof._memory_profile()
    sites, calls = {}, []
    from torch.profiler._memory_profiler import TensorKey

    untracked = []
    for node in memory._op_tree.sorted_nodes:
        kind = node.typed[0]
        if kind == _EventType.Allocation:
            alloc = node.typed[1]
            key = TensorKey.from_allocation(alloc)
            if key is not None and alloc.alloc_size <= 0:
                continue
            names, parent = [], node.parent
            while parent is not None:
                names.append(parent.name)
                parent = parent.parent
            if key is not None:
                sites[key] = Site(tuple(names))
            elif alloc.device.type == torch.device(device).type:
                untracked.append((node.start_time_ns, alloc.ptr, alloc.alloc_size, Site(tuple(names))))
        elif kind == _EventType.PyCall:
            calls.append((node.start_time_ns, node.end_time_ns, node.name))
    want = torch.device(device)
    timeline = [e for e in memory.timeline if e[2][0].device.type == want.type]
    t_end = max((t for t, *_ in timeline), default=0)
    return Profiled(timeline, memory._categories, sites, calls, t_end, sorted(untracked, key=lambda e: e[0]))


def static_storages(model, optimizer, batch: dict | None = None) -> dict[int, tuple[str, int]]:
    """Storage address -> (plan part, bytes) of every tensor held before the step. Counted by
    identity, not from the profile: the profiler sees a tensor only when an op touches it (the
    optimizer's states are not touched by a training step)."""
    parts: dict[int, tuple[str, int]] = {}

    def add(t, name):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            parts.setdefault(storage.data_ptr(), (name, storage.nbytes()))

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    for t in (head.weight, embed.weight):
        add(t, "embeddings + head")
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            add(p, "4-bit weights")
            qs = getattr(p, "quant_state", None)
            while qs is not None:
                for attr in ("absmax", "code", "offset"):
                    add(getattr(qs, attr, None), "quantisation constants")
                qs = getattr(qs, "state2", None)
        elif "lora_" in name:
            add(p, "LoRA parameters")
            if p.grad is not None:  # a micro-step inside an accumulation window
                add(p.grad, "LoRA gradients")
        else:
            add(p, "other weights (norms, biases)")
    for b in model.buffers():
        add(b, "other weights (norms, biases)")
    for state in optimizer.state.values():
        for t in state.values():
            add(t, "optimizer states")
    for t in (batch or {}).values():
        add(t, "batch")
    return parts


def part_of(key, site: Site | None, profiled: Profiled, preexisting: bool,
            hidden_bytes: set[int], nbytes: int, category: str | None = None) -> str:
    """The plan part of one live tensor (the rules in the module's docstring)."""
    address = _address(key)
    if address is None:  # allocations no tensor owns (the profiler's plain Key)
        return "unattributed"
    if preexisting:
        return profiled.static.get(address, ("other held before the step", 0))[0]
    if address in profiled.grads:
        return "LoRA gradients"
    if site is None:
        return "unattributed"
    if site.in_recompute:
        if site.has(DEQUANTISE):
            return "dequantised weight"
        # the profiler's TEMPORARY: made and freed without autograd ever reading it
        return "recompute transients" if category == "TEMPORARY" else "recomputed block"
    if site.in_backward:
        return "dequantised weight" if site.has(DEQUANTISE) else "gradients in flight"
    if site.has(DEQUANTISE):
        return "dequantised weight"
    in_block = site.has("nn.Module: LlamaDecoderLayer")
    if in_block and site.has(*INNER):  # inside a block's layers: alive only in a no-graph forward
        if site.has("aten::linear") and site.has("aten::_to_copy") and nbytes in profiled.lora_weight_bytes:
            return "LoRA weights, autocast copies"  # autocast's cache, kept until the forward ends
        return "forward activations (no graph)"
    if site.has(KERNEL):
        return "their gradient, made in the forward" if nbytes in hidden_bytes else "log-prob tiles"
    if site.has("_predicting_outputs") and site.has("aten::index") and not site.has("nn.Module"):
        return "hidden states (response positions)"
    if site.has("nn.Module: LlamaRMSNorm") and not in_block:
        return "final norm's saved input"
    if site.has("_add_reference_sums") and not site.has("_chunk_sums"):
        return "reference log-prob sums"
    if site.has("checkpoint.py") or site.has("nn.Module: Embedding") or in_block:
        return "checkpointed activations"  # a block's output (the stream, without a graph)
    return "rotary tables + attention mask"


def _address(key) -> int | None:
    storage = getattr(key, "storage", None)
    return getattr(storage, "ptr", None)


def live_at(profiled: Profiled, start: int, end: int) -> tuple[int, int, dict]:
    """(peak bytes, time, {key: (bytes, preexisting, version)} live at the peak) within
    [start, end] of the timeline (the whole call when start = end = -1). Keyed by tensor, not
    by (tensor, version): a free names the version it last saw, not always the latest."""
    from torch.profiler._memory_profiler import Action

    live: dict = {}
    level = peak = 0
    peak_t, peak_live = -1, {}
    untracked = "untracked"  # allocations no tensor owns share one plain Key: a running sum
    for t, action, (key, version), nbytes in profiled.timeline:
        if _address(key) is None:
            sign = -1 if action == Action.DESTROY else 1 if action != Action.INCREMENT_VERSION else 0
            size = live.get(untracked, (0, False, 0))[0] + sign * nbytes
            live[untracked] = (size, False, 0)
            level += sign * nbytes
        elif action in (Action.PREEXISTING, Action.CREATE):
            if key in live:
                level -= live[key][0]
            live[key] = (nbytes, action == Action.PREEXISTING, version)
            level += nbytes
        elif action == Action.INCREMENT_VERSION:
            if key in live:
                size, pre, _ = live[key]
                live[key] = (size, pre, version + 1)
        elif action == Action.DESTROY:
            gone = live.pop(key, None)
            if gone is not None:
                level -= gone[0]
        inside = start < 0 or start <= t <= end
        if inside and level > peak:
            peak, peak_t, peak_live = level, t, dict(live)
    return peak, peak_t, peak_live


def untracked_at(profiled: Profiled, when: int) -> Counter:
    """Allocations no tensor owns, alive at `when`, by where they were made: the CPU matmul's own
    buffers (oneDNN packs a 16-bit operand; a GPU's cuBLAS keeps a fixed workspace instead) and
    the RNG states the trainer and checkpointing save."""
    alive: dict = {}
    for t, ptr, size, site in profiled.untracked:
        if t > when:
            break
        if size > 0:
            alive[ptr] = (size, site)
        else:
            alive.pop(ptr, None)
    out: Counter = Counter()
    for size, site in alive.values():
        name = ("CPU matmul buffers (not tensors)" if site.has("aten::mm", "aten::bmm", "aten::addmm")
                else "RNG states" if site.has("get_rng_state", "get_state") else "unattributed")
        out[name] += size
    return out


def parts_at(profiled: Profiled, live: dict, hidden_bytes: Iterable[int], when: int = -1) -> Counter:
    """Bytes per plan part at a moment: everything held before the step (by identity, whether
    the profile saw it or not) plus the live tensors the step made, and at `when` the
    allocations no tensor owns."""
    sizes = set(hidden_bytes)
    out: Counter = Counter()
    for name, nbytes in profiled.static.values():
        out[name] += nbytes
    if "untracked" in live:
        out.update(untracked_at(profiled, when))
    for key, (nbytes, pre, version) in live.items():
        if key == "untracked" or (pre and _address(key) in profiled.static):
            continue  # counted above
        category = profiled.categories.get(key, version) if _address(key) is not None else None
        name = category.name if category is not None else None
        out[part_of(key, profiled.sites.get(key), profiled, pre, sizes, nbytes, name)] += nbytes
    return out


def categories_at(profiled: Profiled, live: dict) -> Counter:
    """The profiler's own categories of the live tensors (for the record)."""
    out: Counter = Counter()
    for key, (nbytes, _pre, version) in live.items():
        category = profiled.categories.get(key, version) if _address(key) is not None else None
        out[category.name if category is not None else "none"] += nbytes
    return out


def _within(calls, outer: str, inner: str) -> list[tuple[int, int, str]]:
    """The `inner` calls made inside an `outer` call."""
    outers = [c for c in calls if outer in c[2]]
    return [c for c in calls if inner in c[2] and any(o[0] <= c[0] and c[1] <= o[1] for o in outers)]


def step_windows(profiled: Profiled) -> list[tuple[str, int, int]]:
    """(moment, start_ns, end_ns) for every chunk: the reference pass (the DPO family: the
    chunks run under _add_reference_sums), pass 1 (the chunks the micro-batched step runs
    before the first hidden-state kernel with a gradient), and per chunk of pass 3 the log-prob
    pass (from that kernel's call to the first recomputed block), the last block's recompute
    (torch.utils.checkpoint's recompute_fn of the first block the backward reaches) and its
    backward (from the end of that recompute to the next recompute, or the backward's end)."""
    calls = sorted(profiled.calls)
    kernel = [c for c in calls if KERNEL in c[2] and "weighted_logprob_sum_from_hidden" in c[2]]
    recomputes = [c for c in calls if "recompute_fn" in c[2]]
    backwards = [c for c in calls if BACKWARD in c[2]]
    windows = []
    reference = _within(calls, "_add_reference_sums", "_chunk_sums")
    windows += [(f"reference pass (adapter disabled) (chunk {i + 1})", c[0], c[1])
                for i, c in enumerate(reference)]
    first_kernel = kernel[0][0] if kernel else profiled.t_end
    pass_one = [c for c in _within(calls, "_micro_batched_backward", "_chunk_sums")
                if c[1] <= first_kernel]
    windows += [(f"no-grad forward (pass 1) (chunk {i + 1})", c[0], c[1])
                for i, c in enumerate(pass_one)]
    for i, (k_start, _k_end, _) in enumerate(kernel):
        after = [r for r in recomputes if r[0] > k_start]
        if not after:
            continue
        first = after[0]
        owner = next((b for b in backwards if b[0] <= first[0] <= b[1]), None)
        end = owner[1] if owner else first[1]
        following = [r[0] for r in after[1:] if r[0] <= end]
        chunk = f"(chunk {i + 1})"
        windows += [(f"log-prob pass {chunk}", k_start, first[0]),
                    (f"last block's recompute {chunk}", first[0], first[1]),
                    (f"last block's backward {chunk}", first[1], following[0] if following else end)]
    return windows
