"""benchmarks/plan_by_part.py and its profiler bookkeeping (benchmarks/_profiled_parts.py): the
rules that put a tensor in a plan part, the live-tensor walk, the moments' windows, and (slow) the
tiny run end to end against the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.profiler._memory_profiler import Action

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _profiled_parts as pp  # noqa: E402


@dataclass(frozen=True)
class _Storage:
    ptr: int


@dataclass(frozen=True)
class _Key:  # the profiler's TensorKey as the helpers read it: hashable, .storage.ptr
    storage: _Storage


@dataclass(frozen=True)
class _Plain:  # the profiler's plain Key: an allocation no tensor owns
    device: str = "cpu"


def _key(ptr):
    return _Key(_Storage(ptr))


def _profiled(**kw):
    return pp.Profiled(timeline=[], categories=None, sites={}, calls=[], **kw)


def test_part_rules_follow_where_a_tensor_was_made():
    prof = _profiled(static={1: ("4-bit weights", 10)}, grads={2}, lora_weight_bytes={64})
    recompute = ("aten::mul", "nn.Module: LlamaMLP_1", "torch/utils/checkpoint.py(1657): recompute_fn",
                 "torch/autograd/graph.py(966): _engine_run_backward")
    cases = [
        (_key(1), None, True, None, "4-bit weights"),
        (_key(9), None, True, None, "other held before the step"),
        (_key(2), pp.Site(("aten::mm",)), False, None, "LoRA gradients"),
        (_key(3), pp.Site(recompute), False, "AUTOGRAD_DETAIL", "recomputed block"),
        (_key(3), pp.Site(recompute), False, "TEMPORARY", "recompute transients"),
        (_key(3), pp.Site(("bitsandbytes::dequantize_4bit", *recompute)), False, None,
         "dequantised weight"),
        (_key(3), pp.Site(("aten::mul", "autograd::engine::evaluate_function: MulBackward0",
                           "torch/autograd/graph.py(966): _engine_run_backward")), False, None,
         "gradients in flight"),
        (_key(3), pp.Site(("aten::add", "nn.Module: LlamaDecoderLayer_0",
                           "torch/utils/checkpoint.py(354): checkpoint")), False, None,
         "checkpointed activations"),
        (_key(3), pp.Site(("aten::silu", "nn.Module: LlamaMLP_0", "nn.Module: LlamaDecoderLayer_0")),
         False, None, "forward activations (no graph)"),
        (_key(3), pp.Site(("aten::_to_copy", "aten::linear", "nn.Module: Linear4bit_2",
                           "nn.Module: LlamaDecoderLayer_0")), False, None,
         "LoRA weights, autocast copies"),
        (_key(3), pp.Site(("aten::_to_copy", "nn.Module: LlamaRMSNorm_4", "nn.Module: LlamaModel_0")),
         False, None, "final norm's saved input"),
        (_key(3), pp.Site(("aten::cat", "rrhf_lite/training/trainer.py(280): _add_reference_sums")),
         False, None, "reference log-prob sums"),
        (_key(3), pp.Site(("aten::_to_copy", "nn.Module: LlamaRotaryEmbedding_0")), False, None,
         "rotary tables + attention mask"),
        ("untracked", None, False, None, "unattributed"),
    ]
    for key, site, pre, category, want in cases:
        assert pp.part_of(key, site, prof, pre, set(), 64, category) == want, (site, want)


def test_live_walk_frees_by_tensor_and_sums_what_no_tensor_owns():
    a, b = _key(10), _key(20)
    prof = _profiled()
    prof.timeline = [(-1, Action.PREEXISTING, (a, 0), 100),
                     (2, Action.INCREMENT_VERSION, (a, 0), 100),
                     (3, Action.CREATE, (b, 0), 50),
                     (3, Action.CREATE, (_Plain(), 0), 30),
                     (4, Action.DESTROY, (a, 0), 100),  # names the version it saw, not the latest
                     (5, Action.DESTROY, (_Plain(), 0), 30),
                     (6, Action.CREATE, (a, 0), 20)]
    peak, when, live = pp.live_at(prof, -1, -1)
    assert (peak, when) == (180, 3) and set(live) == {a, b, "untracked"}
    assert live[a] == (100, True, 1)
    later, _, live = pp.live_at(prof, 5, 6)
    assert later == 70 and set(live) == {a, b, "untracked"} and live["untracked"][0] == 0


def test_windows_name_the_plans_moments_chunk_by_chunk():
    calls = [(0, 100, "rrhf_lite/training/trainer.py(370): _micro_batched_backward"),
             (1, 10, "rrhf_lite/training/trainer.py(264): _chunk_sums"),
             (11, 20, "rrhf_lite/training/trainer.py(264): _chunk_sums"),
             (21, 40, "rrhf_lite/training/trainer.py(264): _chunk_sums"),
             (25, 35, "kernels/rrhf_kernels/hidden.py(161): weighted_logprob_sum_from_hidden"),
             (41, 60, "torch/autograd/graph.py(966): _engine_run_backward"),
             (42, 48, "torch/utils/checkpoint.py(1657): recompute_fn"),
             (50, 55, "torch/utils/checkpoint.py(1657): recompute_fn")]
    prof = _profiled()
    prof.calls, prof.t_end = calls, 100
    windows = {name: (start, end) for name, start, end in pp.step_windows(prof)}
    assert windows["no-grad forward (pass 1) (chunk 1)"] == (1, 10)
    assert windows["no-grad forward (pass 1) (chunk 2)"] == (11, 20)
    assert windows["log-prob pass (chunk 1)"] == (25, 42)
    assert windows["last block's recompute (chunk 1)"] == (42, 48)
    assert windows["last block's backward (chunk 1)"] == (48, 50)
    assert not any(name.startswith("reference") for name in windows)


@pytest.mark.slow
def test_tiny_step_matches_the_plan_part_by_part(tmp_path):
    """The tiny width, profiled (about a minute on a busy 2-core CPU): at the step's peak every
    part the plan counts is within 5 % of the measurement, and so is the total."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_by_part.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("*plan_by_part.json")
    record = json.loads(path.read_text())
    assert record["environment"]["date"] and record["load_average_before"]
    peak = [r for r in record["rows"] if r["moment"].startswith("step peak")]
    counted = [r for r in peak if r["plan_mib"]]
    assert {r["part"] for r in counted} >= {"4-bit weights", "embeddings + head", "recomputed block",
                                             "recompute transients", "checkpointed activations",
                                             "total"}
    assert all(r["within_5pct"] for r in counted if r["part"] != "rotary tables + attention mask"), counted
