"""Inference loading (base, adapter, reward model), prompt formatting, and the generate stage."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from rrhf_lite.builtin.tiny import build_char_tokenizer
from rrhf_lite.data.tokenization import format_prompt, prompt_token_ids
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.inference_loader import encode_prompts, load_causal_lm, load_reward_model
from rrhf_lite.stages.generate import chat_loop, generate_texts, run_generate_command

MESSAGES = [{"role": "user", "content": "copy ab="}]


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir), device="cpu")


@pytest.fixture(scope="module")
def adapter_dir(make_adapter):
    """A LoRA adapter with non-zero weights and a large alpha (so it changes the model)."""
    return make_adapter(r=4, alpha=64)


def test_load_causal_lm_sets_padding_and_eval(tiny_lm):
    model, tokenizer = tiny_lm
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_adapter_changes_outputs_and_pickles_are_refused(tiny_lm_dir, adapter_dir, tiny_lm,
                                                         tmp_path):
    adapted, tokenizer = load_causal_lm(str(tiny_lm_dir), adapter_path=str(adapter_dir),
                                        device="cpu")
    base, _ = tiny_lm
    ids = tokenizer("copy ab=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, base(input_ids=ids).logits)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserInputError, match="adapter_model.safetensors"):
        load_causal_lm(str(tiny_lm_dir), adapter_path=str(pickled), device="cpu")


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_causal_lm(str(tmp_path / "nothing" / "here"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError):
        load_causal_lm(str(empty), device="cpu")


def test_load_in_4bit_with_adapter(tiny_lm_dir, adapter_dir):
    from bitsandbytes.nn import Linear4bit

    model, tokenizer = load_causal_lm(str(tiny_lm_dir), adapter_path=str(adapter_dir),
                                      load_in_4bit=True, device="cpu")
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    answers = generate_texts(model, tokenizer, ["copy ab=", "x"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_load_reward_model(tiny_reward_dir):
    model, tokenizer = load_reward_model(str(tiny_reward_dir), device="cpu")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "left"


def test_format_prompt_and_tokenisation():
    plain, chat = build_char_tokenizer(), build_char_tokenizer(chat_template=True)
    assert format_prompt(plain, "as is") == "as is"
    assert format_prompt(chat, MESSAGES) == "<user>copy ab=\n<assistant>"
    with pytest.raises(UserInputError, match="no chat template") as err:
        format_prompt(plain, MESSAGES, where="p.jsonl line 7")
    assert "p.jsonl line 7" in str(err.value)
    with pytest.raises(UserInputError, match="message 0"):
        format_prompt(chat, [{"role": "user"}])
    assert prompt_token_ids(plain, "abcdef", max_prompt_length=2) == plain("ef")["input_ids"]
    assert prompt_token_ids(plain, "") == [plain.bos_token_id]
    batch = encode_prompts(plain, ["abc", "a"])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"][1, :2].tolist() == [plain.pad_token_id] * 2


def test_greedy_generate_is_per_prompt_and_batch_independent(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["copy abc=", "add 1+2=", "x"]
    together = generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_texts(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    # greedy = the argmax continuation, built by hand
    ids = tokenizer("x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert together[2] == tokenizer.decode(ids[0, 1:], skip_special_tokens=True)


def test_generate_with_adapter_and_sampling(tiny_lm_dir, adapter_dir, tiny_lm):
    base = generate_texts(*tiny_lm, ["copy ab="], max_new_tokens=8)
    adapted = generate_texts(*load_causal_lm(str(tiny_lm_dir), adapter_path=str(adapter_dir),
                                             device="cpu"), ["copy ab="], max_new_tokens=8)
    assert adapted != base
    one = generate_texts(*tiny_lm, ["a", "b"], temperature=1.0, seed=5, max_new_tokens=8)
    assert one == generate_texts(*tiny_lm, ["a", "b"], temperature=1.0, seed=5,
                                 max_new_tokens=8)


def test_chat_loop_keeps_history_with_a_template(tiny_chat_lm_dir):
    model, tokenizer = load_causal_lm(str(tiny_chat_lm_dir), device="cpu")
    lines = iter(["hello", "/reset", "again", "more", "/exit", "never read"])
    printed = []
    history = chat_loop(model, tokenizer, max_new_tokens=4, input_fn=lambda _: next(lines),
                        print_fn=printed.append)
    assert [m["content"] for m in history if m["role"] == "user"] == ["again", "more"]
    assert len(history) == 4 and "(conversation reset)" in printed
    # the second answer saw the whole conversation
    expected = generate_texts(model, tokenizer, [history[:3]], max_new_tokens=4)[0]
    assert history[3]["content"] == expected


def test_run_generate_command_prints_answers(tiny_lm_dir, capsys, monkeypatch):
    args = SimpleNamespace(model=str(tiny_lm_dir), adapter=None, prompt=["copy ab="],
                           max_new_tokens=4, temperature=0.0, top_p=1.0, load_in_4bit=False,
                           trust_remote_code=False)
    run_generate_command(args)
    assert "### prompt\ncopy ab=\n### answer\n" in capsys.readouterr().out
    args.prompt = None
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    run_generate_command(args)  # chat until EOF
    assert "chat:" in capsys.readouterr().out
