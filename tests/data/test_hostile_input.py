"""Issue 16's hostile inputs, through the real CLI: each ends in exit code 2 with a message that
names the place (file, line, recipe key) and says what to do, and nothing complete-looking is
written. Cases caught while validating (before any model loads) must write nothing at all.

One table, one row per mistake. A row builds its command from a small kit (a train-only recipe
on the tiny model, a copy of that model to break, an adapter) and says what the message names.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers.recipes import train_recipe

from rrhf_lite.cli import main

GOOD = {"prompt": "Q: hi", "responses": ["good answer", "bad"], "scores": [1.0, 0.0]}


@dataclass
class Kit:
    tmp: Path
    lm: Path
    adapter: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def data(self, *rows, name="data.jsonl") -> Path:
        path = self.tmp / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                for r in rows), encoding="utf-8")
        return path

    def recipe(self, candidates=None, name="recipe.yaml", **sections) -> Path:
        return train_recipe(self.tmp / name, sections.pop("model_dir", self.lm),
                            candidates or self.data(GOOD, GOOD), self.run, **sections)

    def model_copy(self, name="model") -> Path:
        out = self.tmp / name
        shutil.copytree(self.lm, out)
        return out

    def edit_config(self, directory: Path, **changes) -> Path:
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    def adapter_copy(self, **config_changes) -> Path:
        out = self.tmp / "adapter"
        shutil.copytree(self.adapter, out)
        if config_changes:
            path = out / "adapter_config.json"
            config = json.loads(path.read_text())
            config.update(config_changes)
            path.write_text(json.dumps(config))
        return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _run(kit: Kit, *sets: str, **sections):
    return ["run", kit.recipe(**sections), *[a for s in sets for a in ("--set", s)]]


# ---------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    argv: Callable[[Kit], list]
    names: tuple[str, ...]
    # "nothing": no run directory at all (caught before anything is written);
    # "no_results": at most recipe.yaml (caught once a model loads); None: not a run
    written: str | None = "nothing"
    outputs: Callable[[Kit], list[Path]] = field(default=lambda kit: [])


def _model_case(id, breaker, names, written="nothing", **sections):
    def argv(kit):
        broken = kit.model_copy()
        breaker(kit, broken)
        return ["run", kit.recipe(model_dir=broken, **sections)]
    return Case(id, argv, names, written)


def _write(path: Path, text: str) -> None:
    path.write_text(text)


CASES = [
    # recipe values that used to pass `validate` and fail (or NaN) later
    Case("lr_inf", lambda k: _run(k, "train.learning_rate=.inf"), ("train.learning_rate",)),
    Case("lr_nan", lambda k: _run(k, "train.learning_rate=.nan"), ("train.learning_rate",)),
    Case("epochs_inf", lambda k: _run(k, "train.num_train_epochs=.inf"),
         ("train.num_train_epochs",)),
    Case("epochs_huge", lambda k: _run(k, "train.num_train_epochs=1e300"),
         ("train.num_train_epochs",)),
    Case("seed_negative", lambda k: _run(k, "seed=-1"), ("recipe key seed",)),
    Case("seed_huge", lambda k: _run(k, "seed=99999999999999"), ("recipe key seed",)),
    Case("scheduler_bogus", lambda k: _run(k, "train.lr_scheduler_type=bogus"),
         ("train.lr_scheduler_type", "bogus")),
    Case("attention_bogus", lambda k: _run(k, "model.attn_implementation=bogus"),
         ("model.attn_implementation",)),
    Case("extra_unknown", lambda k: _run(k, "train.extra.not_a_field=1"),
         ("train.extra.not_a_field",)),
    Case("extra_output_dir", lambda k: _run(k, "train.extra.output_dir=x"),
         ("train.extra.output_dir",)),
    Case("extra_bad_value", lambda k: _run(k, "train.extra.optim=bogus"),
         ("recipe key train", "bogus")),
    Case("tokenizer_missing", lambda k: _run(k, f"model.tokenizer={k.tmp / 'no-tok'}"),
         ("model.tokenizer", "no-tok")),
    Case("builtin_on_a_model_dir", lambda k: _run(k, "model.builtin.steps=3"),
         ("model.builtin",)),
    Case("stage_twice", lambda k: _run(k, "stages=[train, train]"), ("'train' is listed twice",)),
    Case("data_missing", lambda k: ["run", k.recipe(candidates=k.tmp / "nope.jsonl")],
         ("data.candidates", "nope.jsonl")),
    # output paths
    Case("output_dir_is_a_file",
         lambda k: (_write(k.tmp / "f", "x"), _run(k, f"output_dir={k.tmp / 'f'}"))[1],
         ("output_dir", "is a file")),
    Case("output_dir_under_a_file",
         lambda k: (_write(k.tmp / "f", "x"), _run(k, f"output_dir={k.tmp / 'f' / 'run'}"))[1],
         ("output_dir", "under a file")),
    # recipe files
    Case("recipe_is_a_directory", lambda k: ["run", k.tmp], ("is a directory",)),
    Case("duplicate_key", lambda k: ["run", _dup_recipe(k)], ("'seed'", "lines 2 and 3")),
    Case("alias_bomb", lambda k: ["validate", _alias_bomb(k)], ("aliases",)),
    Case("set_bad_yaml", lambda k: _run(k, "train.report_to=[a, b"),
         ("--set train.report_to",)),
    # model directories (caught by the checks before loading)
    _model_case("safetensors_truncated", lambda k, d: _truncate(d / "model.safetensors"),
                ("model.safetensors", "truncated")),
    _model_case("safetensors_garbage", lambda k, d: _write(d / "model.safetensors", "garbage!!"),
                ("model.safetensors",)),
    _model_case("no_config_json", lambda k, d: (d / "config.json").unlink(), ("config.json",)),
    _model_case("unknown_model_type", lambda k, d: k.edit_config(d, model_type="wombat9"),
                ("config.json", "model_type")),
    _model_case("no_tokenizer_files",
                lambda k, d: [p.unlink() for p in d.glob("tokenizer*")] and None,
                ("no tokenizer files",)),
    # model directories (caught when the model loads: the run wrote recipe.yaml only)
    _model_case("more_layers_than_weights",
                lambda k, d: k.edit_config(d, num_hidden_layers=3), ("missing from the weights",),
                written="no_results"),
    _model_case("more_layers_than_weights_4bit",
                lambda k, d: k.edit_config(d, num_hidden_layers=3), ("model",),
                written="no_results", quantization={"load_in_4bit": True}),
    _model_case("inconsistent_heads", lambda k, d: k.edit_config(d, num_attention_heads=3),
                ("config.json", "attention heads")),
    Case("target_modules_unknown", lambda k: _run(k, "lora.target_modules=[nonexistent_proj]"),
         ("lora.target_modules",), written="no_results"),
    # data rows, before any model loads
    Case("lone_surrogate_prompt",
         lambda k: ["run", k.recipe(k.data(GOOD, '{"prompt": "a \\ud800 b", "responses": '
                                                  '["x", "y"], "scores": [1, 0]}'))],
         ("data.jsonl line 2", "surrogate"), written="no_results"),
    Case("lone_surrogate_response",
         lambda k: ["run", k.recipe(k.data('{"prompt": "a", "responses": ["\\udfff", "y"], '
                                           '"scores": [1, 0]}'))],
         ("data.jsonl line 1", "surrogate"), written="no_results"),
    Case("message_content_not_a_string",
         lambda k: ["run", k.recipe(k.data({**GOOD, "prompt": [{"role": "user",
                                                                 "content": ["a"]}]}))],
         ("data.jsonl line 1", "content must be a string"), written="no_results"),
    Case("response_content_a_list",
         lambda k: ["run", k.recipe(k.data({**GOOD, "responses": [
             {"role": "assistant", "content": [1]}, "y"]}))],
         ("data.jsonl line 1", "content must be a string"), written="no_results"),
    Case("parquet_not_parquet",
         lambda k: ["run", k.recipe((_write(k.tmp / "d.parquet", "not parquet"),
                                     k.tmp / "d.parquet")[1])],
         ("d.parquet", "parquet"), written="no_results"),
    # adapters (merge, generate) and CLI values
    Case("adapter_rank_mismatch",
         lambda k: ["merge", "--base", k.lm, "--adapter", k.adapter_copy(r=7), "--out",
                    k.tmp / "merged"], ("adapter",), written=None,
         outputs=lambda k: [k.tmp / "merged"]),
    Case("adapter_truncated",
         lambda k: ["merge", "--base", k.lm, "--adapter",
                    (lambda a: (_truncate(a / "adapter_model.safetensors"), a)[1])(
                        k.adapter_copy()), "--out", k.tmp / "merged"],
         ("adapter_model.safetensors",), written=None, outputs=lambda k: [k.tmp / "merged"]),
    Case("adapter_config_a_list",
         lambda k: ["merge", "--base", k.lm, "--adapter",
                    (lambda a: (_write(a / "adapter_config.json", "[]"), a)[1])(
                        k.adapter_copy()), "--out", k.tmp / "merged"],
         ("adapter_config.json", "JSON object"), written=None,
         outputs=lambda k: [k.tmp / "merged"]),
    Case("adapter_unknown_targets",
         lambda k: ["generate", "--model", k.lm, "--adapter",
                    k.adapter_copy(target_modules=["nonexistent_proj"]), "--prompt", "hi",
                    "--max-new-tokens", "2"], ("adapter",), written=None),
    Case("adapter_alpha_text",
         lambda k: ["generate", "--model", k.lm, "--adapter", k.adapter_copy(lora_alpha="abc"),
                    "--prompt", "hi"], ("adapter_config.json", "lora_alpha"), written=None),
    Case("merge_out_under_a_file",
         lambda k: (_write(k.tmp / "f", "x"), ["merge", "--base", k.lm, "--adapter", k.adapter,
                                               "--out", k.tmp / "f" / "merged"])[1],
         ("under a file",), written=None),
    Case("generate_prompt_bad_utf8",
         lambda k: ["generate", "--model", k.lm, "--prompt", "caf\udce9"],
         ("--prompt 1", "surrogate"), written=None),
]

# argparse rejects these itself (exit 2, "argument --x: ..."); no "what to do" line from us
ARGPARSE_CASES = [
    ("merge_device_banana", ["merge", "--base", "b", "--adapter", "a", "--out", "o",
                             "--device", "banana"], "--device"),
    ("merge_tolerance_negative", ["merge", "--base", "b", "--adapter", "a", "--out", "o",
                                  "--tolerance", "-1"], "--tolerance"),
    ("merge_tolerance_nan", ["merge", "--base", "b", "--adapter", "a", "--out", "o",
                             "--tolerance", "nan"], "--tolerance"),
    ("generate_max_new_tokens_0", ["generate", "--model", "m", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("generate_max_new_tokens_neg", ["generate", "--model", "m", "--max-new-tokens", "-5"],
     "--max-new-tokens"),
    ("generate_top_p_5", ["generate", "--model", "m", "--top-p", "5"], "--top-p"),
    ("generate_top_p_0", ["generate", "--model", "m", "--top-p", "0"], "--top-p"),
    ("generate_temperature_inf", ["generate", "--model", "m", "--temperature", "inf"],
     "--temperature"),
]


def _dup_recipe(kit: Kit) -> Path:
    path = kit.recipe()
    raw = yaml.safe_load(path.read_text())
    text = yaml.safe_dump({k: v for k, v in raw.items() if k != "seed"})
    path.write_text(f"name: dup\nseed: 1\nseed: 2\n{text}")
    return path


def _alias_bomb(kit: Kit) -> Path:
    path = kit.tmp / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]")
    path.write_text("\n".join(lines) + f"\nmodel:\n  name_or_path: {kit.lm}\n  builtin: *a7\n")
    return path


def _complete_looking(kit: Kit) -> list[str]:
    """What a finished stage would leave: adapters, summaries, merged models, reports."""
    names = ("adapter", "train_summary.json", "metrics.jsonl", "merged", "report.md",
             "metrics.json", "config.json")
    found = [str(p) for p in kit.run.rglob("*") if p.name in names] if kit.run.exists() else []
    return found


@pytest.fixture
def kit(tmp_path, tiny_lm_dir, tiny_adapter_dir) -> Kit:
    return Kit(tmp_path, Path(tiny_lm_dir), Path(tiny_adapter_dir))


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_exits_2_naming_the_place(kit, capsys, case):
    code, err = _cli(case.argv(kit), capsys)
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "rrhf-lite: error:" in err and "what to do:" in err, err
    for name in case.names:
        assert name in err, f"{name!r} not named in:\n{err}"
    assert not _complete_looking(kit), _complete_looking(kit)
    if case.written == "nothing":
        assert not kit.run.exists(), sorted(kit.run.rglob("*"))
    elif case.written == "no_results":
        left = {p.name for p in kit.run.iterdir()} if kit.run.exists() else set()
        assert left <= {"recipe.yaml"}, left
    for output in case.outputs(kit):
        assert not output.exists(), output


@pytest.mark.parametrize("argv, option", [c[1:] for c in ARGPARSE_CASES],
                         ids=[c[0] for c in ARGPARSE_CASES])
def test_cli_values_out_of_range(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in err and "Traceback" not in err, err


def test_output_dir_not_writable(kit, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere: the permission check cannot be exercised")
    locked = kit.tmp / "locked"
    locked.mkdir(mode=0o500)
    code, err = _cli(_run(kit, f"output_dir={locked / 'run'}"), capsys)
    assert code == 2 and "no permission" in err, err


def test_tilde_is_expanded_in_every_path(kit, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(kit.tmp))
    data = kit.data(GOOD, GOOD)
    recipe = kit.recipe(data)
    code, err = _cli(["validate", recipe, "--set", "output_dir=~/out", "--set",
                      f"data.candidates=~/{data.name}", "--set", "model.tokenizer=~/tok"], capsys)
    assert code == 2 and f"{kit.tmp}/tok" in err, err  # expanded, then checked
    code = main([str(a) for a in ["validate", recipe, "--set", "output_dir=~/out", "--set",
                                  f"data.candidates=~/{data.name}"]])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert resolved["output_dir"] == f"{kit.tmp}/out"
    assert resolved["data"]["candidates"] == str(data)
    assert not (Path.cwd() / "~").exists()


def test_empty_prompts_are_warned(kit, capsys, caplog):
    rows = [{**GOOD, "prompt": "   "}, GOOD]
    code, err = _cli(["run", kit.recipe(kit.data(*rows))], capsys)
    assert code == 0, err
    assert "1 of 2 rows have an empty or whitespace-only prompt" in caplog.text
