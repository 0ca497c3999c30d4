"""The run directory of `rrhf-lite run`: created, or reused when it holds the same recipe (a
resume), and with --force cleared of another recipe's results, and only of those."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from rrhf_lite.config.recipe import Recipe, dump_recipe
from rrhf_lite.errors import UserInputError
from rrhf_lite.pipeline.lock import LOCK_NAME
from rrhf_lite.utils import distributed
from rrhf_lite.utils.console import say
from rrhf_lite.utils.io import atomic_write_text

# What a run writes in its directory (see rrhf_lite.pipeline.run's docstring); --force removes these only.
RUN_OUTPUTS = ("round-*", "ablations", "eval", "merged", "report.md", "metrics.json", "*.png")


def prepare_run_dir(recipe: Recipe, force: bool) -> Path:
    """Create the run directory, or reuse it when it holds the same recipe (resume)."""
    run_dir = Path(recipe.output_dir)
    text = dump_recipe(recipe)
    saved = run_dir / "recipe.yaml"
    # Only a run that got past its first stage is protected: a run that failed on bad input
    # left nothing but recipe.yaml, and the corrected recipe may take its place.
    ours = ("recipe.yaml", LOCK_NAME)  # the lock is this run's own (taken before this check)
    has_results = run_dir.exists() and any(p.name not in ours for p in run_dir.iterdir())
    other_recipe = (has_results and saved.exists()
                    and not _same_recipe(saved.read_text(encoding="utf-8"), text))
    if other_recipe and not force:
        raise UserInputError(
            "the run directory holds the results of a different recipe",
            where=str(run_dir),
            hint="use --output-dir for a new run, or --force to replace its results",
        )
    if (run_dir.exists() and not saved.exists() and not force
            and any(p.name != LOCK_NAME for p in run_dir.iterdir())):
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


def _same_recipe(saved_text: str, text: str) -> bool:
    """The saved recipe, read by this version, is the one given now.

    A run saved by an older rrhf-lite lacks the keys added since; their defaults fill in when
    the saved file is read again, so an upgrade alone does not make a run "a different recipe"
    (which only --force, deleting its results, would get past). A saved file this version
    cannot read is a different recipe.
    """
    if saved_text == text:
        return True
    try:
        saved = Recipe.model_validate(yaml.safe_load(saved_text))
    except (yaml.YAMLError, ValueError):  # pydantic's ValidationError is a ValueError
        return False
    return dump_recipe(saved) == text


def _remove_run_outputs(run_dir: Path) -> None:
    """Delete what a run writes (the layout in pipeline.py's docstring), and nothing else."""
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    say(f"--force: removed the previous recipe's results from {run_dir}")
