"""Faults and unsafe files: kills while saving, merging and training; pickles, remote code, YAML
tags and reward-function imports."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.recipes import train_recipe

from rrhf_lite.cli import main
from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import atomic_directory, last_complete_checkpoint

ROWS = [
    {"prompt": f"Q{i}: rate", "responses": ["good stuff", "fine", "bad"][: 2 + i % 2],
     "scores": [2.0, 1.0, 0.0][: 2 + i % 2]}
    for i in range(4)
]


def _write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# this file's training settings, on top of conftest's train_recipe
_FAULT_TRAIN = {"max_length": 48, "max_prompt_length": 24, "learning_rate": 1e-2,
                "lr_scheduler_type": "constant"}


def _recipe(tmp_path: Path, model_dir, data, out, name="recipe.yaml", **sections) -> Path:
    sections["train"] = {**_FAULT_TRAIN, **sections.get("train", {})}
    return train_recipe(tmp_path / name, model_dir, data, out, **sections)


# ------------------------------------------------------------------- (a) atomic directories

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rrhf_lite.utils.io import atomic_directory
    with atomic_directory(sys.argv[1], overwrite=True) as tmp:
        (Path(tmp) / "config.json").write_text("new")
        (Path(tmp) / "model.safetensors").write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(600)
        (Path(tmp) / "model.safetensors").write_bytes(b"whole")
""")


@pytest.mark.parametrize("old", [True, False], ids=["replacing", "new"])
def test_kill_while_writing_a_directory(tmp_path, old):
    target = tmp_path / "adapter"
    if old:
        target.mkdir()
        (target / "config.json").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    if old:
        assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "old"}
    else:
        assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]
    assert leftovers, "the killed writer's temporary directory should be there (hidden)"
    # the next writer removes the dead writer's partial directory and completes
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("newer")
    assert (target / "config.json").read_text() == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_crash_between_the_two_renames_keeps_the_old_directory(tmp_path, monkeypatch):
    """overwrite moves the old dir aside, then renames the new one in; die in between."""
    import rrhf_lite.utils.io as io

    target = tmp_path / "merged"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill: no cleanup code of ours runs after
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not target.exists()  # nothing that looks complete...
    # ...and the next writer puts the old directory back before anything else
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True):
        raise RuntimeError("this write fails too")
    assert (target / "weights").read_text() == "old"


def test_existing_directory_is_refused_before_the_work(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ran = []
    with pytest.raises(UserInputError, match="already exists"), atomic_directory(target):
        ran.append(True)
    assert not ran


@pytest.mark.parametrize("old", [True, False], ids=["force_over_old", "new"])
def test_merge_crash_while_saving_leaves_nothing_half_written(
        tmp_path, tiny_lm_dir, tiny_adapter_dir, monkeypatch, old):
    import rrhf_lite.stages.merge as merge

    out = tmp_path / "merged"
    if old:
        out.mkdir()
        (out / "model.safetensors").write_text("old model")
    real_save = merge._save_merged

    def save_then_die(model, tokenizer, directory, *args, **kwargs):
        real_save(model, tokenizer, directory, *args, **kwargs)
        assert any(Path(directory).iterdir())  # weights were being written
        raise MemoryError("killed while saving")

    monkeypatch.setattr(merge, "_save_merged", save_then_die)
    with pytest.raises(MemoryError):
        merge.merge_adapter(str(tiny_lm_dir), tiny_adapter_dir, out, torch_dtype="float32",
                            force=old, verify_prompts=[])
    if old:
        assert [p.name for p in out.iterdir()] == ["model.safetensors"]
        assert (out / "model.safetensors").read_text() == "old model"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["merged"] if old else [])


# --------------------------------------------------------------- (b) SIGKILL during training

_TRAIN = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import transformers
    original = transformers.Trainer._save_checkpoint

    def save_then_hang(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if os.environ.get("HANG_AFTER_STEP") == str(self.state.global_step):
            open(os.environ["HANG_MARKER"], "w").close()
            time.sleep(600)  # SIGKILLed here by the test

    transformers.Trainer._save_checkpoint = save_then_hang
    from rrhf_lite.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _train_cli(recipe: Path, hang_after: int | None = None, marker: Path | None = None):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if hang_after is not None:
        env["HANG_AFTER_STEP"], env["HANG_MARKER"] = str(hang_after), str(marker)
    return subprocess.Popen([sys.executable, "-c", _TRAIN, "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "round-1" / "train" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_the_same_adapter(tmp_path, tiny_lm_dir):
    import torch

    data = _write_rows(tmp_path / "cands.jsonl")
    train = {"max_steps": 4, "save_steps": 1, "save_total_limit": None,
             "extra": {"disable_tqdm": True}}
    whole = _recipe(tmp_path, tiny_lm_dir, data, tmp_path / "whole", "whole.yaml", train=train)
    killed = _recipe(tmp_path, tiny_lm_dir, data, tmp_path / "killed", "killed.yaml",
                     train=train)

    marker = tmp_path / "hanging"
    proc = _train_cli(killed, hang_after=2, marker=marker)
    deadline = time.monotonic() + 300
    # wait for the second checkpoint, then kill without warning
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    train_dir = tmp_path / "killed" / "round-1" / "train"
    assert marker.exists(), output
    assert (train_dir / "checkpoint-2" / "trainer_state.json").exists(), output
    assert not (train_dir / "adapter").exists()  # no result that looks complete

    # a checkpoint killed half-way through saving must not be the one we resume from
    half = train_dir / "checkpoint-3"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert last_complete_checkpoint(train_dir) == train_dir / "checkpoint-2"
    import shutil

    shutil.rmtree(half)  # the pipeline does not use last_complete_checkpoint yet (see report)

    for recipe in (killed, whole):
        proc = _train_cli(recipe)
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output
        if recipe is killed:
            assert "resuming training from" in output and "checkpoint-2" in output, output

    resumed, uninterrupted = _adapter_tensors(tmp_path / "killed"), _adapter_tensors(
        tmp_path / "whole")
    assert resumed.keys() == uninterrupted.keys() and resumed
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # and training did move the adapter (the comparison is not between two untouched inits)
    assert any(t.abs().max() > 0 for n, t in uninterrupted.items() if "lora_B" in n)


def test_last_complete_checkpoint_skips_half_saved(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((2, True), (10, True), (11, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


# ------------------------------------------------------------------------- (c) unsafe files


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded (and code ran)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_file(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Tripwire(marker)}))


@pytest.fixture
def pickle_adapter(tmp_path, tiny_adapter_dir):
    """An adapter directory whose weights exist only as a pickle that runs code when loaded."""
    adapter = tmp_path / "pickled_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        (tiny_adapter_dir / "adapter_config.json").read_text())
    marker = tmp_path / "code_ran"
    _pickle_file(adapter / "adapter_model.bin", marker)
    return adapter, marker


def test_merge_refuses_a_pickle_adapter(tmp_path, tiny_lm_dir, pickle_adapter, capsys):
    adapter, marker = pickle_adapter
    code = main(["merge", "--base", str(tiny_lm_dir), "--adapter", str(adapter),
                 "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "pickle" in err and "safetensors" in err and "what to do" in err
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_generate_and_load_refuse_a_pickle_adapter(tiny_lm_dir, pickle_adapter, capsys):
    from rrhf_lite.models.inference_loader import load_causal_lm

    adapter, marker = pickle_adapter
    code = main(["generate", "--model", str(tiny_lm_dir), "--adapter", str(adapter),
                 "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "safetensors" in err, err
    with pytest.raises(UserInputError, match="safetensors"):
        load_causal_lm(str(tiny_lm_dir), adapter_path=str(adapter), device="cpu")
    assert not marker.exists()


@pytest.fixture
def pickle_model(tmp_path, tiny_lm_dir):
    """A model directory (config + tokenizer) whose weights are only a code-running pickle."""
    model = tmp_path / "pickled_model"
    model.mkdir()
    for f in Path(tiny_lm_dir).iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code_ran"
    _pickle_file(model / "pytorch_model.bin", marker)
    return model, marker


def test_training_and_generation_refuse_a_pickle_model(tmp_path, pickle_model, capsys):
    model, marker = pickle_model
    data = _write_rows(tmp_path / "cands.jsonl")
    code = main(["train", str(_recipe(tmp_path, model, data, tmp_path / "run"))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "safetensors" in err, err
    code = main(["generate", "--model", str(model), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "safetensors" in err, err
    assert not marker.exists()
    assert not (tmp_path / "run" / "round-1" / "train" / "adapter").exists()


@pytest.mark.parametrize("trust", [False, True], ids=["default_off", "recipe_sets_it"])
def test_trust_remote_code_only_when_the_recipe_sets_it(tmp_path, tiny_lm_dir, monkeypatch,
                                                        capsys, trust):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []

    def recording(auto_class):
        real = auto_class.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            seen.append((auto_class.__name__, kwargs.get("trust_remote_code"),
                         kwargs.get("use_safetensors")))
            return real(cls, *args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", classmethod(from_pretrained))

    recording(AutoModelForCausalLM)
    recording(AutoTokenizer)
    data = _write_rows(tmp_path / "cands.jsonl")
    model = {"name_or_path": str(tiny_lm_dir)}
    if trust:
        model["trust_remote_code"] = True
    code = main(["run", str(_recipe(tmp_path, tiny_lm_dir, data, tmp_path / "run", model=model))])
    assert code == 0, capsys.readouterr().err
    assert {name for name, _, _ in seen} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(flag is trust for _, flag, _ in seen), seen
    assert all(safe for name, _, safe in seen if name == "AutoModelForCausalLM"), seen


def test_yaml_tags_never_construct_objects(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: !!python/object/apply:pathlib.Path.touch "
                      f"['{marker}']\nstages: [train]\n")
    code = main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(recipe) in err, err
    assert not marker.exists()


_REWARD_MODULE = textwrap.dedent("""
    from pathlib import Path
    Path({marker!r}).write_text("imported")

    def reward(prompts, responses):
        return [float(len(r)) for r in responses]
""")


def test_reward_function_is_imported_only_when_the_recipe_names_it(tmp_path, tiny_lm_dir,
                                                                   monkeypatch, capsys):
    marker = tmp_path / "imported"
    (tmp_path / "my_reward_xyz.py").write_text(_REWARD_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_reward_xyz", raising=False)
    data = _write_rows(tmp_path / "cands.jsonl")

    # a recipe with given scores never imports it
    named = _recipe(tmp_path, tiny_lm_dir, data, tmp_path / "run_fn", "named.yaml",
                    stages=["score"], scoring={"reward_function": "my_reward_xyz:reward"})
    given = _recipe(tmp_path, tiny_lm_dir, data, tmp_path / "run_given", "given.yaml",
                    stages=["score"], scoring={"given": True})
    assert main(["validate", str(given)]) == 0
    assert main(["run", str(given)]) == 0, capsys.readouterr().err
    assert not marker.exists() and "my_reward_xyz" not in sys.modules
    # validating the recipe that names it imports it and tries it once (before any model)
    assert main(["validate", str(named)]) == 0
    assert marker.read_text() == "imported"
    marker.unlink()
    monkeypatch.delitem(sys.modules, "my_reward_xyz", raising=False)

    # the score stage of the recipe that names it runs it
    assert main(["run", str(named)]) == 0, capsys.readouterr().err
    assert marker.read_text() == "imported"
    scored = [json.loads(x) for x in
              (tmp_path / "run_fn" / "round-1" / "scored.jsonl").read_text().splitlines()]
    assert [row["scores"] for row in scored] == [
        [float(len(r)) for r in row["responses"]] for row in ROWS]
