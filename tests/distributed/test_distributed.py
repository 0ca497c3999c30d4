"""rrhf-lite under torchrun: 2 CPU processes (gloo) against one process on the same global batch.

The torchrun worker is this file run as a script (`python -m torch.distributed.run ... THIS
worker ARGS`): it trains a few RRHF steps with `run_train` (4-bit NF4 + LoRA on CPU, micro-batched
candidates with k varying between ranks), saves each rank's LoRA weights to its own file, samples
greedily through `distributed_map(sample_candidates)` and checks that an error on one rank reaches
every rank. The test then runs the same steps in one process (per-device batch 2 = the global
batch of 2 ranks x 1) and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.distributed import distributed_map, is_main_process, shard_bounds, world_size

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)  # no dropout: masks would differ by batch
PROMPTS = [{"prompt": p} for p in ("hello", "a longer prompt here", "abc", "xyz 12", "q")]
GREEDY = {"model": "policy", "method": "greedy"}


def _rows(n=8):
    """k alternates 4, 2 (so micro-batches of 2 give ranks 2 and 1 chunks: padding runs)."""
    rows = []
    for i in range(n):
        k = 4 if i % 2 == 0 else 2
        responses = ["good stuff", "fine", "bad", "meh"][:k]
        rows.append({"prompt": f"Q{i}: rate me", "responses": responses,
                     "scores": [3.0, 2.0, 0.0, 1.0][:k]})
    return rows


def _config(out, batch):
    from rrhf_lite.training.trainer import RRHFConfig

    return RRHFConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=3,
                      learning_rate=2e-2, lr_scheduler_type="constant", optim="adamw_torch",
                      max_length=32, max_prompt_length=16, candidate_micro_batch_size=2,
                      logprob_backend="torch", save_strategy="no", disable_tqdm=True, seed=0,
                      dataloader_pin_memory=False, use_cpu=True)


def _train(model_dir, data, out, batch, callbacks=None):
    from rrhf_lite.models.training_loader import ModelArguments
    from rrhf_lite.stages.train import run_train

    torch.manual_seed(0)  # the LoRA init draws from the global RNG: the same on every rank
    args = ModelArguments(str(model_dir), **LORA)
    return run_train(data, args, _config(out, batch), callbacks=callbacks)


def _lora_weights(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _sample(model_dir, prompts, seed=0):
    from rrhf_lite.models.inference_loader import load_causal_lm
    from rrhf_lite.stages.sample import sample_candidates

    model, tokenizer = load_causal_lm(str(model_dir), device="cpu")
    return sample_candidates(prompts, generators=[GREEDY], include_dataset_responses=False,
                             max_new_tokens=6, batch_size=2, seed=seed,
                             models={"policy": (model, tokenizer)}, progress=False)


# ------------------------------------------------------------------------------ the worker


def _worker(model_dir: str, out: str) -> None:
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from rrhf_lite.training.trainer import RRHFTrainer
    from rrhf_lite.utils import distributed

    out_dir = Path(out)
    me = distributed.rank()
    padding_seen = []
    original = RRHFTrainer._padding_chunks

    def recording(self, chunks):  # record how often this rank ran padding chunks
        n = original(self, chunks)
        padding_seen.append(n)
        return n

    RRHFTrainer._padding_chunks = recording

    class SaveRankWeights(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights = {k: v.detach().clone().contiguous() for k, v in model.named_parameters()
                       if v.requires_grad}
            save_file(weights, str(out_dir / f"rank{me}.safetensors"))

    _train(model_dir, _rows(), out_dir / "train", batch=1, callbacks=[SaveRankWeights()])
    # block_size = the generation batch: every rank runs the batches one process would
    sampled = distributed.distributed_map(
        lambda shard, offset: _sample(model_dir, shard, seed=offset), PROMPTS, block_size=2,
        pass_offset=True)

    def fail_on_rank_1(shard):
        if distributed.rank() == 1:
            raise UserInputError("bad row", where="rank-1 data", hint="fix it")
        return shard

    try:
        distributed.distributed_map(fail_on_rank_1, list(range(4)))
        error = None
    except UserInputError as err:
        error = str(err)
    gathered = distributed.all_gather_object(me)
    report = {"rank": me, "world_size": distributed.world_size(), "padding": padding_seen,
              "error": error, "gathered": gathered, "sampled": sampled,
              "main": distributed.is_main_process()}
    (out_dir / f"report{me}.json").write_text(json.dumps(report))
    distributed.barrier()


# ------------------------------------------------------------------------------ unit tests


def test_shard_bounds_cover_every_row_once_on_block_boundaries():
    for n in range(0, 23):
        for shards in (1, 2, 3, 5):
            for block in (1, 2, 4):
                bounds = [shard_bounds(n, shards, r, block) for r in range(shards)]
                assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
                assert all(a % block == 0 for a, b in bounds if a < b)
                sizes = [(b - a + block - 1) // block for a, b in bounds]
                assert max(sizes) - min(sizes) <= 1  # balanced in blocks
    with pytest.raises(ValueError):
        shard_bounds(3, 2, 2)


def test_distributed_map_in_one_process_is_fn(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1 and is_main_process()
    rows = list(range(5))
    assert distributed_map(lambda s: [x + 1 for x in s], rows) == [1, 2, 3, 4, 5]
    assert distributed_map(lambda s, off: [off] * len(s), rows, pass_offset=True) == [0] * 5
    assert distributed_map(lambda s: s[:2], rows) == [0, 1]  # fn may drop rows


def test_metric_totals_combine_like_one_big_batch():
    """Two ranks' logged windows reduce to what one process with both batches logs."""
    from rrhf_lite.training.trainer import RRHFTrainer

    rank0 = {"loss/total": [1.0, 3.0], "rank/accuracy": [1.0, 0.5], "rank/pairs": [2.0, 4.0]}
    rank1 = {"loss/total": [2.0, 2.0], "rank/accuracy": [0.0, 1.0], "rank/pairs": [1.0, 1.0]}
    out = RRHFTrainer.combine_rank_totals(
        [RRHFTrainer._metric_totals(rank0), RRHFTrainer._metric_totals(rank1)])
    assert out["loss/total"] == pytest.approx(2.0)
    # correct pairs: 2 + 2 + 0 + 1 = 5 of 8
    assert out["rank/accuracy"] == pytest.approx(5 / 8)
    # pairs per global step: (2 + 4) / 2 + (1 + 1) / 2
    assert out["rank/pairs"] == pytest.approx(4.0)
    single = RRHFTrainer.combine_rank_totals([RRHFTrainer._metric_totals(rank0)])
    assert single == pytest.approx(RRHFTrainer.aggregate_metrics(rank0))


def test_quant_storage_follows_sharded_engine(monkeypatch):
    from rrhf_lite.models.training_loader import resolve_quant_storage

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_quant_storage("auto", torch.bfloat16) == torch.uint8
    assert resolve_quant_storage("bfloat16", torch.float32) == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_quant_storage("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(UserInputError, match="bnb_4bit_quant_storage"):
        resolve_quant_storage("uint8", torch.bfloat16)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert resolve_quant_storage("auto", torch.float16) == torch.uint8
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_quant_storage("auto", torch.float16) == torch.float16
    with pytest.raises(UserInputError):
        resolve_quant_storage("int4", torch.float16)


def test_fsdp_qlora_load_has_one_dtype_per_frozen_weight(monkeypatch, tiny_lm_dir):
    """FSDP flattens a block's weights into one tensor: with storage = bf16, no fp32 up-cast."""
    from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    torch.manual_seed(0)
    model, _ = load_model_for_training(ModelArguments(
        str(tiny_lm_dir), torch_dtype="bfloat16", bnb_4bit_compute_dtype="bfloat16", **LORA))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    quant = model.base_model.model.config.quantization_config
    storage = quant["bnb_4bit_quant_storage"] if isinstance(quant, dict) else quant.bnb_4bit_quant_storage
    assert "bfloat16" in str(storage)
    assert any(p.requires_grad for p in model.parameters())


def test_padding_chunks_add_nothing_to_the_gradient(tiny_lm_dir, tmp_path):
    """The zero-weight chunks that keep sharded engines in step leave the gradient unchanged."""
    from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
    from rrhf_lite.training.trainer import RRHFTrainer

    torch.manual_seed(0)
    model, tokenizer = load_model_for_training(ModelArguments(str(tiny_lm_dir), **LORA))
    trainer = RRHFTrainer(model=model, args=_config(tmp_path, batch=2), train_dataset=_rows(2),
                          processing_class=tokenizer)
    trainer.create_optimizer()
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)]))
    chunks = trainer._chunks(len(inputs["input_ids"]))
    grads = []
    for padding in (0, 2):
        model.zero_grad()
        loss, _ = trainer._micro_batched_backward(model, inputs, chunks, 1.0, padding)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def test_accelerate_recipes_load_with_the_settings_qlora_needs():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP", "deepspeed_zero2": "DEEPSPEED",
             "deepspeed_zero3": "DEEPSPEED"}
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(kinds)
    for name, kind in kinds.items():
        config = load_config_from_file(str(RECIPES / f"{name}.yaml"))  # accelerate's own parser
        assert config.distributed_type.name == kind, name
        raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
        # mixed precision and accumulation come from the recipe, never from two places
        assert raw["mixed_precision"] == "no"
        assert "gradient_accumulation_steps" not in raw.get("deepspeed_config", {})
    fsdp = load_config_from_file(str(RECIPES / "fsdp_qlora.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2  # fully_shard; tests/distributed/test_fsdp.py runs this file on CPUs
    # FSDP1-only keys: FSDP2 refuses forward_prefetch, ignores the others with a warning
    for key in ("fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_forward_prefetch",
                "fsdp_backward_prefetch", "fsdp_sharding_strategy"):
        assert key not in fsdp, key
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_activation_checkpointing"] is False  # rrhf-lite checkpoints itself
    zero3 = load_config_from_file(str(RECIPES / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True


# ------------------------------------------------------------------------------ 2 processes


ABORTED_RANK = "terminate called without an active exception"


@pytest.fixture(scope="module")
def torchrun_run(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "worker", str(tiny_lm_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ABORTED_RANK in proc.stderr:
        # Seen once in a full run (2026-12-03), never in 6 runs of this module alone: a rank
        # aborted inside the C++ runtime ("terminate called without an active exception",
        # exit -6) between stages, with no Python error. One fresh try, so that a native crash
        # outside our code does not fail CI; a second crash, or any other failure, fails.
        warnings.warn(f"a rank aborted in native code; trying once more:\n{proc.stderr[-2000:]}",
                      stacklevel=2)
        out = tmp_path_factory.mktemp("ddp_retry")
        cmd[-1] = str(out)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [json.loads((out / f"report{r}.json").read_text()) for r in (0, 1)]
    return out, reports


def test_two_ranks_train_the_same_adapter_as_one_process(torchrun_run, tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    out, reports = torchrun_run
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["main"] for r in reports] == [True, False]
    assert reports[0]["gathered"] == [0, 1]
    # ranks saw different k at least once, so zero-weight padding chunks ran
    assert any(n > 0 for r in reports for n in r["padding"])

    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:  # DDP: identical all-reduced gradients -> bitwise identical weights
        assert torch.equal(rank0[name], rank1[name]), name

    # only the main process wrote the result: one adapter, no partial directories left
    train_dir = out / "train"
    saved = _lora_weights(train_dir / "adapter")
    assert sorted(p.name for p in train_dir.iterdir()) == [
        "adapter", "metrics.jsonl", "train_summary.json"]
    summary = json.loads((train_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3

    single_dir = _train(tiny_lm_dir, _rows(), tmp_path / "single", batch=2)
    single = _lora_weights(single_dir)
    assert saved.keys() == single.keys()
    moved = 0.0
    for name, value in single.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((value - _initial_lora(tiny_lm_dir)[name]).abs().max()))
    assert moved > 1e-3  # training changed the adapter, so the comparison means something

    # metrics were reduced across ranks: they match the single process's global batches
    def train_logs(path):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return [r for r in rows if "loss/total" in r]

    multi, one = train_logs(train_dir / "metrics.jsonl"), train_logs(tmp_path / "single" / "metrics.jsonl")
    assert len(multi) == len(one) == 3
    for a, b in zip(multi, one, strict=True):
        for key in ("loss", "loss/total", "loss/rank", "loss/sft", "rank/accuracy", "rank/pairs",
                    "scores/best"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


_INITIAL: dict = {}


def _initial_lora(model_dir) -> dict[str, torch.Tensor]:
    """The LoRA weights before training (same seed as _train), keyed as in the saved file."""
    if not _INITIAL:
        from peft import get_peft_model_state_dict

        from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training

        torch.manual_seed(0)
        model, _ = load_model_for_training(ModelArguments(str(model_dir), **LORA))
        _INITIAL.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
    return _INITIAL


def test_two_ranks_sample_what_one_process_samples(torchrun_run, tiny_lm_dir):
    _, reports = torchrun_run
    expected = _sample(tiny_lm_dir, PROMPTS)
    assert len(expected) == len(PROMPTS)
    assert reports[0]["sampled"] == expected
    assert reports[1]["sampled"] == expected


def test_an_error_on_one_rank_reaches_every_rank(torchrun_run):
    _, reports = torchrun_run
    for report in reports:
        assert report["error"] is not None and "rank-1 data" in report["error"]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
