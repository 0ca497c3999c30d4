"""The kernel benchmark's plumbing (not its timings): the API the GPU suite calls, the result
file helpers in benchmarks/_common.py, and the CPU peak-memory probe."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("kernel_bench")


@pytest.fixture(scope="module")
def common(bench):
    return sys.modules["_common"] if "_common" in sys.modules else sys.modules["benchmarks._common"]


def test_run_kernel_bench_rows(bench):
    rows = bench.run_kernel_bench([(2, 5, 70)], ["fp32", "bf16"], "cpu", ["rrhf_torch"], repeat=1,
                                  measure_memory=False)
    names = {r["name"] for r in rows}
    assert {"naive", "rrhf_torch"} <= names
    for row in rows:
        if "note" in row:
            continue
        assert row["shape"] == "2x5x70" and row["ms"] > 0 and row["speedup_vs_naive"] > 0
        assert row["max_abs_err_vs_naive"] < (1e-4 if row["dtype"] == "fp32" else 1e-2)
        assert row["bandwidth_fraction"] is None  # CPU: no device copy to compare with


def test_memory_probe_reports_something(bench):
    mem = bench._memory_case("rrhf_torch", (2, 16, 5000), "fp32")
    assert mem["peak_extra_bytes"] >= 0 and mem["memory_method"]


def test_common_write_result_and_table(common, tmp_path):
    path = common.write_result("unit-test", {"rows": [{"a": 1}]}, results_dir=tmp_path)
    record = json.loads(path.read_text())
    assert path.name.endswith("-cpu-unit-test.json") and record["rows"] == [{"a": 1}]
    for key in ("machine", "cpu", "date", "python", "torch", "triton", "transformers"):
        assert key in record["environment"]
    with pytest.raises(ValueError):
        common.write_result("bad/name", {}, results_dir=tmp_path)
    table = common.format_table([{"x": 1.234567, "y": None}], title="T")
    assert table.splitlines() == ["T", "x      y", "-----  -", "1.235  -"]
    timing = common.time_fn(lambda: None, warmup=0, repeat=3)
    assert timing["repeat"] == 3 and timing["ms_min"] <= timing["ms"] <= timing["ms_max"]
