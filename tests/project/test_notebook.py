"""The Colab notebook (notebooks/rrhf_colab.ipynb): stored clean, and it runs end to end on a CPU.

The CPU run executes every cell in a real Jupyter kernel (nbclient) with
RRHF_NOTEBOOK_FORCE_CPU=1 (the real SmolLM2-135M-Instruct on the constraints task, whatever the
machine has) and RRHF_NOTEBOOK_TINY=1 (smoke-test sizes), then reads the executed notebook's outputs: the plots must be there as PNG
images and the before/after table must show the run's own held-out answers. The GPU branch cannot
run here (no GPU, no network), so its data preparation and recipe are executed in-process with a
stand-in for the streamed data set: the recipe a T4 would get must validate and say fp16.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from unittest import mock

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "rrhf_colab.ipynb"


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _run_cells(nb, namespace: dict, tags=("settings", "data", "recipe")) -> dict:
    """Execute the cells with these tags in `namespace`, in order, as the kernel would."""
    for tag in tags:
        exec(compile(_cell(nb, tag).source, f"notebook cell {tag}", "exec"), namespace)
    return namespace


def _branch(gpu: bool, **settings) -> dict:
    """The first cells' variables for one branch (the hardware check's outputs)."""
    return {"GPU_MODE": gpu, "TINY": False, "Path": Path, "json": json, **settings}


# ----------------------------------------------------------------------------- stored form


def test_notebook_is_stored_without_outputs():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8
    for cell in code:
        assert cell.outputs == [], f"cell {cell.metadata.get('tags')} has stored outputs"
        assert cell.execution_count is None, f"cell {cell.metadata.get('tags')} has a count"
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_install_cell_never_pins_torch():
    source = _cell(_read(), "install").source
    assert "git+" in source and "-e" in source  # from the repository, or the checkout
    assert "find_spec(\"rrhf_lite\")" in source  # skipped when already installed
    assert not re.search(r"\btorch\s*[=<>~!]=", source)
    assert not re.search(r"pip install[^\n]*\btorch\b", source)


# ----------------------------------------------------------------------------- GPU branch


def _fake_preference_split(split: str) -> list[dict]:
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized: chat transcripts as answers."""
    rows = [{"prompt": "x" * 5000, "chosen": [], "rejected": []}]  # too long: must be skipped
    for i in range(300):
        prompt = f"{split} question {i}?"
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": f"good answer {i}"}],
            "rejected": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": f"bad answer {i}"}],
            "score_chosen": 8.0, "score_rejected": 3.0,
        })
    return rows


def test_gpu_branch_builds_data_and_a_valid_t4_recipe(tmp_path, monkeypatch):
    """Settings, data and recipe cells as a T4 runs them (fp16, 4-bit, LoRA), data set faked."""
    import datasets

    from rrhf_lite.builtin.sources import load_prompt_rows
    from rrhf_lite.stages.sample import dataset_answers

    requested = []

    def fake_load_dataset(name, split, streaming=False):
        requested.append((name, split, streaming))
        return iter(_fake_preference_split(split))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    nb = _read()
    namespace = _run_cells(nb, _branch(True, DTYPE="float16", MIXED_PRECISION="fp16"))

    recipe = namespace["recipe"]
    model, dataset = namespace["MODEL"], namespace["DATASET"]
    assert requested == [(dataset, "train_prefs", True), (dataset, "test_prefs", True)]
    assert recipe.model.name_or_path == model and recipe.model.torch_dtype == "float16"
    assert "SmolLM2" in model  # a LLaMA-architecture model, as the paper's
    assert recipe.train.mixed_precision == "fp16"
    assert recipe.quantization.load_in_4bit and recipe.quantization.compute_dtype == "float16"
    assert recipe.lora.enabled and recipe.train.gradient_checkpointing
    assert recipe.scoring.reward_model == namespace["REWARD_MODEL"]
    assert recipe.sampling.include_dataset_responses
    assert recipe.output_dir.startswith("runs/colab-")

    train = load_prompt_rows(recipe.data.prompts, split="train", limit=None, seed=0, key="x")
    held_out = load_prompt_rows(recipe.data.eval_prompts, split="test", limit=None, seed=0,
                                key="x")
    assert len(train) == namespace["NUM_TRAIN_PROMPTS"] == recipe.data.max_prompts
    assert len(held_out) == namespace["NUM_EVAL_PROMPTS"]
    first = train[0]
    assert first["prompt"] == [{"role": "user", "content": "train_prefs question 0?"}]
    assert [text for text, _ in dataset_answers(first)] == ["good answer 0", "bad answer 0"]
    assert held_out[0]["chosen"] == "good answer 0" and "rejected" not in held_out[0]

    def run_dir_after(**settings):
        namespace.update(settings)
        return _run_cells(nb, namespace, ("data", "recipe"))["recipe"].output_dir

    # Same settings and data resume the same run; other data (same file names) gets a new one.
    assert run_dir_after() == recipe.output_dir
    assert run_dir_after(MAX_PROMPT_CHARS=23) != recipe.output_dir


# ----------------------------------------------------------------------------- CPU run


def _execute(work: Path, env: dict[str, str], timeout: int):
    from nbclient import NotebookClient

    nb = _read()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    with mock.patch.dict(os.environ, env):  # the kernel inherits this environment
        for name in ("RRHF_NOTEBOOK_FORCE_CPU", "RRHF_NOTEBOOK_TINY"):
            if name not in env:
                os.environ.pop(name, None)
        client.execute()
    nbformat.write(nb, work / "executed.ipynb")  # for a look after a failure
    return nb


def _texts(cell, mime: str) -> list[str]:
    return [o["data"][mime] for o in cell.outputs
            if o.output_type in ("display_data", "execute_result") and mime in o.get("data", {})]


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _check_executed(nb, work: Path) -> None:
    assert "CPU mode" in _stdout(_cell(nb, "hardware"))
    runs = list((work / "runs").glob("colab-cpu-*"))
    assert len(runs) == 1
    run = runs[0]
    recipe = (run / "recipe.yaml").read_text()
    assert "builtin:smollm2-135m-instruct" in recipe and "builtin:constraints/train" in recipe

    # Candidates with their rewards, as a table.
    scored = [json.loads(line) for line in (run / "round-1" / "scored.jsonl").open()]
    tables = _texts(_cell(nb, "sample"), "text/html")
    assert any("candidate" in t and "reward" in t and "<table" in t for t in tables)
    assert any(scored[0]["sources"][0] in t for t in tables)

    # The trainer's progress bar (transformers' notebook callback draws an HTML <progress>).
    assert any("<progress" in t for t in _texts(_cell(nb, "train"), "text/html"))

    # Plots: loss curves and the reward histogram, as real PNG images.
    for tag in ("curves", "evaluate"):
        images = _texts(_cell(nb, tag), "image/png")
        assert images, f"no plot in cell {tag}"
        assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"

    # The same held-out prompts before and after, from the run's own evaluation files.
    before = [json.loads(line) for line in (run / "eval" / "initial.held_out.jsonl").open()]
    after = [json.loads(line) for line in (run / "eval" / "rrhf.held_out.jsonl").open()]
    assert len(before) == len(after) > 0
    side = [t for t in _texts(_cell(nb, "evaluate"), "text/html") if "before (initial)" in t]
    assert len(side) == 1 and "after (rrhf)" in side[0]
    for row in before[:3]:  # the table shows the first rows (a chat prompt as its text)
        prompt = row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
        shown = " ".join(prompt.split())[:60]
        assert shown in side[0] or html.escape(shown) in side[0], shown

    # The results table, and the merged model answering a prompt.
    results = "".join(_texts(_cell(nb, "results"), "text/html"))
    assert "<table" in results and "initial" in results and "rrhf" in results
    assert json.loads((run / "metrics.json").read_text())["metrics"]["variants"].keys() >= {
        "initial", "rrhf"}
    assert (run / "merged" / "model.safetensors").is_file()
    merge_out = _stdout(_cell(nb, "merge"))
    assert "model.safetensors" in merge_out and "merged model's answer:" in merge_out


def test_notebook_runs_on_cpu_tiny(tmp_path, smollm2_dir):
    """Every cell, in a real kernel, at smoke-test sizes, on the real model (its conversion is
    the session's, shared through RRHF_LITE_CACHE)."""
    env = {"RRHF_NOTEBOOK_FORCE_CPU": "1", "RRHF_NOTEBOOK_TINY": "1",
           "RRHF_LITE_CACHE": os.environ["RRHF_LITE_CACHE"]}
    nb = _execute(tmp_path, env, timeout=600)
    _check_executed(nb, tmp_path)


@pytest.mark.slow
def test_notebook_runs_on_cpu_default_sizes(tmp_path, smollm2_dir):
    """CPU mode as a user without a GPU gets it (many minutes on 2 cores)."""
    env = {"RRHF_NOTEBOOK_FORCE_CPU": "1", "RRHF_LITE_CACHE": os.environ["RRHF_LITE_CACHE"]}
    nb = _execute(tmp_path, env, timeout=1800)
    _check_executed(nb, tmp_path)


def test_cpu_branch_is_the_main_recipe(tmp_path, monkeypatch):
    """The CPU mode says it runs recipes/quickstart.yaml (the README's main command): its sizes,
    sampling, learning rate and batch sizes must not drift from the recipe's."""
    from rrhf_lite.config.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    cpu = _run_cells(_read(), _branch(False, DTYPE="float32", MIXED_PRECISION="no"))["recipe"]
    shipped = load_recipe(NOTEBOOK.parents[1] / "recipes" / "quickstart.yaml")

    assert cpu.rounds == shipped.rounds == 1 and not cpu.ablations and not shipped.ablations
    assert cpu.stages == shipped.stages
    assert cpu.model.name_or_path == shipped.model.name_or_path
    for section in ("data", "sampling", "scoring", "lora", "quantization", "evaluate"):
        ours, theirs = getattr(cpu, section).model_dump(), getattr(shipped, section).model_dump()
        if section == "evaluate":  # the notebook shows its own before/after table instead
            for key in ("train_prompts", "general_prompts", "max_general_prompts", "examples"):
                ours.pop(key), theirs.pop(key)
        assert ours == theirs, section
    for key in ("learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
                "gradient_accumulation_steps", "num_train_epochs", "max_length",
                "candidate_micro_batch_size", "skip_tied"):
        assert getattr(cpu.train, key) == getattr(shipped.train, key), key
