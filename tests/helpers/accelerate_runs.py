"""Runs of the real `rrhf-lite` CLI under `accelerate launch` on 2 CPU processes, for the FSDP and
DeepSpeed tests (tests/distributed/): the launched worker (this file run as a script), the launch,
the same recipe in one process, and the checks both tests share.

The worker records, per rank, what the tests check (engine, sharding, padding chunks, which rank
wrote the results). What is bypassed, and only in the launched processes: accelerate (1.15) turns
`ACCELERATE_USE_FSDP` into DistributedType.FSDP only when the process group runs on an
accelerator, never on MULTI_CPU; `fsdp_on_cpu` adds MULTI_CPU to that one branch (see
tests/distributed/test_fsdp.py's docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

if __name__ == "__main__":  # the launched worker: tests/ on sys.path, as pytest has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.recipes import train_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def alternating_k_rows(n=8):
    """k alternates 4, 2: with micro-batches of 2 the ranks run 2 and 1 chunks (padding runs)."""
    rows = []
    for i in range(n):
        k = 4 if i % 2 == 0 else 2
        rows.append({"prompt": f"Q{i}: rate me", "responses": ["good stuff", "fine", "bad", "meh"][:k],
                     "scores": [3.0, 2.0, 0.0, 1.0][:k]})
    return rows


# ------------------------------------------------------------------------------ the worker


def fsdp_on_cpu() -> None:
    """The one bypass (see the module docstring): FSDP on a MULTI_CPU process group."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
                and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def worker(report_dir: str, argv: list[str]) -> int:
    """Run the CLI on this rank; record what the test asserts. CRASH_AFTER_STEP=N: every rank
    exits without cleanup right after checkpoint N is saved (a killed run)."""
    import transformers
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import rrhf_lite.stages.train as train_stage
    from rrhf_lite.cli import main
    from rrhf_lite.training.trainer import RRHFTrainer
    from rrhf_lite.utils import distributed

    torch.set_num_threads(1)
    fsdp_on_cpu()
    report: dict = {"padding": [], "writes": [], "sharding": None}

    def record_sharding(trainer, model):
        base = trainer.accelerator.unwrap_model(model).get_base_model()
        layers = base.model.layers
        weight = layers[0].self_attn.q_proj.base_layer.weight
        plugin = trainer.accelerator.state.deepspeed_plugin
        report["sharding"] = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp_enabled": trainer.is_fsdp_enabled,
            "layers_sharded": [isinstance(layer, FSDPModule) for layer in layers],
            "weight_class": type(weight).__name__,
            "weight_global": list(weight.shape),
            "weight_local": list(weight.to_local().shape) if isinstance(weight, DTensor) else None,
            "weight_dtype": str(weight.dtype),
            "lora_is_dtensor": isinstance(layers[0].self_attn.q_proj.lora_A["default"].weight, DTensor),
            "checkpointing": bool(base.is_activation_checkpointing),
            "world_size": trainer.accelerator.num_processes,
            # DeepSpeed: the ZeRO stage, and under ZeRO-3 the weight's full shape and this rank's
            # partition (the parameter itself is then empty outside a forward)
            "zero_stage": plugin.zero_stage if plugin is not None else None,
            "ds_shape": list(weight.ds_shape) if hasattr(weight, "ds_shape") else None,
            "ds_local": weight.ds_tensor.numel() if hasattr(weight, "ds_tensor") else None,
        }

    step, padding = RRHFTrainer.training_step, RRHFTrainer._padding_chunks

    def training_step(self, model, inputs, num_items_in_batch=None):
        if report["sharding"] is None:
            record_sharding(self, model)
        return step(self, model, inputs, num_items_in_batch)

    def padding_chunks(self, chunks):
        n = padding(self, chunks)
        report["padding"].append(n)
        return n

    RRHFTrainer.training_step, RRHFTrainer._padding_chunks = training_step, padding_chunks

    def recording(name, fn):
        def call(path, *args, **kwargs):
            report["writes"].append([name, Path(path).name])
            return fn(path, *args, **kwargs)
        return call

    for name in ("atomic_directory", "write_json", "write_jsonl"):  # the train stage's writers
        setattr(train_stage, name, recording(name, getattr(train_stage, name)))

    crash_after = os.environ.get("CRASH_AFTER_STEP")
    save = transformers.Trainer._save_checkpoint

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if crash_after == str(self.state.global_step):
            distributed.barrier()  # every rank has written its shards of this checkpoint
            os._exit(3)

    transformers.Trainer._save_checkpoint = save_then_crash
    code = main(argv)
    report["rank"], report["code"] = distributed.rank(), code
    (Path(report_dir) / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    return code


# ------------------------------------------------------------------------------ the test side


def launch_config(tmp_path: Path, name: str = "fsdp_qlora") -> Path:
    """A shipped accelerate recipe, with use_cpu: true (its one CPU change)."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    raw["use_cpu"] = True
    path = tmp_path / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_recipe(tmp_path: Path, model_dir, run_dir: Path, load_in_4bit: bool) -> Path:
    data = tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alternating_k_rows()))
    train = {"max_steps": 3, "per_device_train_batch_size": 1, "candidate_micro_batch_size": 2,
             "gradient_checkpointing": True, "learning_rate": 2e-2, "lr_scheduler_type": "constant",
             "save_steps": 1, "save_total_limit": None, "extra": {"disable_tqdm": True}}
    return train_recipe(tmp_path / f"recipe-{run_dir.name}.yaml", model_dir, data, run_dir,
                        quantization={"load_in_4bit": load_in_4bit}, train=train)


def launch(config: Path, recipe: Path, report_dir: Path, crash_after: int | None = None):
    report_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    if crash_after is not None:
        env["CRASH_AFTER_STEP"] = str(crash_after)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(free_port()), __file__, "worker",
           str(report_dir), "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    reports = [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]
    return proc, reports


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "round-1" / "train" / "adapter" / "adapter_model.safetensors"))


def one_process_adapter(tmp_path: Path, model_dir, load_in_4bit: bool) -> dict[str, torch.Tensor]:
    """The same recipe in this process, per-device batch 2 = the 2 ranks' global batch."""
    from rrhf_lite.cli import main

    run_dir = tmp_path / "single"
    recipe = write_recipe(tmp_path, model_dir, run_dir, load_in_4bit)
    assert main(["train", str(recipe), "--set", "train.per_device_train_batch_size=2"]) == 0
    return trained_adapter(run_dir)


def assert_same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # training moved the adapter (PEFT starts lora_B at 0): the comparison means something
    assert max(float(v.abs().max()) for n, v in want.items() if "lora_B" in n) > 1e-3


def check_results(reports: list[dict], run_dir: Path, steps_run: int = 3) -> None:
    """Both ranks ran every step in step with each other; only the main process wrote."""
    assert [r["rank"] for r in reports] == [0, 1] and all(r["code"] == 0 for r in reports)
    assert all(r["sharding"]["world_size"] == 2 and r["sharding"]["checkpointing"] for r in reports)
    # one padding decision per training step on every rank (collective, so the counts agree)
    assert [len(r["padding"]) for r in reports] == [steps_run, steps_run]
    if steps_run == 3:  # ranks saw different k at least once, so zero-weight padding chunks ran
        assert any(n > 0 for r in reports for n in r["padding"])
    assert [w[1] for w in reports[0]["writes"]] == ["adapter", "metrics.jsonl", "train_summary.json"]
    assert reports[1]["writes"] == []
    train_dir = run_dir / "round-1" / "train"
    summary = json.loads((train_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert sorted(p.name for p in (train_dir / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "rrhf_lite.json",
        "tokenizer.json", "tokenizer_config.json"]


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    sys.exit(worker(sys.argv[2], sys.argv[3:]))
