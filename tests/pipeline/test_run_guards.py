"""Guards of a run (issue 16): training that goes non-finite stops with exit 2 and keeps its last
good checkpoint; one run at a time per run directory; and any value of a recipe key gives exit
0 or 2 from `validate`, never 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.recipes import train_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrhf_lite.cli import main
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline.lock import LOCK_NAME, acquire, release

GOOD = {"prompt": "Q: hi", "responses": ["good answer", "bad"], "scores": [1.0, 0.0]}


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 2, encoding="utf-8")
    return path


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- non-finite training


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_lm_dir,
                                                                      capsys):
    run = tmp_path / "run"
    recipe = train_recipe(tmp_path / "r.yaml", tiny_lm_dir, _data(tmp_path), run,
                          train={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    code, err = _cli(["run", recipe], capsys)
    assert code == 2, err
    assert "Traceback" not in err and "training stopped at step" in err, err
    assert "train.learning_rate" in err and "what to do:" in err, err
    train_dir = run / "round-1" / "train"
    assert not (train_dir / "adapter").exists()  # no NaN adapter that looks finished
    assert not (train_dir / "train_summary.json").exists()
    checkpoints = sorted(p.name for p in train_dir.glob("checkpoint-*"))
    for name in checkpoints:  # every checkpoint kept is from a finite step, and is named
        from safetensors.torch import load_file

        weights = load_file(str(train_dir / name / "adapter_model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values()), name
    if checkpoints:
        assert checkpoints[-1] in err, err
    assert not (run / LOCK_NAME).exists()  # the lock goes with the run


# ------------------------------------------------------------------------------------ lock


def _lock(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(
        {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}))


def test_second_run_in_a_locked_directory_is_refused(tmp_path, tiny_lm_dir, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(run, holder.pid)
        recipe = train_recipe(tmp_path / "r.yaml", tiny_lm_dir, _data(tmp_path), run)
        code, err = _cli(["run", recipe], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, err
    assert f"pid {holder.pid}" in err and socket.gethostname() in err and "started" in err, err
    assert {p.name for p in run.iterdir()} == {LOCK_NAME}  # nothing of ours written


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(run, dead.pid)
    path = acquire(run)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_lock_of_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    _lock(run, 1, host="some-other-host")
    with pytest.raises(UserInputError, match="some-other-host"):
        acquire(run)


def test_a_failed_run_releases_its_lock(tmp_path, tiny_lm_dir, capsys):
    run = tmp_path / "run"
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"prompt": "a", "responses": ["x"], "scores": ["high"]}\n')
    recipe = train_recipe(tmp_path / "r.yaml", tiny_lm_dir, bad, run)
    code, err = _cli(["run", recipe], capsys)
    assert code == 2, err
    assert not (run / LOCK_NAME).exists()


# ------------------------------------------------------------- any recipe value: exit 0 or 2

KEYS = ["train.learning_rate", "train.num_train_epochs", "train.warmup_ratio", "seed",
        "train.lr_scheduler_type", "train.report_to", "train.extra.optim", "train.max_steps",
        "train.extra.not_a_field", "lora.dropout", "lora.target_modules", "output_dir",
        "model.tokenizer", "model.attn_implementation", "model.name_or_path", "data.candidates",
        "data.eval_prompts", "evaluate.perplexity_model", "name", "stages", "train.length_penalty"]

PATHS = st.builds(lambda prefix, parts: prefix + "/".join(parts),
                  st.sampled_from(["", "~", "~/", "/", "./", "../", "/dev/null/"]),
                  st.lists(st.text(max_size=8), max_size=3))
VALUES = st.one_of(st.floats(), st.text(max_size=20), PATHS, st.integers(), st.booleans(),
                   st.none(), st.lists(st.text(max_size=5), max_size=2))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_recipe_value_validates_or_exits_2(tmp_path_factory, tiny_lm_dir, capsys, key, value):
    tmp = tmp_path_factory.mktemp("any")
    recipe = train_recipe(tmp / "r.yaml", tiny_lm_dir, _data(tmp), tmp / "run")
    raw = yaml.safe_load(recipe.read_text())
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = sorted(os.listdir(Path.cwd()))
    code, err = _cli(["validate", recipe], capsys)
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    assert sorted(os.listdir(Path.cwd())) == before  # validate writes nothing
    assert not (tmp / "run").exists()


def test_disk_full_is_the_machines_problem_not_ours(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    import errno

    import rrhf_lite.pipeline.run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(rrhf_lite.pipeline.run, "run_recipe", full)
    recipe = train_recipe(tmp_path / "r.yaml", tiny_lm_dir, _data(tmp_path), tmp_path / "run")
    code, err = _cli(["run", recipe], capsys)
    assert code == 2 and "No space left on device" in err and "what to do:" in err, err
    assert "Traceback" not in err, err
