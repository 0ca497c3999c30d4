"""`rrhf-lite validate --plan`: the size of a recipe's job, from the recipe alone.

What the run will download (hub names only; local paths and builtins are not downloads), and
for every stage of every round how many prompts, candidates, optimiser steps and tokens it
handles. Nothing is downloaded and no model is loaded: prompt counts come from `max_prompts`,
a local file's rows, the tiny world's sizes, or the published sizes of the hub data sets the
shipped recipes use (KNOWN_DATA_SIZES); an unknown hub data set is said to be unknown.
Token counts are upper bounds (every prompt at its truncation length, every answer at
max_new_tokens); candidate counts use the planned k (de-duplication can only lower it).
One process is assumed (multiply the prompts per optimiser step by the GPUs under accelerate).
"""

from __future__ import annotations

import math
from pathlib import Path

from rrhf_lite.builtin.sources import DEFAULT_SIZES, is_builtin
from rrhf_lite.config.recipe import Recipe
from rrhf_lite.data.candidate_stats import generated_per_prompt, planned_k
from rrhf_lite.utils.io import looks_like_local_path

# Rows per split of the hub data sets the shipped recipes name (from the data set cards).
KNOWN_DATA_SIZES = {("Dahoas/rm-static", "train"): 76256, ("Dahoas/rm-static", "test"): 5103}


def _is_hub(name: str | None) -> bool:
    return bool(name) and not is_builtin(name) and name not in ("policy", "initial") \
        and not looks_like_local_path(name) and not Path(name).expanduser().exists()


def downloads(recipe: Recipe) -> list[dict]:
    """[{"name", "what", "key"}] of every hub model and data set the stages will fetch."""
    stages = set(recipe.stages)
    out: list[dict] = []

    def add(name, what, key):
        if _is_hub(name) and all(d["name"] != name or d["what"] != what for d in out):
            out.append({"name": name, "what": what, "key": key})

    add(recipe.model.name_or_path, "model: safetensors weights, config, tokenizer",
        "model.name_or_path")
    add(recipe.model.tokenizer, "tokenizer files", "model.tokenizer")
    if stages & {"sample", "evaluate"}:
        for i, g in enumerate(recipe.sampling.generators):
            add(g.model, "generator model: safetensors weights, tokenizer",
                f"sampling.generators.{i}.model")
            add(g.adapter, "LoRA adapter (safetensors)", f"sampling.generators.{i}.adapter")
    sc = recipe.scoring
    if stages & {"score", "evaluate"} and sc.reward_model:
        if sc.reward_format == "gptj_value_head":
            add(sc.reward_model, "raw reward checkpoint (*.pt only), converted once to "
                "safetensors", "scoring.reward_model")
            add(sc.reward_base, "config.json + tokenizer only (no weights)", "scoring.reward_base")
        else:
            add(sc.reward_model, "reward model: safetensors weights, tokenizer",
                "scoring.reward_model")
    data = recipe.data
    if stages & {"sample", "evaluate"}:
        add(data.prompts, f"data set, split {data.prompts_split}", "data.prompts")
    if "evaluate" in stages:
        add(data.eval_prompts, f"data set, split {data.eval_split}", "data.eval_prompts")
        add(recipe.evaluate.perplexity_model, "perplexity model", "evaluate.perplexity_model")
        add(recipe.evaluate.ranking_candidates, "data set", "evaluate.ranking_candidates")
    if stages & {"score", "train"} and "sample" not in stages:
        add(data.candidates, f"data set, split {data.candidates_split}", "data.candidates")
    return out


def count_rows(source: str | None, split: str, limit: int | None) -> int | None:
    """Rows a prompt source gives (at most `limit`), or None when the recipe cannot say."""
    if not source:
        return 0
    known: int | None = None
    if is_builtin(source):
        known = DEFAULT_SIZES.get(source.rsplit("/", 1)[-1])
    elif Path(source).expanduser().is_file():
        from rrhf_lite.data.listwise import read_rows

        known = len(read_rows(source, split)[0])
    else:
        known = KNOWN_DATA_SIZES.get((source, split))
    if limit is not None:
        return min(limit, known) if known is not None else limit
    return known


def _times(n: int | None, factor: float) -> int | None:
    return None if n is None else int(n * factor)


def optimiser_steps(recipe: Recipe, prompts: int | None, train: dict | None = None) -> int | None:
    """Optimiser steps of one training run on `prompts` prompts, as transformers counts them
    (ceil of micro-batches / accumulation per epoch; max_steps wins when set)."""
    t = recipe.train.model_copy(update=train or {})
    if t.max_steps > 0:
        return t.max_steps
    if prompts is None:
        return None
    per_epoch = math.ceil(math.ceil(prompts / t.per_device_train_batch_size)
                          / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.num_train_epochs)


def job_plan(recipe: Recipe) -> dict:
    """{"downloads": [...], "stages": [{"stage", "prompts", "candidates", "steps", "tokens",
    "note"}, ...], "prompts_per_step": int, "planned_k": int}."""
    data, s, t, sc = recipe.data, recipe.sampling, recipe.train, recipe.scoring
    stages = set(recipe.stages)
    prompts = count_rows(data.prompts, data.prompts_split, data.max_prompts) \
        if "sample" in stages else count_rows(data.candidates, data.candidates_split, None)
    k = planned_k(s) if "sample" in stages else None
    generated = sum(generated_per_prompt(g) for g in s.generators)
    rows: list[dict] = []
    for round_index in range(1, recipe.rounds + 1):
        tag = f"round {round_index}: " if recipe.rounds > 1 else ""
        if "sample" in stages:
            rows.append({
                "stage": f"{tag}sample", "prompts": prompts, "candidates": _times(prompts, k),
                "tokens": _times(prompts, s.max_new_tokens * generated),
                "note": f"{generated} generated"
                        + (" + the data set's 2 answers" if s.include_dataset_responses else "")
                        + f" = k {k} per prompt; prompts cut to {recipe.sampling_prompt_length} "
                        "tokens; tokens = new tokens"})
        if "score" in stages:
            pairs = _times(prompts, k)
            rows.append({
                "stage": f"{tag}score", "prompts": prompts, "candidates": pairs,
                "tokens": _times(pairs, sc.max_length),
                "note": f"batches of {sc.batch_size}, <= {sc.max_length} tokens each"
                        + (", read at the first EOS" if sc.reward_format == "gptj_value_head"
                           else "")})
        if "train" in stages:
            epochs = t.num_train_epochs
            rows.append({
                "stage": f"{tag}train", "prompts": prompts,
                "candidates": _times(prompts, (k or 0) * epochs) if k else None,
                "steps": optimiser_steps(recipe, prompts),
                "tokens": _times(prompts, (k or 0) * t.max_length * epochs) if k else None,
                "note": f"epochs {epochs:g}; {t.per_device_train_batch_size} x "
                        f"{t.gradient_accumulation_steps} = "
                        f"{t.per_device_train_batch_size * t.gradient_accumulation_steps} "
                        f"prompts per optimiser step; <= {t.max_length} tokens per candidate"})
    for ablation in recipe.ablations if "train" in stages else []:
        rows.append({"stage": f"ablation {ablation.name}: train", "prompts": prompts,
                     "steps": optimiser_steps(recipe, prompts, ablation.train),
                     "note": "round 1's candidates"})
    if "evaluate" in stages:
        source, split = (data.eval_prompts, data.eval_split) if data.eval_prompts else (
            data.prompts, data.prompts_split)
        held_out = count_rows(source, split, data.max_eval_prompts)
        variants = 1 + (recipe.rounds if "train" in stages else 0) + len(recipe.ablations)
        rows.append({
            "stage": "evaluate", "prompts": held_out,
            "candidates": _times(held_out, generated) if recipe.evaluate.best_of_n else None,
            "tokens": _times(held_out, variants * recipe.evaluate.max_new_tokens),
            "note": f"{variants} variants answer greedily, each scored; initial-model "
                    "candidates for best-of-k; tokens = new tokens"})
    if "merge" in stages:
        rows.append({"stage": "merge",
                     "note": f"the last round's adapter into the base ({recipe.merge.torch_dtype})"})
    return {"downloads": downloads(recipe), "stages": rows, "planned_k": k,
            "prompts_per_step": t.per_device_train_batch_size * t.gradient_accumulation_steps}


def format_job_plan(plan: dict) -> str:
    from rrhf_lite.utils.report_files import format_table

    fetched = plan["downloads"]
    lines = ["downloads (hub; cached after the first run):"]
    lines += [f"  {d['name']}: {d['what']}  [{d['key']}]" for d in fetched] or ["  nothing"]
    lines += ["", format_table(plan["stages"], ("stage", "prompts", "candidates", "steps",
                                                "tokens", "note"), plain=True,
                               title="the job, stage by stage (upper bounds; '-' = not known "
                               "from the recipe)", cell=_cell)]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)
