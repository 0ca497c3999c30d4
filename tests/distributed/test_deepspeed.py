"""DeepSpeed ZeRO-2 / ZeRO-3 for real: `accelerate launch` with recipes/accelerate/deepspeed_zero*.yaml
on 2 CPU processes, through the worker of tests/helpers/accelerate_runs.py (the real `rrhf-lite train`), against
one process on the same global batch.

DeepSpeed is not a dependency of rrhf-lite, and these tests are `slow`: they need
`pip install --no-build-isolation deepspeed` (with build isolation pip would fetch a CUDA torch
to build it), and the first launch compiles DeepSpeed's CPU shared-memory collective op (about
5 minutes on 2 cores; cached in ~/.cache/torch_extensions afterwards). Without deepspeed they are
skipped, never counted as passing. Nothing in accelerate is bypassed here: DeepSpeed's CPU
accelerator (gloo, its own shm all-reduce) runs as on any CPU machine.
"""

from __future__ import annotations

import pytest
from helpers.accelerate_runs import (
    assert_same_adapter,
    check_results,
    launch,
    launch_config,
    one_process_adapter,
    trained_adapter,
    write_recipe,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage,four_bit", [(2, False), (3, False), (3, True)],
                         ids=["zero2-lora", "zero3-lora", "zero3-qlora"])
def test_deepspeed_two_processes_train_the_one_process_adapter(tiny_lm_dir, tmp_path, stage,
                                                                four_bit):
    pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")
    config = launch_config(tmp_path, f"deepspeed_zero{stage}")
    run_dir = tmp_path / "ds"
    recipe = write_recipe(tmp_path, tiny_lm_dir, run_dir, four_bit)
    proc, reports = launch(config, recipe, tmp_path / "reports")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    check_results(reports, run_dir)
    for r in reports:
        s = r["sharding"]
        assert s["distributed_type"] == "DistributedType.DEEPSPEED" and s["zero_stage"] == stage
        if stage == 3:  # the weight is partitioned: empty outside a forward, half on each rank
            assert s["weight_global"] == [0] and s["ds_local"] * 2 == _numel(s["ds_shape"])
            if four_bit:  # packed 4-bit in float32 storage (quant_storage "auto" under ZeRO-3)
                assert s["weight_class"] == "Params4bit" and s["ds_shape"] == [512, 1]
        else:  # ZeRO-2 keeps every weight whole on every rank
            assert s["weight_global"] == [64, 64] and s["ds_shape"] is None
    assert_same_adapter(trained_adapter(run_dir), one_process_adapter(tmp_path, tiny_lm_dir, four_bit))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
