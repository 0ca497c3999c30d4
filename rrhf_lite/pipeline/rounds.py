"""A round of `rrhf-lite run`: its stages (sample, score, train) as a table driven by one loop,
and the files they hand each other in round-N/. Whether a stage reruns is
rrhf_lite.pipeline.reruns' to say (an output stands while what it was made from is unchanged).
pipeline.py runs the rounds, then the ablations, evaluation and merge."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rrhf_lite.builtin.sources import load_prompt_rows
from rrhf_lite.config.recipe import Recipe
from rrhf_lite.data.candidate_stats import describe, k_stats, planned_k
from rrhf_lite.data.listwise import load_listwise, summarize_listwise
from rrhf_lite.data.prompts import single_turn_chats
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline.reruns import StageOutput, stage_runs, write_record
from rrhf_lite.pipeline.stage_inputs import (
    StageInputs,
    sample_inputs,
    score_inputs,
    train_inputs,
)
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.stages.sample import sample_candidates
from rrhf_lite.stages.score import score_candidates
from rrhf_lite.stages.stage_times import timed_stage
from rrhf_lite.stages.train import (
    model_arguments,
    recipe_provenance,
    run_train,
    train_section,
    training_config,
)
from rrhf_lite.utils import distributed
from rrhf_lite.utils.console import say
from rrhf_lite.utils.io import (
    last_complete_checkpoint,
    looks_like_local_path,
    read_jsonl,
    write_jsonl,
)

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


def run_round(state: RunState, round_index: int) -> bool:
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
        runs = stage.name in state.stages  # else: only checked, when there, to warn if stale
        if stage.name not in state.recipe.stages or not (runs or output.exists()):
            continue
        try:
            source = stage.source(state, round_index) if stage.source else None
        except UserInputError:
            if runs:
                raise
            continue  # only checking, and its input is gone: nothing to compare with
        record = round_output(state, round_index, stage)
        inputs = _round_inputs(state, round_index, stage.name, source)
        rerun = stage_runs(record, inputs, runs=runs, earlier=state.previous_recipe)
        distributed.barrier()  # every rank decided before the main one removes or records
        if not rerun:
            continue
        if source is not None and not _round_input_ready(round_index, source, stage.after):
            return False
        with timed_stage(state.run_dir, f"round-{round_index}/{stage.name}",
                         enabled=distributed.is_main_process()):
            stage.run(state, round_index, source, output)
        write_record(record, inputs)
    adapter = out / "train" / "adapter"
    if "train" in state.recipe.stages and adapter.exists():
        state.round_adapters[round_index] = adapter
    return True


def round_output(state: RunState, round_index: int, stage: RoundStage) -> StageOutput:
    """A round stage's output and its record of inputs (training's: beside its directory, which
    a rerun clears with its checkpoints)."""
    out = state.round_dir(round_index)
    what = f"round {round_index}: {stage.name}"
    if stage.name == "train":
        return StageOutput(what, out / stage.output, out / "train.inputs.json", (out / "train",))
    return StageOutput(what, out / stage.output, out / f"{Path(stage.output).stem}.inputs.json")


def _round_inputs(state: RunState, round_index: int, name: str, source: Path | str | None
                  ) -> StageInputs:
    if name == "sample":
        return sample_inputs(state, round_index)
    if name == "score":
        return score_inputs(state, source)
    return train_inputs(state, source, state.round_adapters.get(round_index - 1))


def _round_input_ready(round_index: int, needed: Path | str, earlier_stage: str) -> bool:
    """Whether a round's input is there. Stage by stage, a later round's input appears only once
    its earlier stages ran: say so and return False (the rounds stop). Round 1's missing input
    is the user's error, raised by _require."""
    if round_index > 1 and isinstance(needed, Path) and not needed.exists():
        say(f"round {round_index}: stopped, {needed.name} is not there yet; run the "
             f"'{earlier_stage}' stage for it, then this command again")
        return False
    require_input(needed, earlier_stage)
    return True


def require_input(path: Path | str, earlier_stage: str) -> None:
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


def training_data(state: RunState, round_index: int) -> Path | str:
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
    prompts = chat_prompts(state, prompts)
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
    # prompts left with no non-empty candidate are not in rows: count them as k = 0
    stats = k_stats(rows, planned_k(recipe.sampling), dropped=len(prompts) - len(rows))
    say(f"round {round_index}: candidates: {describe(stats)}")
    _write_on_main(out, rows)


@functools.lru_cache(maxsize=8)
def _has_chat_template(source: str, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return bool(getattr(tokenizer, "chat_template", None))


_said_chat: set[str] = set()


def chat_prompts(state: RunState, rows: list[dict]) -> list[dict]:
    """Plain-text prompts as single-turn chats when the policy's tokenizer has a chat template
    (data.plain_prompts_as_chat), so sampling, training and evaluation all ask a chat model as
    it was trained to be asked; said once per run directory."""
    recipe = state.recipe
    if not recipe.data.plain_prompts_as_chat or not any(
            isinstance(r.get("prompt"), str) for r in rows):
        return rows
    source = recipe.model.tokenizer or state.base_model
    if not _has_chat_template(source, recipe.model.trust_remote_code):
        return rows
    rows, changed = single_turn_chats(rows)
    if str(state.run_dir) not in _said_chat:
        _said_chat.add(str(state.run_dir))
        say(f"plain-text prompts are sent as single-turn chats through the model's chat "
            f"template ({changed} of {len(rows)} here); data.plain_prompts_as_chat: false "
            "turns this off")
    return rows


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
            from rrhf_lite.models.reward_checkpoint import converted_reward_dir

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
    train_adapter(state, data, adapter.parent, state.round_adapters.get(round_index - 1), {})


ROUND_STAGES = (
    RoundStage("sample", "candidates.jsonl", None, "", _sample),
    RoundStage("score", "scored.jsonl", _score_source, "sample", _score),
    RoundStage("train", "train/adapter", training_data, "score", _train_round),
)


def resume_point(recipe: Recipe, out: Path) -> Path | None:
    """The last complete checkpoint in `out` when the recipe resumes, else None."""
    if not (recipe.train.resume and out.exists()):
        return None
    # a checkpoint killed while being saved has no trainer_state.json: skip it
    resume = last_complete_checkpoint(out)
    if resume:
        say(f"resuming training from {resume}")
    return resume


def train_adapter(state: RunState, data: Path | str, out: Path, init_adapter: Path | None,
                  overrides: dict) -> None:
    recipe = state.recipe
    check_rank_pairs(data, train_section(recipe, overrides).allow_sft_only)
    resume = resume_point(recipe, out)
    say(f"training on {data} -> {out}")
    run_train(
        str(data), model_arguments(recipe, state.base_model, init_adapter),
        training_config(recipe, out, overrides),
        resume_from_checkpoint=str(resume) if resume else None,
        provenance=recipe_provenance(recipe),
    )
    summary = out / "train_summary.json"
    if distributed.is_main_process() and summary.exists():
        forward = json.loads(summary.read_text(encoding="utf-8")).get("forward", {})
        say(f"trained: {describe_forward(forward)}")


def check_rank_pairs(data: Path | str, allow_sft_only: bool) -> None:
    """Stop (exit code 2) when most rows have one candidate: RRHF would train on the SFT loss
    alone. train.allow_sft_only: true trains anyway (logged)."""
    stats = summarize_listwise(load_listwise(str(data), require_scores=True, warn=False))
    single, rows = stats.get("single_response", 0), stats["rows"]
    if not rows or single * 2 <= rows:
        return
    if allow_sft_only:
        say(f"{single} of {rows} rows have one candidate (k = 1): training anyway "
            "(train.allow_sft_only), mostly on the SFT loss")
        return
    raise UserInputError(
        f"{single} of {rows} rows have one candidate (k = 1): RRHF would train on the SFT loss "
        "alone, with no rank pair to learn from", where=str(data),
        hint="get more distinct, non-empty candidates per prompt (more num_candidates or a "
        "second generator, a longer sampling.max_new_tokens; a chat model wants chat prompts), "
        "or set train.allow_sft_only: true to train on such rows on purpose")


def describe_forward(choices: dict) -> str:
    """The trainer's first-batch decisions (train_summary.json "forward") in one line."""
    if not choices:
        return "no batch ran (resumed at its end)"
    path = choices.get("logprob_path")
    text = ("log-probs from hidden states" if path == "hidden"
            else f"log-probs from logits ({choices.get('logprob_path_reason')})")
    if choices.get("share_prompt"):
        return text + "; each prompt ran once for its candidates (share_prompt)"
    return text + f"; prompts repeated per candidate ({choices.get('share_prompt_reason')})"


