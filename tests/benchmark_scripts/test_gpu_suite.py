"""benchmarks/gpu_suite.py and benchmarks/e2e_bench.py on the CPU: the dry run end to end (so
the suite cannot rot between GPU windows), and the parts whose failure would waste a GPU window:
the correctness check must catch a wrong kernel, the budget must skip and still write, the
random QLoRA model must match what rrhf_lite.models.training_loader.load_model_for_training builds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _suite_checks as checks  # noqa: E402
import _suite_output as output  # noqa: E402
import _suite_runner as runner  # noqa: E402
import _suite_setup as setup  # noqa: E402
import e2e_bench  # noqa: E402

KERNEL_KEYS = {"name", "shape", "dtype", "ms", "speedup_vs_naive", "bandwidth_fraction"}
E2E_KEYS = {"model", "variant", "peak_memory_gb", "step_s"}


def _run_suite(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--dry", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, timeout=600)


def _load(out: Path) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").is_file()
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def dry_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    proc = _run_suite(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _load(out), (sorted(out.glob("*.md"))[0]).read_text(), proc.stdout


def test_dry_run_writes_the_documented_layout(dry_results):
    results, _, _ = dry_results
    for key in ("device", "date", "versions", "correctness", "kernel", "e2e", "goals",
                "skipped", "errors", "status"):
        assert key in results, key
    assert results["mode"] == "dry" and results["status"] == "complete"
    assert results["errors"] == [] and results["skipped"] == []
    assert results["versions"]["torch"] == torch.__version__.split("+")[0] or \
        results["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert results["versions"]["transformers"] and results["versions"]["bitsandbytes"]


def test_dry_run_checks_every_correctness_case(dry_results):
    rows = dry_results[0]["correctness"]
    plan = runner.dry_plan()
    assert len(rows) == len(plan.correctness_cases)
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    for row in rows:
        assert row["passed"], row
        assert row["backend"] == "triton"
        assert row["ignored_grad_max"] == 0.0 and row["empty_row_sum"] == 0.0
        assert 0.0 <= row["grad_err_vs_tol"] <= 1.0 and 0.0 <= row["sum_err_vs_tol"] <= 1.0


def test_dry_run_kernel_rows(dry_results):
    rows = dry_results[0]["kernel"]
    timed = [r for r in rows if r.get("ms") is not None]
    assert {r["name"] for r in timed} >= {"naive", "rrhf_torch"}
    for row in timed:
        assert KERNEL_KEYS <= set(row), row
        assert row["ms"] > 0
    naive = [r for r in timed if r["name"] == "naive"]
    assert all(r["speedup_vs_naive"] == 1.0 for r in naive)
    keys = [(r["name"], r["shape"], r["dtype"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate kernel rows"


def test_dry_run_runs_the_gpu_marked_tests(dry_results):
    tests = dry_results[0]["gpu_tests"]
    assert tests["status"] == "all skipped", tests
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"] and tests["failures"] == 0
    assert "tests/kernels/test_kernel_gpu.py" in tests["files"]


def test_dry_run_e2e_rows(dry_results):
    rows = dry_results[0]["e2e"]
    variants = {r["variant"] for r in rows}
    assert "rrhf-lite mb=1" in variants and "rrhf-lite mb=2" in variants
    assert any(v.startswith("reference") for v in variants)
    for row in rows:
        assert E2E_KEYS <= set(row), row
        assert row["status"] == "ok", row
        assert row["step_s"] > 0 and row["peak_memory_gb"] is None  # no CUDA: not measured
        assert row["loss_finite"] and math.isfinite(row["loss"])
        assert row["autocast"] == "bf16"
        # the reference step and RRHFTrainer compute the same objective on the same weights
        assert row["loss_abs_diff"] <= 1e-3 * abs(row["reference_loss"]), row
    # Every variant optimises the same loss on the same batch; the first (warm-up) losses
    # differ only by the optimizer steps in between, so all stay in the same range.
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 0.5 * max(abs(x) for x in losses)


def test_dry_run_hidden_state_rows(dry_results):
    results, md, _ = dry_results
    checks = results["hidden_correctness"]
    assert len(checks) == len(runner.dry_plan().hidden_shapes) and all(r["passed"] for r in checks)
    rows = results["hidden"]
    assert {r["path"] for r in rows} == {"logits", "hidden_fused", "hidden_autograd"}
    for row in rows:
        assert row["ms"] > 0 and row["max_abs_err_vs_logits"] < 1e-4
    assert "Log-probs from hidden states" in md


def test_dry_run_shared_prompt_rows(dry_results):
    results, md, _ = dry_results
    checks = results["shared_correctness"]
    assert [r["attn"] for r in checks] == list(runner.dry_plan().shared_check_attn)
    assert all(r["passed"] and r["max_sum_err"] <= 1e-5 for r in checks), checks
    rows = results["shared"]
    assert [r["mode"] for r in rows] == ["unshared", "shared"] * len(runner.dry_plan().shared_shapes)
    for unshared, shared in zip(rows[::2], rows[1::2], strict=True):
        assert shared["tokens"] < unshared["tokens"] and shared["ms"] > 0
        assert shared["loss_diff"] <= 1e-5 * max(1.0, abs(unshared["loss"]))
    assert "## Shared prompt" in md


def test_dry_run_plan_rows(dry_results):
    rows = dry_results[0]["plan"]
    measured = [r for r in rows if r.get("source") != "e2e"]
    beside_e2e = [r for r in rows if r.get("source") == "e2e"]
    assert len(measured) == 2 and all(abs(r["err_total"]) <= 0.15 for r in measured), measured
    assert {r["micro_batch"] for r in beside_e2e} >= {1, 2}  # one per measured rrhf-lite row
    assert all(r["pred_total_mb"] > 0 and r["meas_total_mb"] is None for r in beside_e2e)
    assert "## Memory plan vs measured" in dry_results[1]


def test_dry_run_recipe_step_item_is_declared_and_plans(dry_results):
    # the 8 GB recipe's step: the GPU run measures all 32 blocks; dry, a tiny width runs the same
    # code on the CPU and both plans are computed (nothing measured without CUDA)
    assert runner.gpu_plan().recipe_step and runner.dry_plan().recipe_step
    results, md, _ = dry_results
    (row,) = results["recipe_step"]
    assert row["recipe"] == "llama3_8b_qlora_8gb.yaml" and row["dry"] and row["meas_gib"] is None
    assert row["k"] == 6 and row["micro_batch"] == 2  # the recipe's k and candidate micro-batch
    assert row["forward_choices"]["logprob_path"] == "hidden" and row["forward_choices"]["share_prompt"]
    assert 0 < row["plan_gib"] < 0.1 and 6 < row["recipe_plan_gib"] < 8  # tiny width; the 8B recipe
    assert row["plan_peak_at"] in ("last block's recompute", "last block's backward")
    assert "8 GB recipe's training step vs its plan" in md


def test_dry_run_goals_and_markdown(dry_results):
    results, md, stdout = dry_results
    goals = {g["goal"]: g for g in results["goals"]}
    assert len(goals) == 12
    assert all(g["status"] in {"PASS", "FAIL", "NOT MEASURED"} for g in goals.values())
    correctness = next(g for name, g in goals.items() if "float64" in name)
    assert correctness["status"] == "PASS"
    memory = next(g for name, g in goals.items() if "peak memory" in name)
    assert memory["status"] == "NOT MEASURED"  # CPU: no CUDA allocator statistics
    tests = goals["pytest -m gpu passes"]
    assert tests["status"] == "NOT MEASURED" and tests["where"] == "all skipped"  # no CUDA
    assert "## Goals" in md and "| goal | status |" in md and "rrhf-lite mb=1" in md
    assert "Goals" in stdout and "status complete" in stdout


def test_zero_budget_skips_every_item_and_still_writes(tmp_path):
    proc = _run_suite(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _load(tmp_path)
    assert results["status"] == "partial"
    skipped = [s["item"] for s in results["skipped"]]
    assert "correctness" in skipped and any(s.startswith("e2e") for s in skipped)
    assert any(s.startswith("kernel") for s in skipped) and "pytest -m gpu" in skipped
    assert results["kernel"] == [] and results["e2e"] == [] and results["correctness"] == []
    assert all(g["status"] == "NOT MEASURED" for g in results["goals"])


# ----------------------------------------------------------------------------- in-process


def _suite(budget: float) -> runner.Suite:
    results = {"skipped": [], "errors": [], "timings_s": {}}
    writes = []
    suite = runner.Suite(results, budget, lambda: writes.append(1), reserve_s=0.0)
    suite.writes = writes
    return suite


def test_suite_stops_an_item_at_its_cap_and_records_it():
    suite = _suite(60)
    started = time.monotonic()
    assert not suite.run_item("sleepy", 0, lambda: time.sleep(30), cap_s=0.3)
    assert time.monotonic() - started < 20
    assert suite.results["skipped"][0]["item"] == "sleepy"
    assert "stopped" in suite.results["skipped"][0]["reason"]
    assert suite.writes  # results written after the item


def test_suite_records_errors_and_skips_what_does_not_fit():
    suite = _suite(60)

    def boom():
        raise ValueError("broken")

    assert not suite.run_item("boom", 0, boom)
    assert suite.results["errors"][0]["error"] == "ValueError: broken"
    assert not suite.run_item("huge", 10_000, lambda: None)
    assert suite.results["skipped"][0]["item"] == "huge"
    assert suite.run_item("fine", 0, lambda: None)


def test_item_timeout_is_not_swallowed_by_except_exception():
    # benchmarks catch Exception per path/variant; the stop must still reach the suite
    assert not issubclass(runner.ItemTimeout, Exception)


def _torch_sums(x, y):
    import rrhf_kernels

    return rrhf_kernels.candidate_logprob_sums(x, y, backend="torch")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_correctness_check_passes_a_correct_kernel(dtype):
    row = checks.check_case(dtype, 3, 7, 300, "cpu", kernel_fn=_torch_sums, backend="torch")
    assert row["passed"], row


def test_correctness_check_catches_a_wrong_sum():
    def off_by_a_bit(x, y):
        sums, counts = _torch_sums(x, y)
        return sums + 1e-2 * (counts > 0), counts

    row = checks.check_case("fp32", 3, 7, 300, "cpu", kernel_fn=off_by_a_bit)
    assert not row["passed"] and row["sum_err_vs_tol"] > 1


def test_correctness_check_catches_a_wrong_gradient():
    def leaky_grad(x, y):
        sums, counts = _torch_sums(x, y)
        extra = 1e-3 * x.float().sum(dim=(1, 2))
        return sums + extra - extra.detach(), counts  # same values, gradient off everywhere

    row = checks.check_case("bf16", 3, 7, 300, "cpu", kernel_fn=leaky_grad)
    assert not row["passed"]
    assert row["grad_err_vs_tol"] > 1 and row["ignored_grad_max"] > 0


def test_correctness_reference_is_chunked(monkeypatch):
    # A small chunk budget forces several chunks per row; the result must not change.
    monkeypatch.setattr(checks, "REFERENCE_CHUNK_BYTES", 300 * 8 * 3 * 2)  # 2 tokens
    row = checks.check_case("fp32", 3, 7, 300, "cpu", kernel_fn=_torch_sums)
    assert row["passed"], row


def test_goals_pass_fail_and_not_measured():
    plan = runner.gpu_plan()
    results = {
        "kernel": [{"name": "rrhf_triton", "shape": "4x1024x128256", "dtype": "bf16",
                    "bandwidth_fraction": 0.85, "speedup_vs_naive": 2.5}],
        "e2e": [{"model": "llama3-8b", "variant": "rrhf-lite mb=1", "status": "ok",
                 "peak_memory_gb": 11.0},
                {"model": "llama3-8b", "variant": "rrhf-lite mb=2", "status": "ok",
                 "peak_memory_gb": 13.0},
                {"model": "llama3-8b", "variant": "reference (k at once)", "status": "ok",
                 "peak_memory_gb": 5.0}],
        "correctness": [{"passed": True}, {"passed": False}],
    }
    goals = output.evaluate_goals(results, plan)
    status = [g["status"] for g in goals]
    assert status == ["PASS", "FAIL", "PASS", "FAIL"] + ["NOT MEASURED"] * 8
    assert goals[2]["measured"] == 11.0 and "mb=1" in goals[2]["where"]
    results["gpu_tests"] = {"status": "failed", "tests": 3, "passed": 2, "summary": "1 failed"}
    assert output.evaluate_goals(results, plan)[4]["status"] == "FAIL"
    results["gpu_tests"] = {"status": "ok", "tests": 3, "passed": 3, "summary": "3 passed"}
    assert output.evaluate_goals(results, plan)[4]["status"] == "PASS"
    results["hidden"] = [{"path": "hidden_fused", "shape": "4x1024x4096x128256", "dtype": "bf16",
                          "peak_extra_vs_logits": 0.07}]
    results["hidden_correctness"] = [{"passed": True}]
    assert [g["status"] for g in output.evaluate_goals(results, plan)[5:7]] == ["PASS", "PASS"]
    results["shared"] = [
        {"mode": "shared", "shape": "P200 R100 k6", "speed_vs_unshared": 1.9, "memory_vs_unshared": 0.8},
        {"mode": "shared", "shape": "P30 R30 k2", "speed_vs_unshared": 1.1, "memory_vs_unshared": 1.05}]
    results["shared_correctness"] = [{"attn": "sdpa", "passed": True}, {"attn": "flex_attention", "passed": False}]
    assert [g["status"] for g in output.evaluate_goals(results, plan)[7:11]] == ["PASS", "FAIL", "FAIL", "FAIL"]
    results["recipe_step"] = [{"model": "m", "layers": 32, "k": 6, "seq_len": 512, "err": 0.04}]
    assert output.evaluate_goals(results, plan)[11]["status"] == "PASS"
    results["recipe_step"][0]["err"] = -0.08
    assert output.evaluate_goals(results, plan)[11]["status"] == "FAIL"
    empty = output.evaluate_goals({"kernel": [], "e2e": [], "correctness": []}, plan)
    assert {g["status"] for g in empty} == {"NOT MEASURED"}


def test_add_kernel_rows_keeps_the_first_of_each_key():
    rows = [{"name": "naive", "shape": "1x2x3", "dtype": "bf16", "ms": 1.0}]
    runner.add_kernel_rows(rows, [{"name": "naive", "shape": "1x2x3", "dtype": "bf16", "ms": 2.0},
                                     {"name": "liger", "shape": "1x2x3", "dtype": "bf16", "ms": 0.5}])
    assert [(r["name"], r["ms"]) for r in rows] == [("naive", 1.0), ("liger", 0.5)]


def test_readme_documents_wheels_and_device_command():
    doc = (BENCH / "README.md").read_text()
    for wheel in setup.WHEELS:
        assert wheel in doc, wheel
    assert "--out $OUT" in doc and 'carry [".whl"]' in doc
    line = next(x.strip() for x in doc.splitlines() if "gpu_suite.py --out $OUT" in x)
    assert len(line) < 2000


# ----------------------------------------------------------------------------- e2e_bench


def test_make_batch_shapes_and_masks():
    batch = e2e_bench.make_batch(vocab_size=50, k=4, seq_len=12, prompt_len=3)
    assert batch["input_ids"].shape == (4, 12) and batch["attention_mask"].all()
    assert (batch["labels"][:, :3] == -100).all() and (batch["labels"][:, 3:] >= 3).all()
    assert batch["rewards"].shape == (1, 4) and len(set(batch["rewards"][0].tolist())) == 4
    with pytest.raises(ValueError):
        e2e_bench.make_batch(vocab_size=50, k=4, seq_len=12, prompt_len=12)


def test_mixed_precision_autocasts_every_step_not_only_the_first():
    # accelerate's prepare_model after one prepare + unwrap round trip left the forward
    # without autocast: every step after the warm-up ran in fp32
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.linear(x)

    model = Probe()
    for _ in range(3):
        with e2e_bench.mixed_precision(model, True) as prepared:
            out = prepared(torch.randn(2, 4))
        assert out.dtype == torch.float32  # handed back in fp32, as accelerate does
    assert seen == [True, True, True]
    model(torch.randn(2, 4))
    assert seen[-1] is False and "forward" not in model.__dict__  # undone on exit


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # fp32 on the CPU; the GPU's dtypes
def test_random_qlora_model_matches_the_real_loader(tiny_lm_dir, dtype):
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from rrhf_lite.models.training_loader import ModelArguments, load_model_for_training

    args = ModelArguments(model_name_or_path=str(tiny_lm_dir), torch_dtype=dtype,
                          bnb_4bit_compute_dtype=dtype)
    real, _ = load_model_for_training(args)
    config = AutoConfig.from_pretrained(tiny_lm_dir)
    ours = e2e_bench.build_random_qlora_model(config, "cpu", args)

    def layout(model):
        return {name: (type(m).__name__) for name, m in model.named_modules()}

    def params(model):
        return {name: (tuple(p.shape), p.dtype, p.requires_grad)
                for name, p in model.named_parameters()}

    assert layout(ours) == layout(real)
    assert params(ours) == params(real)
    assert ours.is_gradient_checkpointing == real.is_gradient_checkpointing is True
    for attr in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        assert getattr(ours, attr) == getattr(real, attr), attr
    assert type(ours.hf_quantizer) is type(real.hf_quantizer)
    assert ours.hf_quantizer.is_trainable
    quantised = [m for m in ours.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.weight.bnb_quantized for m in quantised)
    assert all(m.weight.quant_type == "nf4" for m in quantised)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the random weights are not degenerate: a forward gives finite, non-constant logits
    ids = torch.randint(3, config.vocab_size, (2, 9))
    logits = ours(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


# ----------------------------------------------------------------------------- setup


def _make_wheel(folder: Path, name: str = "rrhfsuiteprobe", version: str = "0.1",
                init: str = "VALUE = 42\n") -> Path:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": init,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_install_wheels_offline_into_a_target_first_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels)
    target = tmp_path / "site"
    info = setup.install_wheels(wheels, target=target)
    assert info["wheels"] == ["rrhfsuiteprobe-0.1-py3-none-any.whl"] and "install_s" in info
    assert sys.path[0] == str(target)
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(target)
    assert "bitsandbytes" in info["missing_from_wheel_dir"]
    probe = subprocess.run([sys.executable, "-c", "import rrhfsuiteprobe; print(rrhfsuiteprobe.VALUE)"],
                           capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert probe.stdout.strip() == "42", probe.stderr
    again = setup.install_wheels(wheels, target=target)  # a rerun on a warm machine
    assert "install_s" not in again


def test_install_wheels_without_wheels_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    info = setup.install_wheels(tmp_path / "absent", target=tmp_path / "site")
    assert info["wheels"] == [] and "no wheels" in info["note"] and sys.path == before


def test_optional_packages_that_do_not_import_are_removed(tmp_path, monkeypatch):
    # e.g. datasets built for a newer pyarrow than the GPU image has: transformers.Trainer
    # would import it and break, so the suite uninstalls it again (liger stands in here)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels)
    _make_wheel(wheels, name="liger_kernel", version="9.9",
                init="raise RuntimeError('built for another triton')\n")
    target = tmp_path / "site"
    info = setup.install_wheels(wheels, target=target)
    assert list(info["dropped"]) == ["liger_kernel"]
    assert "another triton" in info["dropped"]["liger_kernel"]
    assert not (target / "liger_kernel").exists() and not list(target.glob("liger_kernel-*"))
    assert (target / "rrhfsuiteprobe" / "__init__.py").is_file()
