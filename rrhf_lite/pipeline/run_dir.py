"""The run directory of `rrhf-lite run`: created, or reused by a rerun of its recipe, edited or
not (each stage then keeps or redoes its output: rrhf_lite.pipeline.reruns).

Refused without --force, and nothing written: a directory that is not a run directory, and one
whose recipe is another experiment's (another `name`) or that this version cannot read. With
--force the run goes ahead there, and still keeps every output whose inputs match (each one
removed is listed as the stage that rewrites it reruns)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from rrhf_lite.config.recipe import Recipe, dump_recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline.lock import LOCK_NAME
from rrhf_lite.pipeline.reruns import key_changes, summary
from rrhf_lite.pipeline.stage_inputs import NOT_RESULTS, recipe_values
from rrhf_lite.utils import distributed
from rrhf_lite.utils.console import say
from rrhf_lite.utils.io import atomic_write_text

CHANGES_SHOWN = 8  # keys named in the "different recipe" message; the rest are counted
FORCE_HINT = ("--force runs this recipe there: outputs whose inputs are unchanged are kept, the "
              "rest rerun and each removal is listed")


def prepare_run_dir(recipe: Recipe, force: bool) -> tuple[Path, Recipe | None]:
    """Create the run directory, or reuse it; return it and the recipe it held before (None:
    none, or one this version cannot read)."""
    run_dir = Path(recipe.output_dir)
    saved = run_dir / "recipe.yaml"
    # Only a run that got past its first stage is protected: a run that failed on bad input
    # left nothing but recipe.yaml, and the corrected recipe may take its place.
    ours = ("recipe.yaml", LOCK_NAME)  # the lock is this run's own (taken before this check)
    has_results = run_dir.exists() and any(p.name not in ours for p in run_dir.iterdir())
    previous, unreadable = _read_saved(saved) if saved.exists() else (None, None)
    if has_results and saved.exists():
        _check_same_experiment(recipe, previous, unreadable, run_dir, force)
    if (run_dir.exists() and not saved.exists() and not force
            and any(p.name != LOCK_NAME for p in run_dir.iterdir())):
        raise UserInputError(
            "output directory exists and is not an rrhf-lite run directory", where=str(run_dir),
            hint="choose an empty or new directory with --output-dir, or pass --force",
        )
    distributed.barrier()  # every rank has checked before the main one writes
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, dump_recipe(recipe))
    distributed.barrier()
    return run_dir, previous


def _read_saved(saved: Path) -> tuple[Recipe | None, str | None]:
    """(the saved recipe, read by this version, or None; why it could not be read).

    A run saved by an older rrhf-lite lacks the keys added since; their defaults fill in, so an
    upgrade alone changes no key."""
    try:
        return Recipe.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8"))), None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return None, f"{where}: {first['msg']}" if where else first["msg"]
    except (OSError, yaml.YAMLError, ValueError) as err:
        first = str(err).strip().splitlines()
        return None, (first[0] if first else type(err).__name__)[:200]


def recipe_changes(previous: Recipe, recipe: Recipe) -> list[str]:
    """'key: old -> new' for every recipe key that differs (where the run lives aside)."""
    old, new = (recipe_values(r) for r in (previous, recipe))
    return key_changes({k: v for k, v in old.items() if k not in NOT_RESULTS},
                       {k: v for k, v in new.items() if k not in NOT_RESULTS})


def _check_same_experiment(recipe: Recipe, previous: Recipe | None, unreadable: str | None,
                           run_dir: Path, force: bool) -> None:
    """An edited recipe reruns what its edits touch (said here, key by key, and stage by stage
    later); another experiment's results (another name), or a recipe.yaml this version cannot
    read, are not run over without --force."""
    if previous is None:
        if not force:
            raise UserInputError(
                "the run directory holds the results of a different recipe: its recipe.yaml "
                f"cannot be read by this rrhf-lite ({unreadable})", where=str(run_dir / "recipe.yaml"),
                hint=f"use --output-dir for a new run; {FORCE_HINT} (outputs without a record of "
                "their inputs rerun)")
        say(f"--force: {run_dir / 'recipe.yaml'} could not be read ({unreadable}); outputs "
            "without a record of their inputs rerun")
        return
    changes = recipe_changes(previous, recipe)
    if not changes:
        return
    if previous.name != recipe.name and not force:
        raise UserInputError(
            "the run directory holds the results of a different recipe "
            f"({summary(changes, CHANGES_SHOWN)})", where=str(run_dir),
            hint=f"use --output-dir for a new run; to edit the recipe of this run keep its name "
            f"{previous.name!r}; {FORCE_HINT}")
    say(f"the recipe changed since the last run in {run_dir}: {summary(changes, CHANGES_SHOWN)}; "
        "the stages that read these keys rerun")
