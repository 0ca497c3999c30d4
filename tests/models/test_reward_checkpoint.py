"""The raw GPT-J value-head reward checkpoint (Dahoas/gptj-rm-static's format): read without
running code, converted once to safetensors, scored as the reference scorer scores it."""

from __future__ import annotations

import collections

import pytest
import torch

from rrhf_lite.builtin.tiny import build_char_tokenizer, save_gptj_value_head_checkpoint
from rrhf_lite.config.sections import ScoringSection
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.reward_checkpoint import converted_reward_dir, read_state_dict
from rrhf_lite.stages.score import score_candidates


@pytest.fixture(scope="module")
def raw_gptj(tmp_path_factory):
    """(checkpoint dir, base dir) of a random tiny GPT-J reward model in the raw layout."""
    return save_gptj_value_head_checkpoint(tmp_path_factory.mktemp("gptj") / "stand_in", seed=3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RRHF_LITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def reference_scores(checkpoint_dir, base_dir, texts):
    """The reference's reading, written out in plain torch: GPT-J body + v_head on prompt +
    " " + response + EOS, the value at the first EOS (argmax of the EOS mask)."""
    from transformers import AutoConfig, GPTJModel

    state = torch.load(checkpoint_dir / "hf_ckpt.pt", weights_only=True)
    body = GPTJModel(AutoConfig.from_pretrained(base_dir)).eval()
    body.load_state_dict({k[len("transformer."):]: v for k, v in state.items()
                          if k.startswith("transformer.") and not k.endswith(("attn.bias",
                                                                              "masked_bias"))})
    head = torch.nn.Linear(body.config.n_embd, 1, bias=False)
    head.weight.data = state["v_head.weight"]
    tok = build_char_tokenizer()
    out = []
    for text in texts:
        ids = torch.tensor([tok(text + tok.eos_token)["input_ids"]])
        with torch.no_grad():
            values = head(body(ids)[0]).squeeze(-1)
        end = int((ids == tok.eos_token_id).float().argmax(dim=1))
        out.append(values[0, end].item())
    return out


def test_scores_match_the_reference_reading_and_batching(raw_gptj, cache):
    checkpoint, base = raw_gptj
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "responses": ["hello there", "no"]},
            # an EOS inside the response: the reference reads the first one, so do we
            {"prompt": "\n\nHuman: and?\n\nAssistant:", "responses": ["ok</s> then", "sure"]}]
    spec = ScoringSection(reward_model=str(checkpoint), reward_format="gptj_value_head",
                          reward_base=str(base), joiner=" ", batch_size=3).reward_spec(device="cpu")
    assert spec["append_eos"] and spec["read_at"] == "first_eos"
    scored = score_candidates(rows, reward=spec, progress=False)
    texts = [r["prompt"] + " " + x for r in rows for x in r["responses"]]
    expected = reference_scores(checkpoint, base, texts)
    got = [s for r in scored for s in r["scores"]]
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in got)) == 4  # a random head: four different rewards
    one_by_one = score_candidates(rows, reward={**spec, "batch_size": 1}, progress=False)
    assert [s for r in one_by_one for s in r["scores"]] == pytest.approx(got, abs=1e-5)
    # reading the last token instead (the classifier's own reading) gives other numbers for
    # the row whose response holds an EOS
    last = score_candidates(rows, reward={**spec, "format": "sequence_classification",
                                          "model": str(converted_reward_dir(str(checkpoint), str(base))),
                                          "append_eos": True, "read_at": "last_token"},
                            progress=False)
    assert last[1]["scores"][0] != pytest.approx(got[2], abs=1e-4)


def test_converted_once_into_safetensors_and_reused(raw_gptj, cache, monkeypatch):
    checkpoint, base = raw_gptj
    first = converted_reward_dir(str(checkpoint), str(base))
    assert (first / "model.safetensors").is_file() and (first / "config.json").is_file()
    assert not list(first.glob("*.pt")) and not list(first.glob("*.bin"))
    import rrhf_lite.models.reward_checkpoint as module

    monkeypatch.setattr(module, "read_state_dict", lambda path: pytest.fail("read twice"))
    assert converted_reward_dir(str(checkpoint / "hf_ckpt.pt"), str(base)) == first
    assert not list(cache.rglob(".*partial*"))  # the atomic directory left nothing behind


class NotATensor:
    pass


@pytest.mark.parametrize("payload, match", [
    (lambda s: [s["v_head.weight"]], "holds a list"),
    (lambda s: {"state_dict": s}, "not a tensor"),
    (lambda s: {**s, "step": 3}, "not a tensor"),
    (lambda s: collections.OrderedDict(s, extra=NotATensor()), "weights_only"),
    (lambda s: {k: v for k, v in s.items() if k != "v_head.weight"}, "missing: score.weight"),
    (lambda s: {**s, "lm_head.weight": torch.zeros(100, 32)}, "not part of GPT-J"),
    (lambda s: {**s, "v_head.weight": torch.zeros(1, 16)}, "another shape"),
])
def test_anything_but_the_expected_flat_state_dict_is_refused(raw_gptj, cache, tmp_path,
                                                              payload, match):
    checkpoint, base = raw_gptj
    state = torch.load(checkpoint / "hf_ckpt.pt", weights_only=True)
    bad = tmp_path / "bad" / "hf_ckpt.pt"
    bad.parent.mkdir()
    torch.save(payload(state), bad)
    with pytest.raises(UserInputError, match=match) as info:
        converted_reward_dir(str(bad.parent), str(base))
    assert str(bad) in str(info.value)
    assert not list(cache.rglob("model.safetensors"))


def test_a_good_file_reads_as_a_flat_dict_in_either_torch_save_format(raw_gptj, tmp_path):
    state = read_state_dict(raw_gptj[0] / "hf_ckpt.pt")  # zip format: memory-mapped
    assert "v_head.weight" in state and all(isinstance(v, torch.Tensor) for v in state.values())
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format cannot be memory-mapped: read in full
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    again = read_state_dict(legacy)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_recipe_keys_say_which_format(raw_gptj, cache, tmp_path):
    from rrhf_lite.builtin.tiny import tiny_llama_config

    checkpoint, base = raw_gptj
    with pytest.raises(ValueError, match="needs reward_model .* and reward_base"):
        ScoringSection(reward_model=str(checkpoint), reward_format="gptj_value_head")
    with pytest.raises(ValueError, match="only with reward_format gptj_value_head"):
        ScoringSection(reward_model=str(checkpoint), reward_base=str(base))
    tiny_llama_config().save_pretrained(tmp_path / "llama")
    with pytest.raises(UserInputError, match="'llama' model, not GPT-J"):
        converted_reward_dir(str(checkpoint), str(tmp_path / "llama"))


def test_validate_names_a_missing_or_ambiguous_checkpoint(raw_gptj, tmp_path, capsys):
    from pathlib import Path

    from rrhf_lite.cli import main

    paper = Path(__file__).resolve().parents[2] / "recipes" / "hh_paper.yaml"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.pt", "b.bin"):
        (two / name).write_bytes(b"")
    for bad, message in ((tmp_path / "missing", "reward checkpoint not found"),
                         (two, "expected one checkpoint file (.pt, .bin or .pth), found 2")):
        code = main(["validate", str(paper), "--output-dir", str(tmp_path / "run"),
                     "--set", f"scoring.reward_model={bad}",
                     "--set", f"scoring.reward_base={raw_gptj[1]}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "scoring.reward_model" in err
