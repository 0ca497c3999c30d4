"""`rrhf-lite run`: chain the stages a recipe names, round after round, in one run directory.

Layout of a run directory (every file written atomically, so a killed run resumes cleanly):

    recipe.yaml                      the resolved recipe (a rerun must match it, or use --force)
    round-1/candidates.jsonl         sample: k candidates per prompt
    round-1/scored.jsonl             score: the same rows with "scores"
    round-1/train/                   train: checkpoints, metrics.jsonl; train/adapter = result
    round-2/...                      iterated RRHF: sampled from the round-1 policy
    ablations/<name>/train/adapter   variants trained on round-1 data (e.g. no rank loss)
    eval/                            evaluate: generations, scored candidates, plots
    merged/                          merge: the full-precision merged model
    report.md, metrics.json          the results, for people and for machines

A stage whose output already exists is skipped (a rerun resumes where the last one stopped);
training resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rrhf_lite import distributed
from rrhf_lite.errors import UserInputError
from rrhf_lite.io import atomic_write_text, last_complete_checkpoint, read_jsonl, write_jsonl
from rrhf_lite.recipe import Recipe, TrainSection, dump_recipe
from rrhf_lite.sources import load_prompt_rows, resolve_model

log = logging.getLogger("rrhf_lite")


@dataclass
class RunState:
    """What the stages of one run hand each other."""

    recipe: Recipe
    run_dir: Path
    base_model: str
    stages: list[str]
    adapters: dict[str, Path] = field(default_factory=dict)  # variant name -> adapter dir

    def round_dir(self, round_index: int) -> Path:
        return self.run_dir / f"round-{round_index}"

    @property
    def final_adapter(self) -> Path | None:
        rounds = [n for n in self.adapters if n.startswith("rrhf")]
        return self.adapters[rounds[-1]] if rounds else None


def _say(message: str) -> None:
    if distributed.is_main_process():
        print(f"[rrhf-lite] {message}", flush=True)


def prepare_run_dir(recipe: Recipe, force: bool) -> Path:
    """Create the run directory, or reuse it when it holds the same recipe (resume)."""
    run_dir = Path(recipe.output_dir)
    text = dump_recipe(recipe)
    saved = run_dir / "recipe.yaml"
    # Only a run that got past its first stage is protected: a run that failed on bad input
    # left nothing but recipe.yaml, and the corrected recipe may take its place.
    has_results = run_dir.exists() and any(p.name != "recipe.yaml" for p in run_dir.iterdir())
    other_recipe = has_results and saved.exists() and saved.read_text(encoding="utf-8") != text
    if other_recipe and not force:
        raise UserInputError(
            "the run directory holds the results of a different recipe",
            where=str(run_dir),
            hint="use --output-dir for a new run, or --force to replace its results",
        )
    if run_dir.exists() and not saved.exists() and any(run_dir.iterdir()) and not force:
        raise UserInputError(
            "output directory exists and is not an rrhf-lite run directory", where=str(run_dir),
            hint="choose an empty or new directory with --output-dir, or pass --force",
        )
    distributed.barrier()  # every rank has checked before the main one writes
    if distributed.is_main_process():
        if other_recipe:  # --force: the old results must not be skipped into the new run
            _remove_run_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, text)
    distributed.barrier()
    return run_dir


RUN_OUTPUTS = ("round-*", "ablations", "eval", "merged", "report.md", "metrics.json", "*.png")


def _remove_run_outputs(run_dir: Path) -> None:
    """Delete what a run writes (see the module docstring), and nothing else."""
    import shutil

    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    _say(f"--force: removed the previous recipe's results from {run_dir}")


def run_recipe(recipe: Recipe, only_stages: list[str] | None = None, force: bool = False) -> dict:
    """Run the recipe's stages (or just `only_stages`); return the evaluation metrics, if any."""
    from transformers import set_seed

    distributed.init_distributed()  # a no-op in one process; sampling runs before any Trainer
    set_seed(recipe.seed)
    if recipe.cpu_threads:
        import torch

        torch.set_num_threads(recipe.cpu_threads)
    run_dir = prepare_run_dir(recipe, force)
    stages = [s for s in recipe.stages if only_stages is None or s in only_stages]
    if only_stages and not stages:
        raise UserInputError(
            f"the recipe does not name stage {only_stages[0]!r}", where="recipe key stages"
        )
    base_model = resolve_model(
        recipe.model.name_or_path, seed=recipe.seed, options=recipe.model.builtin
    )
    state = RunState(recipe, run_dir, base_model, stages)
    _say(f"run directory: {run_dir}  stages: {', '.join(stages)}  rounds: {recipe.rounds}")

    for round_index in range(1, recipe.rounds + 1):
        if not _run_round(state, round_index):
            break
    if recipe.ablations and "train" in recipe.stages:
        for ablation in recipe.ablations:
            _train_ablation(state, ablation.name, ablation.train)

    metrics: dict = {}
    # Evaluation and merging are not sharded: the main process does them, the others wait.
    if distributed.is_main_process():
        if "evaluate" in stages:
            from rrhf_lite.stages.evaluate import evaluate_run

            metrics = evaluate_run(state)
        if "merge" in stages:
            _merge(state)
    distributed.barrier()
    _say(f"done: {run_dir}")
    return metrics


# ------------------------------------------------------------------------------------ rounds


def _run_round(state: RunState, round_index: int) -> bool:
    """Run one round's stages; False when it cannot start yet (the rounds after it neither)."""
    recipe = state.recipe
    out = state.round_dir(round_index)
    candidates = out / "candidates.jsonl"
    scored = out / "scored.jsonl"
    previous = state.round_dir(round_index - 1) / "train" / "adapter"
    if round_index > 1 and not previous.exists():
        # Round N samples from round N-1's policy. Sampling from the base instead would make
        # "IP-2" the same data as round 1 under another name, so stop and say what is missing.
        _say(f"round {round_index}: not started, it samples from round {round_index - 1}'s "
             f"adapter, which is not trained yet ({previous}); run the 'train' stage, then this "
             "command again")
        return False
    policy = state.final_adapter  # None in round 1: the policy is the initial model

    if "sample" in state.stages:
        if candidates.exists():
            _say(f"round {round_index}: sample skipped, found {candidates}")
        else:
            _say(f"round {round_index}: sampling candidates")
            _sample(state, policy, candidates)
    if "score" in state.stages:
        source = candidates if "sample" in recipe.stages else _given_candidates(recipe)
        if scored.exists():
            _say(f"round {round_index}: score skipped, found {scored}")
        else:
            if not _round_input_ready(round_index, source, "sample"):
                return False
            _say(f"round {round_index}: scoring candidates")
            _score(state, source, scored)
    if "train" in recipe.stages:
        data = _training_data(state, scored, candidates)
        name = "rrhf" if round_index == 1 else f"rrhf_round{round_index}"
        adapter_dir = out / "train" / "adapter"
        if "train" in state.stages:
            if not adapter_dir.exists():
                if not _round_input_ready(round_index, data, "score"):
                    return False
            _train(state, data, out / "train", init_adapter=policy, overrides={})
        if adapter_dir.exists():
            state.adapters[name] = adapter_dir
    return True


def _round_input_ready(round_index: int, needed: Path | str, earlier_stage: str) -> bool:
    """Whether a round's input is there. Stage by stage, a later round's input appears only once
    its earlier stages ran: say so and return False (the rounds stop). Round 1's missing input
    is the user's error, raised by _require."""
    if round_index > 1 and isinstance(needed, Path) and not needed.exists():
        _say(f"round {round_index}: stopped, {needed.name} is not there yet; run the "
             f"'{earlier_stage}' stage for it, then this command again")
        return False
    _require(needed, earlier_stage)
    return True


def _given_candidates(recipe: Recipe) -> Path | str:
    """The recipe's own listwise data: a file (checked here) or a `datasets` hub name."""
    source = recipe.data.candidates
    if not source:
        raise UserInputError(
            "no candidates to score or train on", where="recipe key data.candidates",
            hint="name a listwise file, or add 'sample' to stages",
        )
    path = Path(source).expanduser()
    looks_like_file = path.suffix in (".jsonl", ".json", ".parquet") or source.startswith(
        (".", "/", "~")
    )
    if looks_like_file and not path.exists():
        raise UserInputError(
            "file not found", where=f"recipe key data.candidates ({source})",
            hint="check the path (relative paths start from the directory you run rrhf-lite in)",
        )
    return path if path.exists() else source


def _training_data(state: RunState, scored: Path, candidates: Path) -> Path:
    recipe = state.recipe
    if "score" in recipe.stages:
        return scored
    if "sample" in recipe.stages:
        return candidates
    return _given_candidates(recipe)


def _require(path: Path | str, earlier_stage: str) -> None:
    if isinstance(path, Path) and not path.exists():
        raise UserInputError(
            "input file not found", where=str(path),
            hint=f"run the '{earlier_stage}' stage first (or the whole recipe with `rrhf-lite run`)",
        )


# ------------------------------------------------------------------------------------ stages


def _sample(state: RunState, policy_adapter: Path | None, out: Path) -> None:
    from rrhf_lite.stages.sample import sample_candidates

    recipe = state.recipe
    prompts = load_prompt_rows(
        recipe.data.prompts, split=recipe.data.prompts_split, limit=recipe.data.max_prompts,
        seed=recipe.seed, key="data.prompts",
    )
    generators = [_generator_spec(state, g, policy_adapter) for g in recipe.sampling.generators]
    load_kwargs = policy_load_kwargs(recipe)
    if distributed.is_distributed():
        load_kwargs["device"] = distributed.local_device()  # each rank samples on its own GPU

    def sample_shard(shard: list, offset: int) -> list:
        # Shards start on batch boundaries; seed + offset gives each batch the seed it would
        # have in a single process, so the candidates do not depend on the number of ranks.
        shifted = [{**g, "seed": g["seed"] + offset} if g.get("seed") is not None else g
                   for g in generators]
        return sample_candidates(
            shard, generators=shifted,
            include_dataset_responses=recipe.sampling.include_dataset_responses,
            max_new_tokens=recipe.sampling.max_new_tokens,
            max_prompt_length=recipe.sampling.max_prompt_length,
            batch_size=recipe.sampling.batch_size, seed=recipe.seed + offset,
            load_kwargs=load_kwargs, progress=distributed.is_main_process(),
        )

    rows = distributed.distributed_map(
        sample_shard, prompts, block_size=recipe.sampling.batch_size, pass_offset=True
    )
    _write_on_main(out, rows)


def _write_on_main(path: Path, rows: list[dict]) -> None:
    """Only the main process writes; every rank waits so the next stage can read the file."""
    if distributed.is_main_process():
        write_jsonl(path, rows)
    distributed.barrier()


def _generator_spec(state: RunState, generator, policy_adapter: Path | None) -> dict:
    spec = generator.model_dump()
    if generator.model == "policy":
        spec["model"] = state.base_model
        spec["adapter"] = generator.adapter or (str(policy_adapter) if policy_adapter else None)
        spec["name"] = "policy"
    elif generator.model == "initial":
        spec["model"], spec["adapter"], spec["name"] = state.base_model, None, "initial"
    else:
        spec["model"] = resolve_model(generator.model, seed=state.recipe.seed)
        spec["name"] = generator.model
    return spec


def policy_load_kwargs(recipe: Recipe) -> dict:
    """How sampling and evaluation load the policy: as training saw it (4-bit when trained so)."""
    return {
        "torch_dtype": recipe.model.torch_dtype,
        "load_in_4bit": recipe.quantization.load_in_4bit,
        "trust_remote_code": recipe.model.trust_remote_code,
    }


def reward_spec(recipe: Recipe) -> dict:
    scoring = recipe.scoring
    if scoring.reward_model:
        return {
            "model": resolve_model(scoring.reward_model, seed=recipe.seed),
            "batch_size": scoring.batch_size, "max_length": scoring.max_length,
            "joiner": scoring.joiner, "trust_remote_code": recipe.model.trust_remote_code,
        }
    if scoring.reward_function:
        return {"function": scoring.reward_function, "batch_size": scoring.batch_size}
    return {"given": True}


def _candidate_rows(recipe: Recipe, source: Path | str) -> list[dict]:
    """Rows to score: JSON lines as they are (keeping "sources" and other keys), or the
    recipe's given candidates in any format `load_listwise` reads (.json, .parquet, a hub data
    set; chosen/rejected pairs become two responses)."""
    if isinstance(source, Path) and source.suffix == ".jsonl":
        return read_jsonl(source)
    from rrhf_lite.data import load_listwise

    return load_listwise(source, split=recipe.data.candidates_split, require_scores=False)


def _score(state: RunState, source: Path | str, out: Path) -> None:
    from rrhf_lite.stages.score import score_candidates

    rows = _candidate_rows(state.recipe, source)
    spec = reward_spec(state.recipe)
    if distributed.is_distributed() and "model" in spec:
        spec["device"] = distributed.local_device()
    scored = distributed.distributed_map(
        lambda shard: score_candidates(
            shard, reward=spec, progress=distributed.is_main_process(), where=str(source)
        ),
        rows,
    )
    _write_on_main(out, scored)


def training_config(recipe: Recipe, output_dir: Path, overrides: dict):
    """RRHFConfig from the recipe's train section (plus an ablation's overrides)."""
    from rrhf_lite.trainer import RRHFConfig

    section = TrainSection.model_validate({**recipe.train.model_dump(), **overrides})
    fields = section.model_dump(exclude={"extra", "resume", "mixed_precision"})
    fields.update(_mixed_precision(section.mixed_precision))
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    fields["warmup_steps"] = fields.pop("warmup_ratio")
    return RRHFConfig(
        output_dir=str(output_dir), seed=recipe.seed, **fields, **section.extra,
    )


def _mixed_precision(choice: str) -> dict:
    import torch

    if choice == "auto":
        if not torch.cuda.is_available():
            choice = "no"
        else:
            # including_emulation=False: a T4 "supports" bf16 only by slow emulation
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            choice = "bf16" if native_bf16 else "fp16"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def model_arguments(recipe: Recipe, base_model: str, init_adapter: Path | None = None):
    from rrhf_lite.modeling import ModelArguments

    q, lora = recipe.quantization, recipe.lora
    return ModelArguments(
        model_name_or_path=base_model,
        tokenizer_name_or_path=recipe.model.tokenizer,
        load_in_4bit=q.load_in_4bit,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=q.compute_dtype,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_quant_storage=q.quant_storage,
        torch_dtype=recipe.model.torch_dtype,
        use_lora=lora.enabled,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
        adapter_init_path=str(init_adapter) if init_adapter else None,
    )


def _train(state: RunState, data: Path, out: Path, init_adapter: Path | None, overrides: dict):
    from rrhf_lite.stages.train import run_train

    if (out / "adapter").exists():
        _say(f"train skipped, found {out / 'adapter'}")
        return out / "adapter"
    recipe = state.recipe
    config = training_config(recipe, out, overrides)
    resume = None
    if recipe.train.resume:
        # a checkpoint killed while being saved has no trainer_state.json: skip it
        resume = last_complete_checkpoint(out) if out.exists() else None
        if resume:
            _say(f"resuming training from {resume}")
    _say(f"training on {data} -> {out}")
    return run_train(
        str(data), model_arguments(recipe, state.base_model, init_adapter), config,
        resume_from_checkpoint=str(resume) if resume else None,
    )


def _train_ablation(state: RunState, name: str, overrides: dict) -> None:
    data = _training_data(state, state.round_dir(1) / "scored.jsonl",
                          state.round_dir(1) / "candidates.jsonl")
    out = state.run_dir / "ablations" / name / "train"
    if "train" in state.stages:
        _require(data, "score")
        _say(f"ablation '{name}': {overrides}")
        _train(state, data, out, init_adapter=None, overrides=overrides)
    if (out / "adapter").exists():
        state.adapters[name] = out / "adapter"


def _merge(state: RunState) -> None:
    from rrhf_lite.stages.merge import merge_adapter

    adapter = state.final_adapter
    if adapter is None:
        raise UserInputError(
            "nothing to merge: no trained adapter in this run", where=str(state.run_dir),
            hint="run the 'train' stage first",
        )
    out = state.run_dir / "merged"
    if out.exists() and not state.recipe.merge.force:
        _say(f"merge skipped, found {out}")
        return
    _say(f"merging {adapter} into {state.base_model} -> {out}")
    report = merge_adapter(
        state.base_model, adapter, out, torch_dtype=state.recipe.merge.torch_dtype,
        roundtrip_nf4=state.recipe.merge.roundtrip_nf4 and state.recipe.quantization.load_in_4bit,
        force=state.recipe.merge.force, trust_remote_code=state.recipe.model.trust_remote_code,
    )
    _say(f"merge verified: max |logit difference| = {report.get('max_abs_diff')}")
