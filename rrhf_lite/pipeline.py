"""`rrhf-lite run`: chain the stages a recipe names, round after round, in one run directory.

Layout of a run directory (every file written atomically, so a killed run resumes cleanly):

    recipe.yaml                      the resolved recipe (a rerun must match it, or use --force)
    round-1/candidates.jsonl         sample: k candidates per prompt
    round-1/scored.jsonl             score: the same rows with "scores"
    round-1/train/                   train: checkpoints, metrics.jsonl; train/adapter = result
    round-2/...                      iterated RRHF: sampled from the round-1 policy
    ablations/<name>/train/adapter   variants trained on round-1 data (e.g. no rank loss, DPO)
    eval/                            evaluate: generations, scored candidates, plots;
                                     <variant>.entry.json: one variant done (a rerun skips it)
    stage_times.json                 wall seconds of each stage (rrhf_lite.stage_times)
    merged/                          merge: the full-precision merged model
    report.md, metrics.json          the results, for people and for machines

A stage whose output already exists is skipped (a rerun resumes where the last one stopped);
training resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from rrhf_lite import distributed
from rrhf_lite.candidate_stats import describe, k_stats, planned_k
from rrhf_lite.data import load_listwise
from rrhf_lite.errors import UserInputError
from rrhf_lite.io import last_complete_checkpoint, looks_like_local_path, read_jsonl, write_jsonl
from rrhf_lite.preflight import check_recipe
from rrhf_lite.recipe import Recipe
from rrhf_lite.recipe_ablations import AblationSection
from rrhf_lite.run_lock import run_dir_lock
from rrhf_lite.run_state import RunState, prepare_run_dir, say
from rrhf_lite.sources import load_prompt_rows, resolve_model
from rrhf_lite.stage_times import timed_stage
from rrhf_lite.stages.eval_report import refresh_stage_times
from rrhf_lite.stages.evaluate import evaluate_run
from rrhf_lite.stages.merge import merge_adapter
from rrhf_lite.stages.sample import sample_candidates
from rrhf_lite.stages.score import score_candidates
from rrhf_lite.stages.train import model_arguments, run_train, training_config
from rrhf_lite.stages.train_dpo import train_dpo_ablation

log = logging.getLogger("rrhf_lite")

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
    run_dir = prepare_run_dir(recipe, force)
    main = distributed.is_main_process()
    # a built-in's first build is slow; written with the first stage's time (bad input found
    # later must leave the run directory as it was)
    with timed_stage(run_dir, "model", enabled=main, defer=True):
        base_model = resolve_model(
            recipe.model.name_or_path, seed=recipe.seed, options=recipe.model.builtin
        )
    state = RunState(recipe, run_dir, base_model, stages, models=_generator_models(recipe, stages))
    say(f"run directory: {run_dir}  stages: {', '.join(stages)}  rounds: {recipe.rounds}")

    for round_index in range(1, recipe.rounds + 1):
        if not _run_round(state, round_index):
            break
    if "train" in recipe.stages:
        for ablation in recipe.ablations:
            _train_ablation(state, ablation)

    metrics: dict = {}
    # Evaluation and merging are not sharded: the main process does them, the others wait.
    if main:
        if "evaluate" in stages:
            with timed_stage(run_dir, "evaluate"):
                metrics = evaluate_run(state, _evaluation_prompts(recipe))
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


def _skip(output: Path, what: str, redo: bool = False) -> bool:
    """The one resume rule: a stage whose output exists is done (unless told to redo it)."""
    if output.exists() and not redo:
        say(f"{what} skipped, found {output}")
        return True
    return False


# ------------------------------------------------------------------------------------ rounds


@dataclass(frozen=True)
class RoundStage:
    """One stage of a round: the file it writes in the round directory, the input it checks
    first (None: nothing to check), the stage that writes that input, and how it runs."""

    name: str
    output: str
    source: Callable[[RunState, int], Path | str] | None
    after: str
    run: Callable[[RunState, int, Path | str | None, Path], None]


def _run_round(state: RunState, round_index: int) -> bool:
    """Run one round's stages; False when it cannot start yet (the rounds after it neither)."""
    out = state.round_dir(round_index)
    if round_index > 1 and round_index - 1 not in state.round_adapters:
        # Round N samples from round N-1's policy. Sampling from the base instead would make
        # "IP-2" the same data as round 1 under another name, so stop and say what is missing.
        previous = state.round_dir(round_index - 1) / "train" / "adapter"
        say(f"round {round_index}: not started, it samples from round {round_index - 1}'s "
             f"adapter, which is not trained yet ({previous}); run the 'train' stage, then this "
             "command again")
        return False
    for stage in ROUND_STAGES:
        output = out / stage.output
        if stage.name not in state.stages or _skip(output, f"round {round_index}: {stage.name}"):
            continue
        source = stage.source(state, round_index) if stage.source else None
        if source is not None and not _round_input_ready(round_index, source, stage.after):
            return False
        with timed_stage(state.run_dir, f"round-{round_index}/{stage.name}",
                         enabled=distributed.is_main_process()):
            stage.run(state, round_index, source, output)
    adapter = out / "train" / "adapter"
    if "train" in state.recipe.stages and adapter.exists():
        state.round_adapters[round_index] = adapter
    return True


def _round_input_ready(round_index: int, needed: Path | str, earlier_stage: str) -> bool:
    """Whether a round's input is there. Stage by stage, a later round's input appears only once
    its earlier stages ran: say so and return False (the rounds stop). Round 1's missing input
    is the user's error, raised by _require."""
    if round_index > 1 and isinstance(needed, Path) and not needed.exists():
        say(f"round {round_index}: stopped, {needed.name} is not there yet; run the "
             f"'{earlier_stage}' stage for it, then this command again")
        return False
    _require(needed, earlier_stage)
    return True


def _require(path: Path | str, earlier_stage: str) -> None:
    if isinstance(path, Path) and not path.exists():
        raise UserInputError(
            "input file not found", where=str(path),
            hint=f"run the '{earlier_stage}' stage first (or the whole recipe with `rrhf-lite run`)",
        )


def _given_candidates(recipe: Recipe) -> Path | str:
    """The recipe's own listwise data: a file (checked here) or a `datasets` hub name."""
    source = recipe.data.candidates
    if not source:
        raise UserInputError(
            "no candidates to score or train on", where="recipe key data.candidates",
            hint="name a listwise file, or add 'sample' to stages",
        )
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_local_path(source):
        raise UserInputError(
            "file not found", where=f"recipe key data.candidates ({source})",
            hint="check the path (relative paths start from the directory you run rrhf-lite in)",
        )
    return source


def _score_source(state: RunState, round_index: int) -> Path | str:
    if "sample" in state.recipe.stages:
        return state.round_dir(round_index) / "candidates.jsonl"
    return _given_candidates(state.recipe)


def _training_data(state: RunState, round_index: int) -> Path | str:
    """What a round (or, on round 1's data, an ablation) trains on: the last data stage's file."""
    if "score" in state.recipe.stages:
        return state.round_dir(round_index) / "scored.jsonl"
    return _score_source(state, round_index)


# ------------------------------------------------------------------------------------ stages


def _sample(state: RunState, round_index: int, _source: None, out: Path) -> None:
    say(f"round {round_index}: sampling candidates")
    recipe = state.recipe
    prompts = load_prompt_rows(
        recipe.data.prompts, split=recipe.data.prompts_split, limit=recipe.data.max_prompts,
        seed=recipe.seed, key="data.prompts",
    )
    policy = state.round_adapters.get(round_index - 1)  # None in round 1: the initial model
    generators = [state.generator_spec(g, policy) for g in recipe.sampling.generators]
    load_kwargs = recipe.policy_load_kwargs()
    if distributed.is_distributed():
        load_kwargs["device"] = distributed.local_device()  # each rank samples on its own GPU

    def sample_shard(shard: list, offset: int) -> list:
        # Shards start on batch boundaries; seed + offset gives each batch the seed it would
        # have in a single process, so the candidates do not depend on the number of ranks.
        shifted = [g.model_copy(update={"seed": g.seed + offset}) if g.seed is not None else g
                   for g in generators]
        return sample_candidates(
            shard, generators=shifted,
            include_dataset_responses=recipe.sampling.include_dataset_responses,
            max_new_tokens=recipe.sampling.max_new_tokens,
            max_prompt_length=recipe.sampling_prompt_length,
            batch_size=recipe.sampling.batch_size, seed=recipe.seed + offset,
            load_kwargs=load_kwargs, progress=distributed.is_main_process(),
        )

    rows = distributed.distributed_map(
        sample_shard, prompts, block_size=recipe.sampling.batch_size, pass_offset=True
    )
    say(f"round {round_index}: candidates: {describe(k_stats(rows, planned_k(recipe.sampling)))}")
    _write_on_main(out, rows)


def _write_on_main(path: Path, rows: list[dict]) -> None:
    """Only the main process writes; every rank waits so the next stage can read the file."""
    if distributed.is_main_process():
        write_jsonl(path, rows)
    distributed.barrier()


def _candidate_rows(recipe: Recipe, source: Path | str) -> list[dict]:
    """Rows to score: JSON lines as they are (keeping "sources" and other keys), or the
    recipe's given candidates in any format `load_listwise` reads (.json, .parquet, a hub data
    set; chosen/rejected pairs become two responses)."""
    if isinstance(source, Path) and source.suffix == ".jsonl":
        return read_jsonl(source)
    return load_listwise(source, split=recipe.data.candidates_split, require_scores=False)


def _score(state: RunState, round_index: int, source: Path | str, out: Path) -> None:
    say(f"round {round_index}: scoring candidates")
    recipe = state.recipe
    rows = _candidate_rows(recipe, source)
    device = distributed.local_device() if distributed.is_distributed() else None
    spec = recipe.scoring.reward_spec(trust_remote_code=recipe.model.trust_remote_code,
                                      device=device)
    if spec.get("format") == "gptj_value_head":  # converted once, by one process, before any loads
        if distributed.is_main_process():
            from rrhf_lite.reward_checkpoint import converted_reward_dir

            converted_reward_dir(spec["model"], spec["base"])
        distributed.barrier()
    scored = distributed.distributed_map(
        lambda shard: score_candidates(
            shard, reward=spec, progress=distributed.is_main_process(), where=str(source)
        ),
        rows,
    )
    planned = planned_k(recipe.sampling) if "sample" in recipe.stages else None
    say(f"round {round_index}: scored: {describe(k_stats(scored, planned))}")
    _write_on_main(out, scored)


def _train_round(state: RunState, round_index: int, data: Path | str, adapter: Path) -> None:
    # round N continues from round N-1's adapter (iterated RRHF); round 1 starts a fresh one
    _train(state, data, adapter.parent, state.round_adapters.get(round_index - 1), {})


ROUND_STAGES = (
    RoundStage("sample", "candidates.jsonl", None, "", _sample),
    RoundStage("score", "scored.jsonl", _score_source, "sample", _score),
    RoundStage("train", "train/adapter", _training_data, "score", _train_round),
)


def _resume_point(recipe: Recipe, out: Path) -> Path | None:
    """The last complete checkpoint in `out` when the recipe resumes, else None."""
    if not (recipe.train.resume and out.exists()):
        return None
    # a checkpoint killed while being saved has no trainer_state.json: skip it
    resume = last_complete_checkpoint(out)
    if resume:
        say(f"resuming training from {resume}")
    return resume


def _train(state: RunState, data: Path | str, out: Path, init_adapter: Path | None,
           overrides: dict) -> None:
    recipe = state.recipe
    resume = _resume_point(recipe, out)
    say(f"training on {data} -> {out}")
    run_train(
        str(data), model_arguments(recipe, state.base_model, init_adapter),
        training_config(recipe, out, overrides),
        resume_from_checkpoint=str(resume) if resume else None,
    )


def _train_ablation(state: RunState, ablation: AblationSection) -> None:
    """A variant trained from the initial model on round 1's data: RRHF with train.*
    overrides, or DPO on the best-vs-worst pairs."""
    name = ablation.name
    out = state.ablation_dir(name) / "train"
    adapter = out / "adapter"
    if "train" in state.stages and not _skip(adapter, f"ablation '{name}': train"):
        data = _training_data(state, 1)
        _require(data, "score")
        with timed_stage(state.run_dir, f"ablation/{name}/train",
                         enabled=distributed.is_main_process()):
            if ablation.method == "dpo":
                train_dpo_ablation(state.recipe, ablation, state.base_model, data, out,
                                   round1_train=state.round_dir(1) / "train",
                                   resume=_resume_point(state.recipe, out))
            else:
                say(f"ablation '{name}': {ablation.train}")
                _train(state, data, out, init_adapter=None, overrides=ablation.train)
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


def _merge(state: RunState) -> None:
    adapter = state.final_adapter  # the last round's policy, never an ablation
    if adapter is None:
        raise UserInputError(
            "nothing to merge: no trained adapter in this run", where=str(state.run_dir),
            hint="run the 'train' stage first",
        )
    out = state.run_dir / "merged"
    recipe = state.recipe
    if _skip(out, "merge", redo=recipe.merge.force):
        return
    say(f"merging {adapter} into {state.base_model} -> {out}")
    quantization = recipe.quantization
    report = merge_adapter(
        state.base_model, adapter, out, torch_dtype=recipe.merge.torch_dtype,
        roundtrip_nf4=recipe.merge.roundtrip_nf4 and quantization.load_in_4bit,
        **quantization.roundtrip(), fused_cpu_4bit=quantization.fused_cpu_kernel,
        force=recipe.merge.force,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    say(f"merge verified: max |logit difference| = {report.get('max_abs_diff')}")
