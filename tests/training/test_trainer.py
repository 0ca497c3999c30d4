"""RRHFTrainer on a tiny random LLaMA in 4-bit NF4 + LoRA, on CPU.

Exact micro-batched gradient, learning, frozen 4-bit base, resume, kernel vs torch path,
the train stage's outputs, and config errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.trainer_steps import (
    first_batch,
    lora_grads,
    lora_model,
    lora_params,
    randomise_lora_b,
    ranked_rows,
    rrhf_config,
    step_grads,
    weighted_trainer,
)

from rrhf_lite.errors import UserInputError
from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer


@pytest.fixture(scope="module")
def grad_setup(small_lm_dir, tmp_path_factory):
    model, tok = lora_model(small_lm_dir)
    randomise_lora_b(model)
    trainer = weighted_trainer(model, tok, tmp_path_factory.mktemp("g"))
    return trainer, first_batch(trainer)


def test_micro_batched_gradient_equals_full_batch(grad_setup):
    trainer, batch = grad_setup
    n = len(batch["input_ids"])
    assert n >= 7 and batch["candidate_mask"].sum() == n  # several prompts, different k
    full_loss, full = step_grads(trainer, batch, None)
    assert any(g.abs().max() > 0 for g in full.values())
    for micro in (1, 2, 3, n - 1):
        loss, grads = step_grads(trainer, batch, micro)
        assert loss == pytest.approx(full_loss, rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, full[name], rtol=1e-4, atol=1e-6, msg=f"{name} micro={micro}")


def test_naive_per_chunk_loss_would_differ(grad_setup):
    # guards the test above: ignoring the coupling between candidates gives another gradient
    trainer, batch = grad_setup
    _, full = step_grads(trainer, batch, None)
    trainer.model.zero_grad(set_to_none=True)
    trainer.args.candidate_micro_batch_size = 2
    inputs = trainer._prepare_inputs(dict(batch))
    for part in trainer._chunks(len(inputs["input_ids"])):
        s, c = trainer._chunk_sums(trainer.model, inputs, part)
        sums = torch.zeros(len(inputs["input_ids"]))
        sums = sums.index_copy(0, torch.arange(part.start, part.stop), s)
        counts = torch.ones(len(inputs["input_ids"]), dtype=torch.long)
        counts[part] = c
        loss, _ = trainer.loss_from_sums(sums, counts, inputs)
        loss.backward()
    naive = lora_grads(trainer.model)
    assert any(not torch.allclose(naive[k], full[k], rtol=1e-3, atol=1e-6) for k in full)


def test_dropout_masks_match_between_passes(small_lm_dir, tmp_path):
    """With LoRA dropout, pass 3 must replay pass 1's masks: compare with one graph over the same
    chunks from the same RNG state (any mismatch in masks changes the gradient)."""
    model, tok = lora_model(small_lm_dir, lora_dropout=0.3)
    randomise_lora_b(model)
    trainer = RRHFTrainer(model=model, args=rrhf_config(tmp_path, candidate_micro_batch_size=2),
                          train_dataset=ranked_rows(), processing_class=tok)
    batch = first_batch(trainer)
    state = torch.get_rng_state()
    _, two_pass = step_grads(trainer, batch, 2)
    after_two_pass = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    model.train()
    loss, _ = trainer._full_loss(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_two_pass)  # RNG left as one pass leaves it
    one_graph = lora_grads(model)
    for name, g in two_pass.items():
        torch.testing.assert_close(g, one_graph[name], rtol=1e-4, atol=1e-6)


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_training_learns_lora_only(small_lm_dir, tmp_path):
    model, tok = lora_model(small_lm_dir, lora_r=8, lora_alpha=16)
    rows = ranked_rows(6)
    trainer = RRHFTrainer(model=model, args=rrhf_config(tmp_path, max_steps=16, learning_rate=1e-2,
                                                    candidate_micro_batch_size=3),
                          train_dataset=rows, eval_dataset=rows, processing_class=tok)
    linear4 = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "base should be 4-bit"
    before = _snapshot(model)
    first = trainer.evaluate()
    trainer.train()
    last = trainer.evaluate()
    assert last["eval_loss/total"] < first["eval_loss/total"] - 0.05
    assert last["eval_rank/accuracy"] > first["eval_rank/accuracy"]
    assert last["eval_rank/margin"] > first["eval_rank/margin"]
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    # every step logged the RRHF metrics
    steps = [h for h in trainer.state.log_history if "loss/rank" in h and "eval_loss/total" not in h]
    assert len(steps) == 16
    assert {"loss/sft", "rank/accuracy", "rank/margin", "rank/pairs"} <= set(steps[0])


def _final_lora(model):
    return {n: p.detach().clone() for n, p in lora_params(model).items()}


def test_resume_reproduces_uninterrupted_run(small_lm_dir, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, candidate_micro_batch_size=2,
                  per_device_train_batch_size=2)
    model, tok = lora_model(small_lm_dir, lora_dropout=0.1)
    full = RRHFTrainer(model=model, args=rrhf_config(tmp_path / "a", **common),
                       train_dataset=ranked_rows(8), processing_class=tok)
    full.train()
    reference = _final_lora(model)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert not list(ckpt.glob("model*.safetensors"))  # only the adapter is saved
    model2, tok2 = lora_model(small_lm_dir, lora_dropout=0.1)
    resumed = RRHFTrainer(model=model2, args=rrhf_config(tmp_path / "b", **common),
                          train_dataset=ranked_rows(8), processing_class=tok2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for name, value in _final_lora(model2).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7)
    loss_a = [h["loss"] for h in full.state.log_history if h.get("step") in (3, 4) and "loss" in h]
    loss_b = [h["loss"] for h in resumed.state.log_history if h.get("step") in (3, 4) and "loss" in h]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)


def test_triton_and_torch_backends_same_loss_and_grad(grad_setup):
    trainer, batch = grad_setup
    trainer.args.logprob_backend = "torch"
    loss_t, g_t = step_grads(trainer, batch, 4)
    trainer.args.logprob_backend = "triton"
    try:
        loss_k, g_k = step_grads(trainer, batch, 4)
    finally:
        trainer.args.logprob_backend = "torch"
    assert loss_k == pytest.approx(loss_t, rel=1e-5)
    for name, g in g_k.items():
        torch.testing.assert_close(g, g_t[name], rtol=1e-3, atol=1e-5)


def test_peft_config_wraps_a_4bit_base(small_lm_dir, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from rrhf_lite.models.inference_loader import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(
        small_lm_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    trainer = RRHFTrainer(model=base, args=rrhf_config(tmp_path, max_steps=1),
                          peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
                          train_dataset=ranked_rows(3), processing_class=load_tokenizer(str(small_lm_dir)))
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    assert trainer.state.global_step == 1


def test_run_train_stage_outputs(small_lm_dir, tmp_path):
    from rrhf_lite.stages.train import run_train
    from rrhf_lite.utils.io import write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", ranked_rows(4))
    out = tmp_path / "run"
    adapter = run_train(str(data), ModelArguments(str(small_lm_dir), lora_r=4),
                        rrhf_config(out, max_steps=2, candidate_micro_batch_size=2))
    assert adapter == out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/rank" in r] == [1, 2]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["data"]["rows"] == 4
    # the adapter loads back onto the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_lm_dir), adapter)
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())


def test_gradient_accumulation_matches_bigger_batch(small_lm_dir, tmp_path):
    """2 prompts per step == 1 prompt per micro-step x 2 accumulation steps (same prompts, SGD)."""
    results, initial = [], None
    for bs, ga in ((2, 1), (1, 2)):
        model, tok = lora_model(small_lm_dir)
        randomise_lora_b(model)
        initial = _final_lora(model)
        RRHFTrainer(model=model, args=rrhf_config(tmp_path / f"{bs}", max_steps=1, optim="sgd",
                                              learning_rate=0.5, per_device_train_batch_size=bs,
                                              gradient_accumulation_steps=ga, max_grad_norm=0.0,
                                              candidate_micro_batch_size=2),
                    train_dataset=ranked_rows(4), processing_class=tok).train()
        results.append(_final_lora(model))
    assert any(not torch.allclose(results[0][k], initial[k]) for k in initial)  # the step moved
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-7)


def test_adapter_init_path_continues_from_an_adapter(small_lm_dir, tmp_path):
    model, _ = lora_model(small_lm_dir)
    randomise_lora_b(model, seed=5)
    model.save_pretrained(tmp_path / "adapter")
    again, _ = lora_model(small_lm_dir, adapter_init_path=str(tmp_path / "adapter"))
    saved, loaded = _final_lora(model), _final_lora(again)
    assert saved.keys() == loaded.keys()
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value)
        assert dict(again.named_parameters())[name].requires_grad


@pytest.mark.parametrize("use_lora", [True, False])
def test_full_precision_lora_and_full_finetune(small_lm_dir, tmp_path, use_lora):
    model, tok = lora_model(small_lm_dir, load_in_4bit=False, use_lora=use_lora)
    assert not [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    before = _snapshot(model)
    RRHFTrainer(model=model, args=rrhf_config(tmp_path, max_steps=1, candidate_micro_batch_size=2),
                train_dataset=ranked_rows(3), processing_class=tok).train()
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if use_lora:
        assert changed and all("lora_" in n for n in changed)
    else:
        assert any(n.endswith("q_proj.weight") for n in changed)


def test_config_and_model_errors(small_lm_dir, tmp_path):
    with pytest.raises(UserInputError, match="truncation_side"):
        RRHFConfig(output_dir=str(tmp_path), truncation_side="middle")
    with pytest.raises(UserInputError, match="logprob_backend"):
        RRHFConfig(output_dir=str(tmp_path), logprob_backend="cuda")
    with pytest.raises(UserInputError, match="candidate_micro_batch_size"):
        RRHFConfig(output_dir=str(tmp_path), candidate_micro_batch_size=0)
    with pytest.raises(UserInputError, match="4-bit"):
        load_model_for_training(ModelArguments(str(small_lm_dir), use_lora=False))
    with pytest.raises(UserInputError, match="model not found"):
        load_model_for_training(ModelArguments(str(tmp_path / "no-such-model")))
    config = RRHFConfig(output_dir=str(tmp_path))
    assert config.logging_steps == 1 and config.activation_checkpointing
    assert config.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert not RRHFConfig(output_dir=str(tmp_path), gradient_checkpointing=False).activation_checkpointing


def test_all_rows_dropped_is_a_user_error(small_lm_dir, tmp_path):
    model, tok = lora_model(small_lm_dir)
    rows = [{"prompt": "x" * 40, "responses": ["a", "b"], "scores": [1, 0]}]
    with pytest.raises(UserInputError, match="no train row is left"):
        RRHFTrainer(model=model, args=rrhf_config(tmp_path, max_prompt_length=None), train_dataset=rows,
                    processing_class=tok)


def test_skip_tied_leaves_out_rows_without_a_ranking(small_lm_dir, tmp_path, caplog):
    model, tok = lora_model(small_lm_dir)
    rows = [{"prompt": "p1", "responses": ["a", "b"], "scores": [1.0, 0.0]},
            {"prompt": "p2", "responses": ["c", "d", "e"], "scores": [0.0, 0.0, 0.0]},
            {"prompt": "p3", "responses": ["f"], "scores": [0.5]},  # k = 1: SFT, kept
            {"prompt": "p4", "responses": ["g", "h"], "scores": [0.3, 0.3]}]
    kept = RRHFTrainer(model=model, args=rrhf_config(tmp_path, skip_tied=True),
                       train_dataset=rows, processing_class=tok)
    assert len(kept.train_dataset) == 2
    assert "skip_tied: 2 of 4 training rows left out" in caplog.text
    every = RRHFTrainer(model=model, args=rrhf_config(tmp_path), train_dataset=rows,
                        processing_class=tok)
    assert len(every.train_dataset) == 4  # the paper's code: off by default
    with pytest.raises(UserInputError, match="skip_tied"):
        RRHFTrainer(model=model, args=rrhf_config(tmp_path, skip_tied=True),
                    train_dataset=[rows[1], rows[3]], processing_class=tok)


@pytest.mark.gpu
def test_cuda_bf16_triton_micro_batched_step(small_lm_dir, tmp_path):
    """On a GPU: NF4 with bf16 compute ("auto"), Triton kernel, micro-batch 2 vs all at once."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = lora_model(small_lm_dir)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).is_cuda
    randomise_lora_b(model)
    trainer = RRHFTrainer(model=model, args=rrhf_config(tmp_path, logprob_backend="triton", bf16=True),
                          train_dataset=ranked_rows(), processing_class=tok)
    batch = first_batch(trainer)
    full_loss, full = step_grads(trainer, batch, None)
    loss, grads = step_grads(trainer, batch, 2)
    assert loss == pytest.approx(full_loss, rel=1e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g, full[name], rtol=5e-2, atol=1e-3, msg=name)
