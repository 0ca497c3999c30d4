"""The 4-bit CPU path chosen per call, by the rows a call multiplies (rrhf_lite.models.cpu_4bit).

A layer that may take bitsandbytes' fused kernel keeps a packed copy beside its exact weight: a
call of at most max_rows input rows runs fused on the copy, a larger one dequantise + matmul on
the weight. The crossover is measured once per machine and layer shapes, and cached. These tests
run on any CPU (cpu_4bit_path emulates the fused kernel where it is missing).
"""

from __future__ import annotations

import json

import pytest
import torch

from rrhf_lite.builtin.tiny import save_tiny_causal_lm
from rrhf_lite.models import cpu_4bit
from rrhf_lite.models.inference_loader import load_causal_lm

# keep the real measurement (conftest replaces it by "every call" for the other tests)
MEASURED_MAX_ROWS = cpu_4bit.fused_max_rows


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    # hidden 64, intermediate 128: every linear layer's shape packs
    return save_tiny_causal_lm(tmp_path_factory.mktemp("rows_lm") / "model", seed=5,
                               hidden_size=64, intermediate_size=128)


def _calls(model) -> dict:
    path = cpu_4bit.compute_path(model)
    return {"fused": path["fused_calls"], "dequantize": path["dequantize_calls"]}


def test_small_calls_fused_large_calls_exact(lm_dir, cpu_4bit_path):
    """max_rows 4: a forward of 1 x 3 tokens (3 rows per layer call) runs fused, one of
    2 x 5 tokens (10 rows) runs dequantise + matmul and equals the exact model bit for bit."""
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu", fused_cpu_4bit=4)
    exact, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu", fused_cpu_4bit=False)
    layers = cpu_4bit.linear4bit_layers(model)
    fused_here = cpu_4bit_path == "fused"
    assert all(cpu_4bit.has_fused_copy(m) for m in layers) == fused_here
    assert not any(cpu_4bit.has_fused_copy(m) for m in cpu_4bit.linear4bit_layers(exact))
    small, large = torch.tensor([[1, 5, 6]]), torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    with torch.no_grad():
        got_small, want_small = model(input_ids=small).logits, exact(input_ids=small).logits
        if fused_here:
            assert _calls(model) == {"fused": len(layers), "dequantize": 0}
            assert cpu_4bit.compute_path(model)["path"] == "fused-bf16"
            diff = (got_small - want_small).abs().max().item()
            assert 0 < diff <= 2e-2 * want_small.abs().max().item()  # bf16, really taken
        else:
            torch.testing.assert_close(got_small, want_small, rtol=0, atol=0)
        got_large, want_large = model(input_ids=large).logits, exact(input_ids=large).logits
    torch.testing.assert_close(got_large, want_large, rtol=0, atol=0)
    if fused_here:
        assert _calls(model) == {"fused": len(layers), "dequantize": len(layers)}
        assert cpu_4bit.compute_path(model)["max_rows"] == 4


def test_the_weights_themselves_are_never_repacked(lm_dir, cpu_4bit_path):
    """Saving (or merging, or moving) a model that ran fused calls sees the exact weights."""
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    fresh, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu", fused_cpu_4bit=False)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6]]))
    assert not any(cpu_4bit.is_packed(m) for m in cpu_4bit.linear4bit_layers(model))
    ours, theirs = model.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_a_model_made_to_train_drops_its_copies(lm_dir, cpu_4bit_path):
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    layers = cpu_4bit.linear4bit_layers(model)
    cpu_4bit.configure_for_training(model)
    assert not any(cpu_4bit.has_fused_copy(m) for m in layers)
    assert all(type(m).__module__.startswith("bitsandbytes") for m in layers)


def test_grad_calls_never_take_the_fused_kernel(lm_dir, cpu_4bit_path):
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    x = torch.randn(1, 2, 64, requires_grad=True)
    layer = cpu_4bit.linear4bit_layers(model)[0]
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if cpu_4bit_path == "fused":
        assert layer.rrhf_fused.calls == {"fused": 0, "dequantize": 1}


# ------------------------------------------------------------------- the measured crossover


def _fake_timer(fused_wins_up_to):
    """A timer for measure_crossover: the fused call is faster up to `fused_wins_up_to` rows."""
    def timer(fused_call, plain_call, repeats):
        rows = timer.rows.pop(0)
        return (1.0, 2.0) if fused_wins_up_to is None or rows <= fused_wins_up_to else (2.0, 1.0)
    return timer


@pytest.mark.parametrize(("wins_up_to", "expected"), [(16, 16), (0, 0), (None, None), (1, 1)])
def test_crossover_is_the_largest_count_where_fused_wins_on_every_layer(
        lm_dir, cpu_4bit_path, monkeypatch, wins_up_to, expected):
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu", fused_cpu_4bit=False)
    layers = [m for m in cpu_4bit.linear4bit_layers(model) if cpu_4bit.packable(m)][:2]
    timer = _fake_timer(wins_up_to)
    # each row count is timed on both layers, until the first loss
    timer.rows = [r for r in cpu_4bit.CALIBRATION_ROWS for _ in layers]
    assert cpu_4bit.measure_crossover(layers, timer=timer) == expected


def test_crossover_is_measured_once_then_read_from_the_cache(lm_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_4bit, "fused_kernel_available", lambda: True)  # (no call runs)
    monkeypatch.setenv("RRHF_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_4bit, "fused_max_rows", MEASURED_MAX_ROWS)
    measured = []
    monkeypatch.setattr(cpu_4bit, "measure_crossover",
                        lambda layers, timer=None: measured.append(len(layers)) or 24)
    first, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    second, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    # one measurement, on one layer per distinct shape (q/o, k/v, gate/up, down, head if 4-bit)
    shapes = {tuple(m.weight.quant_state.shape) for m in cpu_4bit.linear4bit_layers(first)}
    assert measured == [len(shapes)]
    assert cpu_4bit.compute_path(second)["max_rows"] == 24
    cache = json.loads((tmp_path / "cpu_4bit_crossover.json").read_text())
    (key, value), = cache.items()
    assert value == 24 and f"{torch.get_num_threads()} threads" in key


def test_no_measurement_without_the_fused_kernel(lm_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_4bit, "fused_kernel_available", lambda: False)
    monkeypatch.setattr(cpu_4bit, "fused_max_rows", MEASURED_MAX_ROWS)
    monkeypatch.setattr(cpu_4bit, "measure_crossover", lambda *a, **k: pytest.fail("measured"))
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu")
    assert not any(cpu_4bit.has_fused_copy(m) for m in cpu_4bit.linear4bit_layers(model))


def test_the_real_measurement_returns_a_measured_row_count(lm_dir, cpu_4bit_path, monkeypatch):
    """measure_crossover on real calls (the emulated kernel where the CPU lacks it): a count from
    CALIBRATION_ROWS, 0, or None, and the layers left as they were."""
    model, _ = load_causal_lm(str(lm_dir), load_in_4bit=True, device="cpu", fused_cpu_4bit=False)
    layers = [m for m in cpu_4bit.linear4bit_layers(model) if cpu_4bit.packable(m)][:1]
    monkeypatch.setattr(cpu_4bit, "CALIBRATION_ROWS", (1, 2, 4))
    monkeypatch.setattr(cpu_4bit, "CALIBRATION_REPEATS", 2)
    result = cpu_4bit.measure_crossover(layers)
    assert result in (0, 1, 2, 4, None)
    assert not cpu_4bit.is_packed(layers[0]) and not cpu_4bit.has_fused_copy(layers[0])


def test_recipe_key_reaches_the_loader():
    from rrhf_lite.config.recipe import parse_recipe

    base = {"model": {"name_or_path": "m"}, "stages": ["merge"]}
    assert parse_recipe(base).policy_load_kwargs()["fused_cpu_4bit"] == "auto"
    rows = parse_recipe({**base, "quantization": {"fused_cpu_max_rows": 16}})
    assert rows.policy_load_kwargs()["fused_cpu_4bit"] == 16
    off = parse_recipe({**base, "quantization": {"fused_cpu_kernel": False,
                                                 "fused_cpu_max_rows": 16}})
    assert off.policy_load_kwargs()["fused_cpu_4bit"] is False
