"""Merge stage on a tiny LLaMA: nothing is trained, adapters get random nonzero LoRA weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rrhf_lite.builtin.tiny import build_char_tokenizer
from rrhf_lite.errors import UserInputError
from rrhf_lite.stages import merge
from rrhf_lite.stages.merge import merge_adapter, merged_dtype
from rrhf_lite.stages.merge_checks import MergeVerificationError, compare_logits, prompt_logits

PROBE = "Assistant: the quick brown fox"


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _logits(model, text=PROBE):
    return prompt_logits(model, build_char_tokenizer(), [text])[0]


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def adapter_dir(make_adapter):
    """Random A and B (B != 0, so the adapter really changes the model)."""
    return make_adapter(seed=1)


@pytest.fixture(scope="module")
def other_adapter_dir(make_adapter):
    return make_adapter(seed=2)


@pytest.fixture(scope="module")
def merged_fp32(tiny_lm_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    report = merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32")
    return out, report


@pytest.fixture(scope="module")
def reference_logits(tiny_lm_dir, adapter_dir):
    """Base + adapter, unmerged, on a text that is not one of the verification prompts."""
    return _logits(PeftModel.from_pretrained(_load(tiny_lm_dir), str(adapter_dir)))


# ---------------------------------------------------------------- a good merge


def test_fp32_merge_reproduces_base_plus_adapter(merged_fp32, tiny_lm_dir, reference_logits):
    out, report = merged_fp32
    assert report["ok"] is True and report["dtype"] == "float32"
    check = report["verification"]
    assert check["prompts"] == len(merge.DEFAULT_VERIFY_PROMPTS)
    assert check["max_abs_diff"] < 1e-5
    assert check["adapter_effect"] > 0.05  # the adapter matters, so the check means something
    assert check["top1_agreement"] == 1.0
    assert json.loads((out / "merge_report.json").read_text()) == json.loads(json.dumps(report))

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_report.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("lora" in key for key in keys)

    merged = _load(out)
    got = _logits(merged)
    torch.testing.assert_close(got, reference_logits, atol=1e-5, rtol=1e-5)
    base = _logits(_load(tiny_lm_dir))
    assert (got - base).abs().max() > 0.05


def test_fp16_merge_saves_fp16_and_reads_base_from_adapter_config(tiny_lm_dir, adapter_dir,
                                                                  tmp_path, reference_logits):
    report = merge_adapter(None, adapter_dir, tmp_path / "fp16", torch_dtype="fp16",
                           verify_prompts=["Hello there, how are you?"])
    assert report["ok"] and report["dtype"] == "float16"
    assert report["base_model"] == str(tiny_lm_dir)
    assert report["verification"]["prompts"] == 1
    assert 0 < report["verification"]["max_abs_diff"] <= report["verification"]["tolerance"]
    weights = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    got = _logits(_load(tmp_path / "fp16", torch.float16))
    assert (got - reference_logits).abs().max() < 2e-2


# ---------------------------------------------------------------- corrupted adapters are caught


def test_verification_against_another_adapter_fails(merged_fp32, tiny_lm_dir, other_adapter_dir):
    out, _ = merged_fp32
    tokenizer = build_char_tokenizer()
    prompts = merge.DEFAULT_VERIFY_PROMPTS
    other = PeftModel.from_pretrained(_load(tiny_lm_dir), str(other_adapter_dir))
    check = compare_logits(prompt_logits(other, tokenizer, prompts),
                           prompt_logits(_load(out), tokenizer, prompts))
    assert check["ok"] is False
    assert check["max_abs_diff"] > 100 * check["tolerance"]


def test_tampered_merged_weights_fail_and_write_nothing(tiny_lm_dir, adapter_dir, tmp_path,
                                                        monkeypatch):
    original = merge._save_merged

    def corrupting_save(model, tokenizer, directory, max_shard_size):
        with torch.no_grad():  # what a broken merge or a bad disk would do to one matrix
            model.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
        original(model, tokenizer, directory, max_shard_size)

    monkeypatch.setattr(merge, "_save_merged", corrupting_save)
    out = tmp_path / "merged"
    with pytest.raises(MergeVerificationError, match="does not reproduce") as info:
        merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32")
    assert "nothing was written" in str(info.value)
    assert not out.exists() and _leftovers(tmp_path, "merged") == []

    report = merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32",
                           allow_mismatch=True)
    assert report["ok"] is False
    assert json.loads((out / "merge_report.json").read_text())["ok"] is False


def test_nan_adapter_is_caught(tiny_lm_dir, adapter_dir, tmp_path):
    bad = tmp_path / "nan_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(MergeVerificationError, match="NaN"):
        merge_adapter(tiny_lm_dir, bad, tmp_path / "out", torch_dtype="float32")
    assert not (tmp_path / "out").exists()


def test_adapter_with_mismatched_keys_is_refused(tiny_lm_dir, adapter_dir, tmp_path):
    bad = tmp_path / "renamed_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(UserInputError, match="does not fit the base model") as info:
        merge_adapter(tiny_lm_dir, bad, tmp_path / "out", torch_dtype="float32")
    assert "missing" in str(info.value) and "layers.7." in str(info.value)
    assert not (tmp_path / "out").exists()


def test_zero_adapter_merges_with_a_warning(tiny_lm_dir, tmp_path, make_adapter):
    make_adapter(tmp_path / "zero", r=2, target_modules=["q_proj"], random_b=False)  # B = 0
    report = merge_adapter(tiny_lm_dir, tmp_path / "zero", tmp_path / "out",
                           torch_dtype="float32", verify_prompts=["hi"])
    assert report["ok"] and report["verification"]["adapter_effect"] == 0.0
    assert any("no-op" in w for w in report["warnings"])


# ---------------------------------------------------------------- output directory safety


def test_non_empty_output_refused_then_force_replaces(tiny_lm_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserInputError, match="--force") as info:
        merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32")
    assert str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "user data"

    report = merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32", force=True,
                           verify_prompts=[])
    assert report["ok"] and report["verification"] is None
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "merged") == []


def test_output_inside_an_input_is_refused(tiny_lm_dir, adapter_dir):
    with pytest.raises(UserInputError, match="overwrite the input"):
        merge_adapter(tiny_lm_dir, adapter_dir, adapter_dir, force=True)
    with pytest.raises(UserInputError, match="overwrite the input"):  # --force would delete it
        merge_adapter(tiny_lm_dir, adapter_dir, adapter_dir.parent, force=True)
    assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_crash_while_saving_leaves_no_output(tiny_lm_dir, adapter_dir, tmp_path, monkeypatch):
    def crashing_save(model, tokenizer, directory, max_shard_size):
        (directory / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge, "_save_merged", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(tiny_lm_dir, adapter_dir, tmp_path / "new", torch_dtype="float32")
    assert not (tmp_path / "new").exists()

    old = tmp_path / "old"  # with --force, a crash keeps the previous contents
    old.mkdir()
    (old / "keep.txt").write_text("previous model")
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(tiny_lm_dir, adapter_dir, old, torch_dtype="float32", force=True)
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, "new") == [] and _leftovers(tmp_path, "old") == []


# ---------------------------------------------------------------- refused inputs


def test_pickle_only_adapter_is_refused(tiny_lm_dir, adapter_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    torch.save(load_file(str(adapter_dir / "adapter_model.safetensors")),
               pickled / "adapter_model.bin")
    with pytest.raises(UserInputError, match="pickle") as info:
        merge_adapter(tiny_lm_dir, pickled, tmp_path / "out")
    message = str(info.value)
    assert "adapter_model.bin" in message and "safetensors" in message and str(pickled) in message
    assert not (tmp_path / "out").exists()


def test_missing_or_incomplete_adapter_dirs_are_refused(tiny_lm_dir, tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        merge_adapter(tiny_lm_dir, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="adapter_config.json"):
        merge_adapter(tiny_lm_dir, tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserInputError, match="no adapter_model.safetensors"):
        merge_adapter(tiny_lm_dir, tmp_path / "empty", tmp_path / "out")


def test_dtype_names():
    assert merged_dtype("bf16") is torch.bfloat16 and merged_dtype("float32") is torch.float32
    assert merged_dtype(torch.float16) is torch.float16
    with pytest.raises(UserInputError, match="float16, bfloat16, float32"):
        merged_dtype("int4")


def test_compare_logits_tolerance_and_nan():
    ref = [torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[0.5, 0.0, -0.5]])]
    near = [r + 1e-6 for r in ref]
    far = [ref[0], ref[1] + torch.tensor([[0.0, 0.0, 1.5]])]
    assert compare_logits(ref, near)["ok"]
    result = compare_logits(ref, far)
    assert not result["ok"] and result["max_abs_diff"] == pytest.approx(1.5)
    assert result["top1_agreement"] == 0.5
    assert compare_logits(ref, far, tolerance=2.0)["ok"]
    nan = [ref[0], torch.full_like(ref[1], float("nan"))]
    result = compare_logits(ref, nan)
    assert not result["ok"] and result["nonfinite_logits"] == 3
    json.dumps(result, allow_nan=False)  # stays valid JSON


# ---------------------------------------------------------------- NF4 round trip


def test_roundtrip_nf4_matches_the_4bit_training_base(tiny_lm_dir, adapter_dir, merged_fp32,
                                                      tmp_path, cpu_4bit_path):
    import bitsandbytes.functional as bnbf

    out = tmp_path / "rt"
    report = merge_adapter(tiny_lm_dir, adapter_dir, out, torch_dtype="float32",
                           roundtrip_nf4=True)
    assert report["ok"]
    rt = report["roundtrip"]
    assert rt["modules"] == 2 * 7  # q k v o gate up down per layer; lm_head stays full precision
    assert 0 < rt["mean_abs_change"] < rt["max_abs_change"] < 0.05

    base, merged = _load(tiny_lm_dir), _load(out)
    # A linear the adapter does not touch holds exactly the NF4 value of the base weight.
    w = base.model.layers[0].mlp.down_proj.weight.data
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = bnbf.dequantize_4bit(packed, state)
    got = merged.model.layers[0].mlp.down_proj.weight.data
    assert torch.equal(got, expected) and not torch.equal(got, w)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)

    # The merged model computes what the 4-bit base + adapter computed on training's path
    # (dequantise + matmul in fp32), on either CPU path: the fused bf16 kernel, which every layer
    # of this model could take, is kept out of the check, so its tolerance is fp32's ...
    policy = report["policy_verification"]
    assert policy["ok"] and policy["compute_path"] == {
        "path": "dequantize", "fused_layers": 0, "dequantize_layers": 14, "compute_dtype": "float32",
        "fused_calls": 0, "dequantize_calls": 0, "max_rows": None}  # no layer has a fused copy
    assert policy["max_abs_diff"] < 1e-4 and policy["tolerance"] <= 1e-4
    # ... and a merge into the original full-precision weights fails that check on both paths.
    with pytest.raises(MergeVerificationError, match="4-bit policy"):
        merge_adapter(tiny_lm_dir, adapter_dir, tmp_path / "plain", torch_dtype="float32",
                      check_4bit_policy=True)
    plain = merge_adapter(tiny_lm_dir, adapter_dir, tmp_path / "plain", torch_dtype="float32",
                          check_4bit_policy=True, allow_mismatch=True)["policy_verification"]
    assert plain["max_abs_diff"] > 4 * plain["tolerance"]


def test_tampered_merge_fails_the_4bit_policy_check_on_both_paths(tiny_lm_dir, adapter_dir,
                                                                  tmp_path, monkeypatch,
                                                                  cpu_4bit_path):
    original = merge._save_merged

    def corrupting_save(model, tokenizer, directory, max_shard_size):
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
        original(model, tokenizer, directory, max_shard_size)

    monkeypatch.setattr(merge, "_save_merged", corrupting_save)
    report = merge_adapter(tiny_lm_dir, adapter_dir, tmp_path / "m", torch_dtype="float32",
                           roundtrip_nf4=True, allow_mismatch=True)
    policy = report["policy_verification"]
    assert report["ok"] is False and policy["ok"] is False
    assert policy["max_abs_diff"] > 4 * policy["tolerance"]
    assert policy["compute_path"]["path"] == "dequantize"


def test_the_recipe_merge_takes_the_cli_settings(tmp_path, monkeypatch):
    """merge.torch_dtype has the CLI's default, and merge.tolerance reaches the check as
    --tolerance does."""
    import rrhf_lite.pipeline.run as run
    from rrhf_lite.cli import build_parser
    from rrhf_lite.config.recipe import parse_recipe
    from rrhf_lite.config.sections import MergeSection
    from rrhf_lite.stages.run_context import RunState

    args = build_parser().parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o"])
    assert args.dtype == MergeSection().torch_dtype
    seen = {}
    monkeypatch.setattr(run, "merge_adapter", lambda *a, **kw: seen.update(kw) or {"max_abs_diff": 0})
    recipe = parse_recipe({"model": {"name_or_path": "m"}, "stages": ["merge"],
                           "output_dir": str(tmp_path), "merge": {"tolerance": 0.75}})
    state = RunState(recipe=recipe, run_dir=tmp_path, base_model="m", stages=["merge"],
                     round_adapters={1: tmp_path / "adapter"})
    run._merge(state)
    assert seen["tolerance"] == 0.75 and seen["torch_dtype"] == "float16"
    assert "fused_cpu_4bit" not in seen  # the check's path does not follow sampling's
