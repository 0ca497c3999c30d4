"""`rrhf-lite run`: chain the stages a recipe names, round after round, in one run directory.

Layout of a run directory (every file written atomically, so a killed run resumes cleanly):

    recipe.yaml                      the resolved recipe (another experiment's needs --force)
    round-1/candidates.jsonl         sample: k candidates per prompt
    round-1/scored.jsonl             score: the same rows with "scores"
    round-1/train/                   train: checkpoints, metrics.jsonl; train/adapter = result
    *.inputs.json, eval/inputs.json  beside each output: what it was made from (pipeline.reruns)
    round-2/...                      iterated RRHF: sampled from the round-1 policy
    ablations/<name>/train/adapter   variants trained on round-1 data (e.g. no rank loss, DPO)
    eval/                            evaluate: generations, scored candidates, plots;
                                     <variant>.entry.json: one variant done (a rerun skips it)
    stage_times.json                 wall seconds of each stage (rrhf_lite.stages.stage_times)
    merged/                          merge: the full-precision merged model
    report.md, metrics.json          the results, for people and for machines

A stage whose output exists and whose inputs are unchanged is skipped (a rerun resumes where
the last one stopped; training from its last checkpoint); one whose inputs changed reruns, and
so does every later stage that reads what it rewrote (rrhf_lite.pipeline.reruns).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import set_seed

from rrhf_lite.builtin.sources import load_prompt_rows, resolve_model
from rrhf_lite.config.ablations import AblationSection
from rrhf_lite.config.recipe import Recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline.lock import run_dir_lock
from rrhf_lite.pipeline.preflight import check_recipe
from rrhf_lite.pipeline.reruns import StageOutput, stage_runs, write_record
from rrhf_lite.pipeline.rounds import (
    chat_prompts,
    require_input,
    resume_point,
    run_round,
    train_adapter,
    training_data,
)
from rrhf_lite.pipeline.run_dir import prepare_run_dir
from rrhf_lite.pipeline.stage_inputs import (
    StageInputs,
    evaluation_inputs,
    merge_inputs,
    train_inputs,
    variant_inputs,
)
from rrhf_lite.stages.eval_report import refresh_stage_times
from rrhf_lite.stages.evaluate import evaluate_run
from rrhf_lite.stages.merge import merge_adapter
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.stages.stage_times import timed_stage
from rrhf_lite.stages.train_dpo import train_dpo_ablation
from rrhf_lite.utils import distributed
from rrhf_lite.utils.console import say


def run_recipe(recipe: Recipe, only_stages: list[str] | None = None, force: bool = False) -> dict:
    """Run the recipe's stages (or just `only_stages`); return the evaluation metrics, if any.

    Everything checkable without a model is checked first (preflight), so bad input writes
    nothing; then the run directory is locked (one run at a time) for the whole run."""
    distributed.init_distributed()  # a no-op in one process; sampling runs before any Trainer
    stages = [s for s in recipe.stages if only_stages is None or s in only_stages]
    if only_stages and not stages:
        raise UserInputError(
            f"the recipe does not name stage {only_stages[0]!r}", where="recipe key stages"
        )
    check_recipe(recipe, stages)
    with run_dir_lock(Path(recipe.output_dir), enabled=distributed.is_main_process()):
        return _run_locked(recipe, stages, force)


def _run_locked(recipe: Recipe, stages: list[str], force: bool) -> dict:
    set_seed(recipe.seed)
    if recipe.cpu_threads:
        torch.set_num_threads(recipe.cpu_threads)
    run_dir, previous = prepare_run_dir(recipe, force)
    main = distributed.is_main_process()
    # a built-in's first build is slow; written with the first stage's time (bad input found
    # later must leave the run directory as it was)
    with timed_stage(run_dir, "model", enabled=main, defer=True):
        base_model = resolve_model(
            recipe.model.name_or_path, seed=recipe.seed, options=recipe.model.builtin
        )
    state = RunState(recipe, run_dir, base_model, stages, models=_generator_models(recipe, stages),
                     previous_recipe=previous)
    say(f"run directory: {run_dir}  stages: {', '.join(stages)}  rounds: {recipe.rounds}")

    for round_index in range(1, recipe.rounds + 1):
        if not run_round(state, round_index):
            break
    if "train" in recipe.stages:
        for ablation in recipe.ablations:
            _train_ablation(state, ablation)

    metrics: dict = {}
    # Evaluation and merging are not sharded: the main process does them, the others wait.
    if main:
        if "evaluate" in stages:
            with timed_stage(run_dir, "evaluate"):
                prompt_sets = {name: chat_prompts(state, rows)
                               for name, rows in _evaluation_prompts(recipe).items()}
                evaluated = _clear_stale_evaluations(state)
                metrics = evaluate_run(state, prompt_sets)
                for record, inputs in evaluated:
                    write_record(record, inputs)
        if "merge" in stages:
            with timed_stage(run_dir, "merge"):
                _merge(state)
        # evaluate wrote the report before its own (and merge's) time was known
        refresh_stage_times(run_dir)
    distributed.barrier()
    say(f"done: {run_dir}")
    return metrics


def _generator_models(recipe: Recipe, stages: list[str]) -> dict[str, str]:
    """Loadable paths of the generators' other models (a builtin is built here, once)."""
    if not {"sample", "evaluate"} & set(stages):
        return {}
    names = {g.model for g in recipe.sampling.generators} - {"policy", "initial"}
    return {name: resolve_model(name, seed=recipe.seed) for name in sorted(names)}


def _train_ablation(state: RunState, ablation: AblationSection) -> None:
    """A variant trained from the initial model on round 1's data: RRHF with train.*
    overrides, or DPO on the best-vs-worst pairs."""
    name = ablation.name
    out = state.ablation_dir(name) / "train"
    adapter = out / "adapter"
    record = StageOutput(f"ablation '{name}': train", adapter,
                         state.ablation_dir(name) / "train.inputs.json", (out,))
    runs = "train" in state.stages  # else: only checked, when there, to warn if stale
    if not (runs or adapter.exists()):
        return
    try:
        data = training_data(state, 1)
    except UserInputError:
        if runs:
            raise
        data = None  # only checking, and its input is gone: nothing to compare with
    inputs = train_inputs(state, data, None, ablation) if data is not None else None
    if inputs and stage_runs(record, inputs, runs=runs, earlier=state.previous_recipe):
        require_input(data, "score")
        with timed_stage(state.run_dir, f"ablation/{name}/train",
                         enabled=distributed.is_main_process()):
            if ablation.method == "dpo":
                train_dpo_ablation(state.recipe, ablation, state.base_model, data, out,
                                   round1_train=state.round_dir(1) / "train",
                                   resume=resume_point(state.recipe, out))
            else:
                say(f"ablation '{name}': {ablation.train}")
                train_adapter(state, data, out, init_adapter=None, overrides=ablation.train)
        write_record(record, inputs)
    if adapter.exists():
        state.ablation_adapters[name] = adapter


# ------------------------------------------------------------------------------ after rounds


def _evaluation_prompts(recipe: Recipe) -> dict[str, list[dict]]:
    """Prompt sets to evaluate on: "held_out" always, "train" when evaluate.train_prompts > 0."""
    data = recipe.data
    source, split = data.eval_prompts, data.eval_split
    if not source:
        source, split = data.prompts, data.prompts_split
        say("evaluate: no data.eval_prompts, so evaluating on training prompts")
    if not source:
        raise UserInputError("nothing to evaluate on", where="recipe key data.eval_prompts",
                             hint="name a held-out prompt file or data set")
    sets = {"held_out": load_prompt_rows(source, split=split, limit=data.max_eval_prompts,
                                         seed=recipe.seed, key="data.eval_prompts")}
    if recipe.evaluate.train_prompts and data.prompts:
        sets["train"] = load_prompt_rows(
            data.prompts, split=data.prompts_split, limit=recipe.evaluate.train_prompts,
            seed=recipe.seed, key="data.prompts",
        )
    return sets


def _clear_stale_evaluations(state: RunState) -> list[tuple[StageOutput, StageInputs]]:
    """Evaluation keeps each variant's answers (eval/<variant>.entry.json) for reruns: clear all
    of eval/ when what every variant is evaluated with changed (prompts, reward, settings), and
    a variant's files when its adapter changed; evaluate_run then evaluates what is missing.
    Returns the records to write once it has."""
    eval_dir, earlier = state.run_dir / "eval", state.previous_recipe
    shared = StageOutput("evaluate", eval_dir, eval_dir / "inputs.json")
    records = [(shared, evaluation_inputs(state))]
    stage_runs(shared, records[0][1], runs=True, earlier=earlier, say_skip=False)
    for variant, adapter in state.variants().items():
        files = tuple(eval_dir / f"{variant}.{name}.jsonl" for name in ("held_out", "train"))
        record = StageOutput(f"evaluate: {variant}", eval_dir / f"{variant}.entry.json",
                             eval_dir / f"{variant}.inputs.json", files)
        records.append((record, variant_inputs(state, adapter)))
        stage_runs(record, records[-1][1], runs=True, earlier=earlier, say_skip=False)
    return records


def _merge(state: RunState) -> None:
    adapter = state.final_adapter  # the last round's policy, never an ablation
    if adapter is None:
        raise UserInputError(
            "nothing to merge: no trained adapter in this run", where=str(state.run_dir),
            hint="run the 'train' stage first",
        )
    out = state.run_dir / "merged"
    recipe = state.recipe
    record = StageOutput("merge", out, state.run_dir / "merged.inputs.json")
    inputs = merge_inputs(state, adapter)
    if not stage_runs(record, inputs, runs=True, earlier=state.previous_recipe):
        if not recipe.merge.force:
            return
        say("merge: merge.force is set, so merging again")
    say(f"merging {adapter} into {state.base_model} -> {out}")
    quantization = recipe.quantization
    report = merge_adapter(
        state.base_model, adapter, out, torch_dtype=recipe.merge.torch_dtype,
        roundtrip_nf4=recipe.merge.roundtrip_nf4 and quantization.load_in_4bit,
        **quantization.roundtrip(), tolerance=recipe.merge.tolerance, force=recipe.merge.force,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    write_record(record, inputs)
    say(f"merge verified: max |logit difference| = {report.get('max_abs_diff')}")
