"""FSDP2 for real: `accelerate launch` with recipes/accelerate/fsdp_qlora.yaml on 2 CPU processes.

The worker is tests/helpers/accelerate_runs.py run as the launched script (`accelerate launch
--config_file CFG --num_processes 2 THAT worker REPORT_DIR train RECIPE ...`): it calls the real `rrhf-lite` CLI
(`rrhf_lite.cli.main`) and records, per rank, what the test checks (engine, sharding, padding
chunks, which rank wrote the results). The test then runs the same recipe in one process with the
same global batch (per-device batch 2 = 2 ranks x 1) and compares the adapters.

What is bypassed, and only in the launched processes: accelerate (1.15) turns
`ACCELERATE_USE_FSDP` into DistributedType.FSDP only when the process group runs on an
accelerator (MULTI_GPU, MULTI_XPU, ...), never on MULTI_CPU, so on a CPU-only machine the FSDP
config is silently ignored and the ranks run plain data parallel. `fsdp_on_cpu` adds MULTI_CPU
to that one branch of AcceleratorState.__init__ (the two assignments accelerate makes there for
the GPU types); everything else is the real path: accelerate launch's FSDP environment, the FSDP2
plugin built from it, transformers' Trainer preparing the model with accelerate's
fsdp2_prepare_model (torch.distributed.fsdp.fully_shard per decoder layer, gloo), sharded
checkpoints, the gathered final adapter. (FSDP1's sync_module_states needs an accelerator too,
"There are currently no available devices found"; FSDP2 has no such key, so nothing else is
patched.)
"""

from __future__ import annotations

from pathlib import Path

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


def _check_fsdp_run(reports: list[dict], run_dir: Path, four_bit: bool, steps_run: int = 3) -> None:
    check_results(reports, run_dir, steps_run)
    for r in reports:
        s = r["sharding"]
        assert s["distributed_type"] == "DistributedType.FSDP" and s["fsdp_enabled"]
        assert s["layers_sharded"] == [True, True]  # one FSDP unit per decoder layer
        assert s["lora_is_dtensor"]  # the trainable LoRA weights are sharded too
        # the frozen base weight is a DTensor whose local shard is half the rows
        assert s["weight_class"] == "DTensor" and s["weight_local"][0] * 2 == s["weight_global"][0]
        if four_bit:  # packed 4-bit, stored as float32 (quant_storage "auto" under FSDP on CPU)
            assert s["weight_dtype"] == "torch.float32" and s["weight_global"] == [512, 1]
        else:
            assert s["weight_global"] == [64, 64]


@pytest.fixture(scope="module")
def fsdp_config(tmp_path_factory):
    return launch_config(tmp_path_factory.mktemp("fsdp_config"))


@pytest.mark.parametrize("four_bit", [
    False, pytest.param(True, marks=pytest.mark.slow, id="qlora")], ids=lambda b: "qlora" if b else "lora")
def test_fsdp_two_processes_train_the_one_process_adapter(fsdp_config, tiny_lm_dir, tmp_path, four_bit):
    run_dir = tmp_path / "fsdp"
    recipe = write_recipe(tmp_path, tiny_lm_dir, run_dir, four_bit)
    proc, reports = launch(fsdp_config, recipe, tmp_path / "reports")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    _check_fsdp_run(reports, run_dir, four_bit)
    # a sharded checkpoint per step: each rank wrote its own shard
    ckpt = run_dir / "round-1" / "train" / "checkpoint-3"
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert_same_adapter(trained_adapter(run_dir), one_process_adapter(tmp_path, tiny_lm_dir, four_bit))


@pytest.mark.slow
def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(fsdp_config, tiny_lm_dir,
                                                                          tmp_path):
    run_dir = tmp_path / "fsdp"
    recipe = write_recipe(tmp_path, tiny_lm_dir, run_dir, False)
    proc, _ = launch(fsdp_config, recipe, tmp_path / "killed", crash_after=2)
    train_dir = run_dir / "round-1" / "train"
    assert proc.returncode != 0
    assert (train_dir / "checkpoint-2" / "trainer_state.json").exists(), proc.stderr[-6000:]
    assert not (train_dir / "checkpoint-3").exists() and not (train_dir / "adapter").exists()

    proc, reports = launch(fsdp_config, recipe, tmp_path / "resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    output = proc.stdout + proc.stderr
    assert "resuming training from" in output and "checkpoint-2" in output, output[-3000:]
    _check_fsdp_run(reports, run_dir, False, steps_run=1)  # only step 3 ran again
    assert_same_adapter(trained_adapter(run_dir), one_process_adapter(tmp_path, tiny_lm_dir, False))


