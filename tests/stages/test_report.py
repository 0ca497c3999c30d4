"""Run report (metrics.json, report.md, terminal table) and PNG plots."""

from __future__ import annotations

import datetime
import json
import math
import struct
from importlib.metadata import version

import pytest
import torch
from rich.console import Console

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import write_jsonl
from rrhf_lite.utils.plots import plot_reward_distributions, plot_training_curves, training_curves
from rrhf_lite.utils.report_files import (
    format_table,
    format_value,
    print_summary_table,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "variants": {
        "initial": {"reward/held_out": -0.25, "ranking/accuracy": 0.5, "perplexity": 12.3456789},
        "round-1": {"reward/held_out": torch.tensor(0.75), "ranking/accuracy": 0.625,
                    "perplexity": float("nan")},
    },
    "best_of_n": {"reward/held_out": 1.5, "n": 4},
    "ranking_pairs": 96,
}
ROWS = [
    {"variant": "initial", "reward/held_out": -0.25, "ranking/accuracy": 0.5},
    {"variant": "round-1", "reward/held_out": 0.75, "ranking/accuracy": 0.625},
    {"variant": "best-of-4", "reward/held_out": 1.5},
]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- write_run_report


def test_metrics_json_structure(tmp_path):
    (tmp_path / "curves.png").write_bytes(PNG_MAGIC)
    paths = write_run_report(tmp_path, METRICS, title="tiny run", tables=[("Results", ROWS)],
                             notes=["ranking/accuracy counts ties as half"],
                             images=[tmp_path / "curves.png"])
    assert paths == {"metrics": tmp_path / "metrics.json", "report": tmp_path / "report.md"}
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert set(doc) == {"title", "created", "versions", "metrics", "tables", "notes", "images"}
    assert doc["title"] == "tiny run"
    created = datetime.datetime.fromisoformat(doc["created"])
    assert created.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 600
    assert doc["versions"]["torch"] == version("torch")
    assert {"python", "rrhf-lite", "transformers", "peft"} <= set(doc["versions"])

    m = doc["metrics"]
    assert m["variants"]["initial"] == {"reward/held_out": -0.25, "ranking/accuracy": 0.5,
                                        "perplexity": 12.3456789}
    assert m["variants"]["round-1"]["reward/held_out"] == 0.75  # tensor -> number
    assert m["variants"]["round-1"]["perplexity"] is None  # NaN -> null: strict JSON
    assert m["best_of_n"] == {"reward/held_out": 1.5, "n": 4} and m["ranking_pairs"] == 96
    assert doc["tables"] == {"Results": ROWS}
    assert doc["notes"] == ["ranking/accuracy counts ties as half"]
    assert doc["images"] == ["curves.png"]
    assert _no_temp_files(tmp_path)


def test_report_md_shows_the_same_numbers(tmp_path):
    write_run_report(tmp_path, METRICS, title="tiny run", tables=[("Results", ROWS)],
                     notes=["a note"], images=[tmp_path / "plots" / "rewards.png"])
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# tiny run\n")
    assert "## Results\n\n| variant | reward/held_out | ranking/accuracy |\n|---|---:|---:|\n" in text
    assert "| round-1 | 0.75 | 0.625 |" in text
    assert "| best-of-4 | 1.5 |  |" in text  # missing cell is blank
    assert "## All metrics" in text
    assert "| variants.initial.perplexity | 12.3457 |" in text
    assert "| variants.round-1.perplexity |  |" in text  # NaN stored as null shows blank
    assert "| ranking_pairs | 96 |" in text
    assert "![rewards](plots/rewards.png)" in text
    assert "## Notes\n\n- a note\n" in text


def test_bad_metric_names_its_key_and_keeps_the_old_report(tmp_path):
    write_run_report(tmp_path, {"a": 1.0}, title="first")
    before = {p: (tmp_path / p).read_text() for p in ("metrics.json", "report.md")}
    with pytest.raises(TypeError, match=r"variants\.initial\.reward.*str"):
        write_run_report(tmp_path, {"variants": {"initial": {"reward": "high"}}}, title="second")
    assert {p: (tmp_path / p).read_text() for p in before} == before
    assert _no_temp_files(tmp_path)


def test_duplicate_table_headings_are_both_kept(tmp_path):
    write_run_report(tmp_path, {}, title="t", tables=[("Results", ROWS[:1]), ("Results", ROWS[1:])])
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert list(doc["tables"]) == ["Results", "Results (2)"]
    assert doc["tables"]["Results (2)"] == ROWS[1:]
    assert "## Results (2)" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------- tables


def test_format_table_columns_escaping_and_alignment():
    rows = [{"name": "a|b", "score": 0.123456}, {"name": "line\nbreak", "n": 3, "score": 2}]
    table = format_table(rows)
    lines = table.strip().split("\n")
    assert lines[0] == "| name | score | n |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b | 0.1235 |  |"
    assert lines[3] == "| line<br>break | 2 | 3 |"
    assert len(lines) == 4
    assert format_table(rows, columns=["score"]).split("\n")[2] == "| 0.1235 |"
    assert format_table([]) == "_(no rows)_\n"


def test_format_table_plain_text_style():
    # the benchmarks' terminal tables: same renderer, fixed-width, their own cell style
    rows = [{"name": "a", "ms": 1.5}, {"name": "bb", "note": None, "ms": 12.25}]
    lines = format_table(rows, plain=True, title="T", cell=lambda v: "-" if v is None else str(v))
    assert lines.splitlines() == ["T", "name  ms     note", "----  -----  ----",
                                  "a     1.5    -   ", "bb    12.25  -   "]
    assert format_table([], plain=True, title="T") == "T\n(no rows)"


@pytest.mark.parametrize("value, text", [
    (0.123456, "0.1235"), (3, "3"), (2.0, "2"), (-1.5, "-1.5"), (1e-7, "1.000e-07"),
    (2.5e7, "2.500e+07"), (0.0, "0"), (float("nan"), "nan"), (float("-inf"), "-inf"),
    (True, "yes"), (None, ""), ("text", "text"), (torch.tensor(0.5), "0.5"),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_print_summary_table_renders_rows():
    console = Console(record=True, width=120, color_system=None)
    table = print_summary_table(ROWS, title="Results", console=console)
    out = console.export_text()
    assert "Results" in out and "reward/held_out" in out
    assert "round-1" in out and "0.625" in out and "best-of-4" in out
    justify = {c.header: c.justify for c in table.columns}
    assert justify == {"variant": "left", "reward/held_out": "right", "ranking/accuracy": "right"}


# ---------------------------------------------------------------- plots


def _history(steps=8):
    history = []
    for step in range(1, steps + 1):
        history.append({"loss": 2.0 / step, "loss/rank": 1.0 / step, "loss/sft": 1.0,
                        "rank/accuracy": step / steps, "learning_rate": 1e-4, "epoch": step / steps,
                        "step": step})
    history.append({"eval_loss": 0.5, "eval_rank/accuracy": 0.75, "epoch": 1.0, "step": steps})
    history.append({"train_runtime": 1.0, "train_loss": 0.6, "total_flos": 1e9, "step": steps})
    return history


def test_training_curves_groups_train_and_eval():
    curves = training_curves(_history(4))
    assert list(curves)[:4] == ["loss", "loss/rank", "loss/sft", "rank/accuracy"]
    assert "learning_rate" in curves
    assert not {"epoch", "step", "train_runtime", "train_loss", "total_flos"} & set(curves)
    assert curves["rank/accuracy"]["train"] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert curves["rank/accuracy"]["eval"] == [(4, 0.75)]
    assert curves["loss"]["eval"] == [(4, 0.5)]


def test_plot_training_curves_from_history_and_jsonl(tmp_path):
    out = plot_training_curves(_history(), tmp_path / "a" / "curves.png")
    assert out == tmp_path / "a" / "curves.png"
    width, height = _png_size(out)
    assert (width, height) == (1200, 600)  # 5 metrics -> 3 columns x 2 rows of 4x3 in
    assert out.stat().st_size > 10_000

    write_jsonl(tmp_path / "metrics.jsonl", _history())
    again = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "b.png",
                                 metrics=["loss", "rank/accuracy"])
    assert _png_size(again) == (800, 300)
    assert _no_temp_files(tmp_path / "a") and _no_temp_files(tmp_path)


def test_plot_training_curves_edge_cases(tmp_path):
    empty = plot_training_curves([{"epoch": 1.0, "step": 1}], tmp_path / "empty.png")
    assert _png_size(empty) == (400, 300) and empty.stat().st_size > 1000
    (tmp_path / "bad.jsonl").write_text('{"loss": 1}\nnot json\n')
    with pytest.raises(UserInputError, match="bad.jsonl line 2"):
        plot_training_curves(tmp_path / "bad.jsonl", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_reward_distributions(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rewards = {
        "initial": torch.randn(64, generator=gen).tolist(),
        "round-1": (torch.randn(64, generator=gen) + 1).tolist(),
        "best-of-n": [2.0, 2.0, 2.0],  # constant: drawn as a point, not a violin
        "single": [0.5, math.nan],  # NaN dropped
        "empty": [],
    }
    out = plot_reward_distributions(rewards, tmp_path / "rewards.png")
    assert _png_size(out) == (1100, 400) and out.stat().st_size > 10_000
    nothing = plot_reward_distributions({"a": [], "b": [math.nan]}, tmp_path / "none.png")
    assert _png_size(nothing) == (1100, 400)
    assert _no_temp_files(tmp_path)
