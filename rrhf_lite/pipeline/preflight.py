"""Everything about a recipe that can be checked before any model loads.

The recipe's schema (recipe.py, recipe_sections.py) checks each value alone: types, ranges,
finite floats, choices. Here the checks that need the file system or transformers: the output
directory can be written, every local path named exists (models with their config.json,
tokenizer files and intact safetensors; data files), and the training arguments resolve
(train.lr_scheduler_type, train.extra, ...), built once as training will build them.
`rrhf-lite validate` and the start of every run call check_recipe; failures are
UserInputError (exit code 2) naming the recipe key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from rrhf_lite.config.recipe import Recipe
from rrhf_lite.config.sections import TrainSection, unknown_key_message
from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import looks_like_local_path
from rrhf_lite.utils.user_files import (
    check_adapter_config,
    check_model_dir,
    check_output_path,
    check_tokenizer_source,
)


def _builtin(name: str) -> bool:
    return name.startswith("builtin:")


def _check_data_path(value: str | None, key: str) -> None:
    if not value or _builtin(value):
        return
    path = Path(value)
    if looks_like_local_path(value) and not path.exists():
        raise UserInputError("file not found", where=f"recipe key {key} ({value})",
                             hint="check the path (relative paths start from the directory "
                             "you run rrhf-lite in)")


def _check_model(value: str | None, key: str, *, tokenizer: bool = True) -> None:
    if not value or _builtin(value) or value in ("policy", "initial"):
        return
    try:
        check_model_dir(value, "model", tokenizer=tokenizer)
    except UserInputError as err:
        err.where = f"recipe key {key}: {err.where}"
        raise


def _check_reward(recipe: Recipe) -> None:
    """A classifier directory; or a raw checkpoint (a local file or directory is found and
    named, nothing is read yet) and its base's config and tokenizer."""
    scoring = recipe.scoring
    if scoring.reward_format != "gptj_value_head":
        _check_model(scoring.reward_model, "scoring.reward_model")
        return
    if looks_like_local_path(scoring.reward_model) or Path(scoring.reward_model).exists():
        from rrhf_lite.models.reward_checkpoint import find_checkpoint

        find_checkpoint(scoring.reward_model)
    _check_model(scoring.reward_base, "scoring.reward_base")


def check_paths(recipe: Recipe, stages: set[str]) -> None:
    """The paths the stages in `stages` use (a merge-only run needs no data file)."""
    check_output_path(recipe.output_dir, f"recipe key output_dir ({recipe.output_dir})")
    model = recipe.model
    if model.tokenizer:
        try:
            check_tokenizer_source(model.tokenizer)
        except UserInputError as err:
            err.where = f"recipe key model.tokenizer: {err.where}"
            raise
    _check_model(model.name_or_path, "model.name_or_path", tokenizer=model.tokenizer is None)
    if stages & {"score", "evaluate"}:
        _check_reward(recipe)
    if "evaluate" in stages:
        _check_model(recipe.evaluate.perplexity_model, "evaluate.perplexity_model")
    generators = recipe.sampling.generators if stages & {"sample", "evaluate"} else []
    for i, generator in enumerate(generators):
        _check_model(generator.model, f"sampling.generators.{i}.model")
        if generator.adapter:
            path = Path(generator.adapter)
            if path.exists() or looks_like_local_path(generator.adapter):
                if not (path / "adapter_config.json").is_file():
                    raise UserInputError(
                        "not an adapter directory (no adapter_config.json)",
                        where=f"recipe key sampling.generators.{i}.adapter ({path})",
                        hint="give a directory the train stage wrote (.../train/adapter)")
                check_adapter_config(path)
    data = recipe.data
    used = {"prompts": stages & {"sample", "evaluate"},
            "candidates": stages & {"score", "train"} and "sample" not in recipe.stages,
            "eval_prompts": "evaluate" in stages}
    for key, needed in used.items():
        if needed:
            _check_data_path(getattr(data, key), f"data.{key}")
    if "evaluate" in stages:
        _check_data_path(recipe.evaluate.ranking_candidates, "evaluate.ranking_candidates")
        _check_data_path(recipe.evaluate.general_prompts, "evaluate.general_prompts")


# ------------------------------------------------------------------------- data and reward

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
DUMMY_PAIR = ("Write one short sentence.", "This is a short sentence.")


def _local_data_file(value: str | None) -> Path | None:
    if not value or _builtin(value):
        return None
    path = Path(value).expanduser()
    return path if path.is_file() and path.suffix.lower() in _DATA_SUFFIXES else None


def check_data_files(recipe: Recipe, stages: set[str]) -> tuple | None:
    """Read every local data file the stages use, as the stages will (a malformed line or a
    row without "prompt" fails here, naming the file and line); hub data sets are not
    downloaded. Returns the first (prompt, response) found, for the reward function's trial
    call, or None."""
    from rrhf_lite.data.listwise import load_listwise
    from rrhf_lite.data.prompts import load_prompts

    data, pair = recipe.data, None
    prompt_files = []
    if stages & {"sample", "evaluate"}:
        prompt_files.append(("data.prompts", data.prompts))
    if "evaluate" in stages:
        prompt_files += [("data.eval_prompts", data.eval_prompts),
                         ("evaluate.general_prompts", recipe.evaluate.general_prompts)]
    for key, value in prompt_files:
        path = _local_data_file(value)
        if path is not None:
            rows = _named(key, lambda path=path: load_prompts(str(path)))
            pair = pair or (rows[0]["prompt"], DUMMY_PAIR[1])
    given_scores = "score" not in stages or recipe.scoring.given
    candidates = [("data.candidates", data.candidates, given_scores)] if (
        stages & {"score", "train"} and "sample" not in recipe.stages) else []
    if "evaluate" in stages:
        candidates.append(("evaluate.ranking_candidates", recipe.evaluate.ranking_candidates,
                           True))
    for key, value, scores in candidates:
        path = _local_data_file(value)
        if path is not None:
            rows = _named(key, lambda path=path, scores=scores: load_listwise(
                str(path), require_scores=scores, warn=False))
            response = rows[0]["responses"][0]
            pair = pair or (rows[0]["prompt"], response if isinstance(response, str)
                            else response.get("content", DUMMY_PAIR[1]))
    if pair is None and _builtin(data.prompts or ""):
        from rrhf_lite.builtin.sources import builtin_prompt_rows

        rows = builtin_prompt_rows(data.prompts, limit=1, seed=recipe.seed, key="data.prompts")
        pair = (rows[0]["prompt"], DUMMY_PAIR[1])
    return pair


def _named(key: str, read):
    try:
        return read()
    except UserInputError as err:
        err.where = f"recipe key {key}: {err.where}" if err.where else f"recipe key {key}"
        raise


def check_reward_function(recipe: Recipe, pair: tuple | None = None) -> None:
    """Import scoring.reward_function as the score stage will and call it once on one pair
    (the data's first prompt when there is a local or built-in one, else a dummy pair): an
    unimportable name, an exception inside it or a wrong return fails here, not after sampling."""
    from rrhf_lite.stages.score import call_reward_function, import_reward_function

    name = recipe.scoring.reward_function
    fn = import_reward_function(name, recipe.scoring.reward_search_dirs())
    prompt, response = pair or DUMMY_PAIR
    call_reward_function(fn, name, [prompt], [response],
                         during="tried once on the data's first prompt, before any model loads")


# transformers' report_to name -> the package that provides it
REPORT_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet_ml", "mlflow": "mlflow",
                   "neptune": "neptune", "tensorboard": "tensorboard", "trackio": "trackio",
                   "wandb": "wandb", "codecarbon": "codecarbon", "clearml": "clearml",
                   "dagshub": "dagshub", "flyte": "flytekit", "dvclive": "dvclive",
                   "swanlab": "swanlab", "kubeflow": "kubeflow"}


def check_report_to(recipe: Recipe) -> None:
    """train.report_to names integrations transformers knows and this environment has."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    value = recipe.train.report_to
    names = [value] if isinstance(value, str) else list(value)
    known = sorted(INTEGRATION_TO_CALLBACK)
    installed = set(get_available_reporting_integrations())
    for name in names:
        if name in ("none", "all"):
            continue
        where = f"recipe key train.report_to ({name})"
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, known, n=1)
            raise UserInputError(
                "unknown logging integration" + (f"; did you mean {close[0]!r}?" if close else ""),
                where=where, hint=f"use none, all, or any of: {', '.join(known)}")
        if name not in installed:
            package = REPORT_PACKAGES.get(name, name)
            raise UserInputError(
                f"{name} is not installed", where=where,
                hint=f"pip install {package}, or set train.report_to: none")


# ------------------------------------------------------------------------- training arguments

# What rrhf-lite sets itself from other keys: train.extra may not set these.
_SET_BY_US = {"output_dir": "output_dir (or --output-dir)", "seed": "seed",
              "bf16": "train.mixed_precision", "fp16": "train.mixed_precision",
              "warmup_steps": "train.warmup_ratio"}


def _check_extra(extra: dict, key: str) -> None:
    from rrhf_lite.training.trainer import RRHFConfig

    fields = {f.name for f in dataclasses.fields(RRHFConfig) if f.init}
    for name in extra:
        where = f"recipe key {key}.{name}"
        if name in TrainSection.model_fields and name != "extra":
            raise UserInputError("this is a key of the train section itself", where=where,
                                 hint=f"set train.{name} instead of train.extra.{name}")
        if name in _SET_BY_US:
            raise UserInputError("rrhf-lite sets this training argument itself", where=where,
                                 hint=f"set {_SET_BY_US[name]} instead")
        if name not in fields:
            raise UserInputError(unknown_key_message(name, fields), where=where,
                                 hint="train.extra takes transformers.TrainingArguments fields")


def _check_scheduler(name: str, key: str) -> None:
    from transformers.trainer_utils import SchedulerType

    choices = [s.value for s in SchedulerType]
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=1)
        raise UserInputError(f"unknown learning-rate scheduler {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else ""),
                             where=f"recipe key {key}", hint=f"use one of: {', '.join(choices)}")


def check_training_arguments(recipe: Recipe) -> None:
    """Build the RRHFConfig that training will build (the run's and each ablation's)."""
    from rrhf_lite.stages.train import training_config

    variants = [("train", {})] + [(f"ablations ({a.name}).train", a.train)
                                  for a in recipe.ablations]
    for key, overrides in variants:
        section = {**recipe.train.model_dump(), **overrides}
        _check_extra(section.get("extra") or {}, "train.extra")
        _check_scheduler(section["lr_scheduler_type"], f"{key}.lr_scheduler_type")
        try:
            training_config(recipe, Path(recipe.output_dir), overrides)
        except UserInputError as err:
            err.where = f"recipe key {key}: {err.where}" if err.where else f"recipe key {key}"
            raise
        except (TypeError, ValueError, OverflowError) as err:
            raise UserInputError(
                f"transformers rejects the training arguments: {str(err).splitlines()[0][:300]}",
                where=f"recipe key {key}",
                hint="fix that key (train.lr_scheduler_type, train.report_to, train.extra.*: "
                "see transformers.TrainingArguments)") from None
    for ablation in recipe.ablations:
        if ablation.method == "dpo":
            _check_dpo_arguments(recipe, ablation)


def _check_dpo_arguments(recipe: Recipe, ablation) -> None:
    """Build the trl.DPOConfig a DPO ablation will build (its step count is known later)."""
    from rrhf_lite.stages.train_dpo import dpo_training_config

    try:
        dpo_training_config(recipe, Path(recipe.output_dir), ablation, max_steps=1)
    except (TypeError, ValueError, OverflowError) as err:
        raise UserInputError(
            f"trl rejects the DPO training arguments: {str(err).splitlines()[0][:300]}",
            where=f"recipe key ablations ({ablation.name})",
            hint="fix its train.* overrides, dpo.* or train.extra.* (see trl.DPOConfig)") from None


def check_recipe(recipe: Recipe, stages: list[str] | None = None) -> None:
    """Every check that needs no model, for `stages` (default: all the recipe's): paths, the
    local data files read through, the reward function imported and called once, then the
    resolved training arguments (report_to among them)."""
    run = set(recipe.stages if stages is None else stages)
    check_paths(recipe, run)
    pair = check_data_files(recipe, run)
    if recipe.scoring.reward_function and run & {"score", "evaluate"}:
        check_reward_function(recipe, pair)
    if "train" in run:
        check_report_to(recipe)
        check_training_arguments(recipe)
