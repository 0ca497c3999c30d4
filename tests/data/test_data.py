"""Listwise data: formats, validation errors naming file + line, tokenisation, collation, scoring."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from rrhf_lite.builtin.tiny import build_char_tokenizer, make_tiny_causal_lm
from rrhf_lite.data.listwise import load_listwise, summarize_listwise
from rrhf_lite.data.tokenization import (
    IGNORE_INDEX,
    RRHFCollator,
    tokenize_example,
    tokenize_listwise,
)
from rrhf_lite.errors import UserInputError
from rrhf_lite.training.logprobs import model_candidate_scores


def _write_jsonl(path, rows, blank_first=False):
    lines = ([""] if blank_first else []) + [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"query": "Q: hi", "responses": ["hello", "go away"], "scores": [1.0, -0.5]}


# ----------------------------------------------------------------------------- formats


def test_listwise_query_and_prompt(tmp_path):
    rows = [GOOD, {"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 2, 3]}]
    out = load_listwise(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert out[0] == {"prompt": "Q: hi", "responses": ["hello", "go away"], "scores": [1.0, -0.5]}
    assert out[1]["scores"] == [1.0, 2.0, 3.0] and all(isinstance(s, float) for s in out[1]["scores"])


def test_pairwise_explicit_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "Human: hi\nAssistant:", "chosen": " hello", "rejected": " no"},
        {"chosen": "Human: hi\nAssistant: hello there", "rejected": "Human: hi\nAssistant: help me"},
    ]
    out = load_listwise(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert out[0] == {"prompt": "Human: hi\nAssistant:", "responses": [" hello", " no"],
                      "scores": [1.0, 0.0]}
    # shared prefix "...Assistant: he" is cut back to the word boundary; space stays with responses
    assert out[1] == {"prompt": "Human: hi\nAssistant:", "responses": [" hello there", " help me"],
                      "scores": [1.0, 0.0]}


def test_chat_messages_listwise_and_implicit():
    user = {"role": "user", "content": "hi"}
    rows = [
        {"prompt": [user], "responses": [{"role": "assistant", "content": "yo"},
                                         [{"role": "assistant", "content": "hey"}]], "scores": [0, 1]},
        {"chosen": [user, {"role": "assistant", "content": "A"}],
         "rejected": [user, {"role": "assistant", "content": "B"}]},
    ]
    out = load_listwise(rows)
    assert out[0]["prompt"] == [user]
    assert out[0]["responses"][1] == {"role": "assistant", "content": "hey"}
    assert out[1]["prompt"] == [user] and out[1]["responses"][0]["content"] == "A"


def test_json_parquet_and_dataset_sources(tmp_path):
    import datasets

    rows = [GOOD, {"prompt": "P", "responses": ["a", "b"], "scores": [0.0, 1.0]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows[1:])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_listwise(tmp_path / "d.json")[0]["prompt"] == "Q: hi"
    assert load_listwise(str(tmp_path / "d.parquet"))[0]["responses"] == ["a", "b"]
    assert load_listwise(ds)[0]["scores"] == [0.0, 1.0]
    assert load_listwise(datasets.DatasetDict({"train": ds}))[0]["prompt"] == "P"


def test_scores_optional_when_not_required():
    out = load_listwise([{"prompt": "p", "responses": ["a"]}], require_scores=False)
    assert out[0]["scores"] is None


# ----------------------------------------------------------------------------- bad input

BAD_ROWS = {
    "missing scores": ({"query": "q", "responses": ["a"]}, "missing field \"scores\""),
    "missing prompt": ({"responses": ["a"], "scores": [1]}, "prompt"),
    "no responses field": ({"prompt": "q", "answer": "a"}, "missing field"),
    "length mismatch": ({"query": "q", "responses": ["a", "b"], "scores": [1]}, "2 responses but 1 scores"),
    "nan score": ('{"query": "q", "responses": ["a", "b"], "scores": [1, NaN]}', "not finite"),
    "inf score": ('{"query": "q", "responses": ["a", "b"], "scores": [Infinity, 1]}', "not finite"),
    "string score": ({"query": "q", "responses": ["a", "b"], "scores": [1, "high"]}, "not a number"),
    "bool score": ({"query": "q", "responses": ["a", "b"], "scores": [1, True]}, "not a number"),
    "empty response": ({"query": "q", "responses": ["a", "  "], "scores": [1, 2]}, "responses[1] is empty"),
    "empty responses": ({"query": "q", "responses": [], "scores": []}, "non-empty list"),
    "bad response type": ({"query": "q", "responses": [3], "scores": [1]}, "must be a string"),
    "no shared prefix": ({"chosen": "abc", "rejected": "xyz"}, "share no prompt prefix"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_and_line(tmp_path, case):
    row, expected = BAD_ROWS[case]
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, row], blank_first=True)
    with pytest.raises(UserInputError) as info:
        load_listwise(path)
    text = str(info.value)
    assert expected in text
    assert f"{path} line 3" in text  # blank line 1, good row line 2, bad row line 3
    assert "what to do" in text


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserInputError, match="empty"):
        load_listwise(empty)
    with pytest.raises(UserInputError, match="not found"):
        load_listwise(tmp_path / "nope.jsonl")
    with pytest.raises(UserInputError, match="unsupported"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_listwise(tmp_path / "d.csv")


def test_counted_warnings(caplog):
    rows = [
        {"prompt": "p", "responses": ["a"], "scores": [1]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [2, 2]},
        {"prompt": "p", "responses": ["a", "a", "b"], "scores": [1, 2, 3]},
        {"prompt": "p", "responses": ["x", "y"], "scores": [0, 1]},
    ]
    with caplog.at_level(logging.WARNING, logger="rrhf_lite.data.listwise"):
        load_listwise(rows)
    text = caplog.text
    assert "1 of 4 rows have one response" in text
    assert "1 of 4 rows have all scores tied" in text
    assert "1 of 4 rows contain duplicate responses" in text
    stats = summarize_listwise(load_listwise(rows))
    assert stats == {"rows": 4, "candidates": 8, "single_response": 1, "all_tied": 1,
                     "duplicate_responses": 1}


# ----------------------------------------------------------------------------- tokenisation


def test_tokenize_labels_and_eos():
    tok = build_char_tokenizer()
    feat = tokenize_example({"prompt": "ab", "responses": ["xyz", "q"], "scores": [0, 1]}, tok,
                            max_length=None, max_prompt_length=None)
    assert feat["prompt_ids"] == tok("ab", add_special_tokens=False)["input_ids"]
    assert feat["responses_ids"][0] == tok("xyz", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = RRHFCollator(tok.pad_token_id)([feat, {"prompt_ids": [5], "responses_ids": [[6]], "scores": [3.0]}])
    assert batch["input_ids"].shape == (3, 6)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 2 + feat["responses_ids"][0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 2 + feat["responses_ids"][1] + [IGNORE_INDEX] * 2
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["input_ids"][1, 4:].tolist() == [tok.pad_token_id] * 2
    assert batch["candidate_mask"].tolist() == [[True, True], [True, False]]
    assert batch["rewards"].tolist() == [[0.0, 1.0], [3.0, 0.0]]
    assert batch["candidate_index"].tolist() == [0, 1, 2]


def test_chat_template_is_applied():
    tok = build_char_tokenizer(chat_template=True)
    example = {"prompt": [{"role": "user", "content": "hi"}],
               "responses": [{"role": "assistant", "content": "yo"}], "scores": [1.0]}
    feat = tokenize_example(example, tok, max_length=None, max_prompt_length=None)
    assert tok.decode(feat["prompt_ids"]) == "<user>hi\n<assistant>"
    assert tok.decode(feat["responses_ids"][0], skip_special_tokens=True) == "yo\n"
    assert feat["responses_ids"][0][-1] == tok.eos_token_id
    # without a template, messages are an error (as in sampling): no invented transcript format
    with pytest.raises(UserInputError, match="no chat template"):
        tokenize_example(example, build_char_tokenizer(), max_length=None, max_prompt_length=None)


def test_truncation_sides_counts_and_drops(caplog):
    tok = build_char_tokenizer()
    rows = [{"prompt": "0123456789", "responses": ["abcdef", "x"], "scores": [1, 0]},
            {"prompt": "p" * 30, "responses": ["a"], "scores": [1]}]
    with caplog.at_level(logging.WARNING, logger="rrhf_lite.data.tokenization"):
        left, stats = tokenize_listwise(rows, tok, max_length=8, max_prompt_length=4, truncation_side="left")
    assert tok.decode(left[0]["prompt_ids"]) == "6789"
    assert tok.decode(left[0]["responses_ids"][0]) == "abcd"  # tail (and EOS) cut to fit 8
    assert tok.decode(left[0]["responses_ids"][1], skip_special_tokens=True) == "x"
    assert stats.prompts_truncated == 2 and stats.responses_truncated == 1 and stats.rows_dropped == 0
    right, _ = tokenize_listwise(rows, tok, max_length=8, max_prompt_length=4, truncation_side="right")
    assert tok.decode(right[0]["prompt_ids"]) == "0123"
    # a prompt that alone fills max_length leaves no response token: the row is dropped, counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rrhf_lite.data.tokenization"):
        kept, stats = tokenize_listwise(rows, tok, max_length=12, max_prompt_length=None)
    assert len(kept) == 1 and stats.rows_dropped == 1
    assert tok.decode(kept[0]["responses_ids"][0]) == "ab"
    assert "dropped 1 of 2 rows" in caplog.text
    with_none, _ = tokenize_listwise(rows, tok, max_length=12, max_prompt_length=None, keep_dropped=True)
    assert with_none[0] is not None and with_none[1] is None


# ----------------------------------------------------------------------------- scoring


def _manual_scores(model, tok, prompt, responses, length_penalty):
    out = []
    for response in responses:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        total = sum(float(logp[len(p) - 1 + t, tok_id]) for t, tok_id in enumerate(r))
        out.append(total / len(r) ** length_penalty)
    return out


@pytest.mark.parametrize("share_prompt", ["auto", False], ids=["packed", "unshared"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_model_candidate_scores_matches_manual(length_penalty, share_prompt, monkeypatch):
    import rrhf_lite.training.logprobs as logprobs

    packed_chunks = []
    plain_sums = logprobs.chunk_logprob_sums

    def spy(model, *args, groups=None, **kw):
        packed_chunks.append(groups is not None)
        return plain_sums(model, *args, groups=groups, **kw)

    monkeypatch.setattr(logprobs, "chunk_logprob_sums", spy)
    tok = build_char_tokenizer()
    model = make_tiny_causal_lm(seed=3, hidden_size=32, intermediate_size=64)
    examples = [{"prompt": "Q: 1+1", "responses": ["2", "three", "no idea at all"], "scores": None},
                {"prompt": "Hi", "responses": ["hello", "hey"], "scores": None},
                {"prompt": "x" * 40, "responses": ["y"], "scores": None}]  # dropped: NaN
    got = model_candidate_scores(model, tok, examples, max_length=32, length_penalty=length_penalty,
                                 micro_batch_size=2, backend="torch", share_prompt=share_prompt)
    for ex, scores in zip(examples[:2], got[:2], strict=True):
        expected = _manual_scores(model, tok, ex["prompt"], ex["responses"], length_penalty)
        assert scores == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert len(got[2]) == 1 and got[2][0] != got[2][0]  # NaN
    assert not model.training
    # micro-batches of 2 over 3 + 2 candidates: packed by prompt unless told not to (the
    # sharing check's own forwards are unshared and packed, hence "any")
    assert any(packed_chunks) is (share_prompt == "auto")


# ----------------------------------------------------------------------------- one shape


def test_malformed_json_gives_one_error_for_training_data_and_prompts(tmp_path):
    from rrhf_lite.data.prompts import load_prompts

    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "responses": ["x"], "scores": [1]},\n  {"prompt": "b",\n]\n')
    messages = []
    for load in (load_listwise, load_prompts):
        with pytest.raises(UserInputError) as info:
            load(path)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert f"{path} line 4" in messages[0] and "malformed JSON" in messages[0]
    assert "what to do" in messages[0] and "JSON array" in messages[0]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
@pytest.mark.parametrize("max_prompt_length", [None, 5], ids=["whole", "truncated"])
def test_training_and_sampling_tokenise_prompts_alike(chat, max_prompt_length):
    from rrhf_lite.data.tokenization import prompt_token_ids
    from rrhf_lite.models.inference_loader import encode_prompts

    tok = build_char_tokenizer(chat_template=chat)
    prompts = ([[{"role": "user", "content": "copy abc="}], [{"role": "user", "content": ""}]]
               if chat else ["copy abc=", ""])
    batch = encode_prompts(tok, prompts, max_prompt_length=max_prompt_length)
    for row, prompt in enumerate(prompts):
        feature = tokenize_example({"prompt": prompt, "responses": ["x"], "scores": [1.0]}, tok,
                                   max_length=None, max_prompt_length=max_prompt_length)
        sampled = prompt_token_ids(tok, prompt, max_prompt_length=max_prompt_length)
        in_batch = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert feature["prompt_ids"] == sampled == in_batch
        if max_prompt_length is not None and row == 0:
            assert len(sampled) == max_prompt_length


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_truncation_keeps_bos_in_training_and_sampling(side):
    from rrhf_lite.data.tokenization import prompt_token_ids
    from rrhf_lite.models.inference_loader import encode_prompts

    tok = build_char_tokenizer(add_bos=True)
    text = "abcdefgh"
    assert tok(text)["input_ids"] == [1, *range(70, 78)]
    expected = [1, 74, 75, 76, 77] if side == "left" else [1, 70, 71, 72, 73]
    # transformers' own truncation (what the reference tokeniser gives) agrees
    tok.truncation_side = side
    assert tok(text, truncation=True, max_length=5)["input_ids"] == expected
    sampled = prompt_token_ids(tok, text, max_prompt_length=5, truncation_side=side)
    trained = tokenize_example({"prompt": text, "responses": ["x"], "scores": [0.0]}, tok,
                               max_length=None, max_prompt_length=5, truncation_side=side)
    assert sampled == trained["prompt_ids"] == expected
    if side == "left":  # generation encodes its batch with the same function
        batch = encode_prompts(tok, [text, "ab"], max_prompt_length=5)
        assert batch["input_ids"][0].tolist() == expected
        assert batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist() == [1, 70, 71]
    # a prompt that alone reaches max_length keeps its BOS too (and leaves no room: dropped)
    cut, stats = tokenize_listwise([{"prompt": text, "responses": ["x"], "scores": [0.0]}], tok,
                                   max_length=4, max_prompt_length=None, truncation_side=side,
                                   keep_dropped=True)
    assert cut == [None] and stats.rows_dropped == 1
    # without a BOS nothing changes: the plain end is kept
    plain = build_char_tokenizer()
    assert prompt_token_ids(plain, text, max_prompt_length=3) == [75, 76, 77]
