"""bitsandbytes' two CPU paths for 4-bit layers, on any machine (the cpu_4bit_path fixture).

On a CPU with AVX512-BF16, bitsandbytes repacks an eval-mode 4-bit layer for a fused bf16 kernel
the first time it runs without grad; that repacking crashes for shapes that are not whole blocks
(in_features % 64, out_features % 32), and a packed layer has no backward. rrhf_lite.models.cpu_4bit
decides each layer's path at load time. These tests run both paths on every machine.
"""

from __future__ import annotations

import json
import logging

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import yaml
from helpers.fused_4bit_emulation import packed_matmul, unpack_code_indices

from rrhf_lite.builtin.tiny import save_tiny_causal_lm
from rrhf_lite.cli import main
from rrhf_lite.models import cpu_4bit
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

# hidden 64, intermediate 96: q/k/v/o/gate/up read 64 features (whole blocks), down_proj reads
# 96 (not a multiple of 64), so one model holds layers of both kinds.
MIXED = {"hidden_size": 64, "intermediate_size": 96}


@pytest.fixture(scope="module")
def mixed_lm_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("mixed_lm") / "model", seed=3, **MIXED)


def _quantised_linear(in_features, out_features, *, double_quant, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     module=layer)
    return layer.to("cpu")  # quantises


def _dequantised(layer) -> torch.Tensor:
    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()


# ------------------------------------------------------------------- the emulation is faithful


@pytest.mark.parametrize("shape", [(32, 64), (96, 192), (64, 128)])
def test_emulated_packed_layout_reads_back_every_index(shape):
    out_features, in_features = shape
    layer = _quantised_linear(in_features, out_features, double_quant=False)
    nibbles = layer.weight.data.view(torch.uint8).reshape(-1)
    indices = torch.stack([nibbles >> 4, nibbles & 0xF], dim=1).reshape(out_features, in_features)
    packed, _ = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(unpack_code_indices(packed, out_features, in_features), indices.int())


def test_emulated_kernel_computes_the_layer_in_bf16():
    layer = _quantised_linear(128, 64, double_quant=True)
    x = torch.randn(3, 5, 128)
    exact = x @ _dequantised(layer).t()
    packed, state = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    got = packed_matmul(x, packed, state)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    error = (got.float() - exact).abs().max().item()
    assert 0 < error < 2e-2 * exact.abs().max().item()  # bf16 rounding, and only that


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes' "
                    "native fused kernel cannot run here, so the emulation stands in for it")
def test_emulated_kernel_matches_the_native_one():
    layer = _quantised_linear(192, 96, double_quant=True)
    x = torch.randn(4, 192)
    packed, state = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    native = bnbf.gemv_4bit(x.to(torch.bfloat16), packed, state=state)
    torch.testing.assert_close(packed_matmul(x, packed, state).float(), native.float(),
                               rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------- per-layer choice


def test_fused_only_where_the_shape_allows(mixed_lm_dir, char_tokenizer, cpu_4bit_path):
    model, _ = load_causal_lm(str(mixed_lm_dir), load_in_4bit=True, device="cpu")
    layers = cpu_4bit.linear4bit_layers(model)
    assert len(layers) == 14
    ids = char_tokenizer("copy abc=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    fused = {name for name, m in model.named_modules() if m in layers and cpu_4bit.has_fused_copy(m)}
    assert not any(cpu_4bit.is_packed(m) for m in layers)  # the weights themselves stay exact
    if cpu_4bit_path == "fused":
        assert len(fused) == 12 and not any("down_proj" in name for name in fused)
        assert cpu_4bit.compute_path(model)["path"] == "mixed"
    else:
        assert not fused and cpu_4bit.compute_path(model)["path"] == "dequantize"
    # The same logits as the path training takes, up to bf16 rounding where fused.
    exact, _ = load_causal_lm(str(mixed_lm_dir), load_in_4bit=True, device="cpu",
                              fused_cpu_4bit=False)
    with torch.no_grad():
        reference = exact(input_ids=ids).logits
    assert cpu_4bit.compute_path(exact)["fused_layers"] == 0
    tolerance = 2e-2 if cpu_4bit_path == "fused" else 1e-6
    assert (fast - reference).abs().max().item() <= tolerance * reference.abs().max().item()


@pytest.mark.parametrize("double_quant", [True, False])
def test_unpack_restores_the_weights_up_to_bf16_scales(double_quant, cpu_4bit_path):
    layer = _quantised_linear(128, 64, double_quant=double_quant)
    before = _dequantised(layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert cpu_4bit.is_packed(layer) == (cpu_4bit_path == "fused")
    if cpu_4bit.is_packed(layer):
        cpu_4bit.unpack(layer)
    assert not cpu_4bit.is_packed(layer)
    after = _dequantised(layer)
    # packing rounded each block's scale to bf16 (8 bits): nothing else may change
    assert (after - before).abs().max().item() <= 2 ** -8 * before.abs().max().item()
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ after.t(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- training never packs


def _rows(n=4):
    return [{"prompt": f"copy {c}=", "responses": [c, c + c, "x"], "scores": [1.0, 0.5, 0.0]}
            for c in "abcdefgh"[:n]]


def test_evaluation_does_not_pack_a_model_that_trains(mixed_lm_dir, tmp_path, cpu_4bit_path):
    model, tokenizer = load_model_for_training(ModelArguments(
        model_name_or_path=str(mixed_lm_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
        gradient_checkpointing=False))
    config = RRHFConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2,
                        candidate_micro_batch_size=2, per_device_train_batch_size=2,
                        save_strategy="no", report_to="none", use_cpu=True,
                        logprob_backend="torch")
    trainer = RRHFTrainer(model=model, args=config, train_dataset=_rows(), eval_dataset=_rows(),
                          processing_class=tokenizer)
    first = trainer.evaluate()  # eval mode, no grad: where bitsandbytes would pack
    layers = cpu_4bit.linear4bit_layers(model)
    assert layers and not any(cpu_4bit.is_packed(m) for m in layers)
    trainer.train()
    assert not any(cpu_4bit.is_packed(m) for m in layers)
    # Evaluation computed what training computes: the same loss in train mode, same weights.
    trainer2 = RRHFTrainer(model=model, args=config, eval_dataset=_rows(),
                           processing_class=tokenizer)
    assert trainer2.evaluate()["eval_loss/total"] != first["eval_loss/total"]  # it trained
    batch = trainer2.data_collator([trainer2.eval_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        eval_loss = trainer2.compute_loss(model, batch)
    model.train()
    with torch.no_grad():
        train_loss = trainer2.compute_loss(model, batch)
    assert eval_loss.item() == pytest.approx(train_loss.item(), rel=1e-6)


def test_a_model_packed_before_training_is_unpacked_with_a_warning(mixed_lm_dir, tmp_path,
                                                                   cpu_4bit_path, caplog):
    model, tokenizer = load_causal_lm(str(mixed_lm_dir), load_in_4bit=True, device="cpu")
    layers = cpu_4bit.linear4bit_layers(model)
    copies = sum(cpu_4bit.has_fused_copy(m) for m in layers)
    assert copies == (12 if cpu_4bit_path == "fused" else 0)
    # bitsandbytes left to itself (a model evaluated outside rrhf-lite's loaders) packs in place
    for m in layers:
        cpu_4bit.detach_fused_copy(m)
        m.support_avx512bf16_for_cpu = cpu_4bit.fused_kernel_available() and cpu_4bit.packable(m)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6]]))
    packed = sum(cpu_4bit.is_packed(m) for m in layers)
    assert packed == copies
    with caplog.at_level(logging.WARNING, logger="rrhf_lite.models.cpu_4bit"):
        assert cpu_4bit.configure_for_training(model) == packed
    assert not any(cpu_4bit.is_packed(m) or cpu_4bit.has_fused_copy(m) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    assert ("unpacked" in caplog.text) == bool(packed)


# ------------------------------------------------------------------- the whole pipeline


def test_odd_shaped_4bit_model_samples_trains_evaluates_merges_generates(
        mixed_lm_dir, tmp_path, cpu_4bit_path, capsys):
    """A user's model whose down_proj reads 96 features: every stage in 4-bit on the CPU."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"copy {c}="}) + "\n" for c in "abcd"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"name_or_path": str(mixed_lm_dir)},
        "stages": ["sample", "score", "train", "evaluate", "merge"],
        "quantization": {"load_in_4bit": True},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"prompts": str(prompts), "eval_prompts": str(prompts)},
        "sampling": {"generators": [{"method": "top_p", "num_candidates": 3}],
                     "max_new_tokens": 4, "include_dataset_responses": False},
        "scoring": {"reward_function": "rrhf_lite.builtin.tiny.tasks:reward"},
        "train": {"max_steps": 2, "gradient_checkpointing": False, "logprob_backend": "torch",
                  "max_length": 32, "max_prompt_length": 16, "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "save_steps": 1000},
        "evaluate": {"max_new_tokens": 4},
        "merge": {"torch_dtype": "float32", "roundtrip_nf4": True},
    }))
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["ok"]
    # the merge check runs on training's path whatever sampling took (see merge_checks)
    assert report["policy_verification"]["compute_path"]["path"] == "dequantize"
    assert json.loads((run / "metrics.json").read_text())["metrics"]["variants"]["rrhf"]
    capsys.readouterr()
    adapter = run / "round-1" / "train" / "adapter"
    assert main(["generate", "--model", str(mixed_lm_dir), "--adapter", str(adapter),
                 "--load-in-4bit", "--prompt", "copy ab=", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


# ------------------------------------------------------------------- the optional-kernel warning


def test_optional_kernel_warning_is_kept_out_of_the_output(caplog):
    """On AVX512-BF16 CPUs without Hugging Face's `kernels` package bitsandbytes warns at import
    that it failed to load a hub kernel; nothing is wrong, so users must not see it."""
    import rrhf_lite  # noqa: F401  (installs the filter)

    source = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.DEBUG):
        source.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                       "make sure you already `pip install kernels`", "No module named 'kernels'")
        source.warning("some other bitsandbytes warning")
    shown = [r.getMessage() for r in caplog.records if r.name == source.name]
    assert shown == ["some other bitsandbytes warning"]
    said = [r for r in caplog.records if r.name == "rrhf_lite.models.cpu_4bit"]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG and "nothing is wrong" in said[0].getMessage()


def test_recipe_can_keep_inference_off_the_fused_kernel(mixed_lm_dir, tmp_path, cpu_4bit_path):
    """quantization.fused_cpu_kernel: false reaches sampling and evaluation; the merge check
    is on the dequantise path either way."""
    from rrhf_lite.config.recipe import parse_recipe
    from rrhf_lite.stages.merge import merge_adapter

    recipe = parse_recipe({"model": {"name_or_path": str(mixed_lm_dir)},
                           "quantization": {"fused_cpu_kernel": False}, "stages": ["merge"]})
    kwargs = recipe.policy_load_kwargs()
    assert kwargs["fused_cpu_4bit"] is False
    model, _ = load_causal_lm(str(mixed_lm_dir), device="cpu", **kwargs)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6]]))
    assert cpu_4bit.compute_path(model)["path"] == "dequantize"

    adapter = tmp_path / "adapter"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(mixed_lm_dir)),
                   LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(adapter)
    report = merge_adapter(mixed_lm_dir, adapter, tmp_path / "merged", torch_dtype="float32",
                           roundtrip_nf4=True)
    assert report["ok"] and report["policy_verification"]["compute_path"]["path"] == "dequantize"
