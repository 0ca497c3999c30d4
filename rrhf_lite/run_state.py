"""What the stages of one `rrhf-lite run` hand each other: the recipe, the run directory, the
models it loads, and the adapters trained so far (rounds and ablations kept apart); and the run
directory itself (created, or reused when it holds the same recipe)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rrhf_lite import distributed
from rrhf_lite.errors import UserInputError
from rrhf_lite.io import atomic_write_text
from rrhf_lite.recipe import Recipe, dump_recipe
from rrhf_lite.recipe_sections import GeneratorSection
from rrhf_lite.run_lock import LOCK_NAME

INITIAL = "initial"
# What a run writes in its directory (see pipeline.py's docstring); --force removes these only.
RUN_OUTPUTS = ("round-*", "ablations", "eval", "merged", "report.md", "metrics.json", "*.png")


def round_variant(round_index: int) -> str:
    """The report's name for round N's policy: "rrhf", then "rrhf_round2", ..."""
    return "rrhf" if round_index == 1 else f"rrhf_round{round_index}"


@dataclass
class RunState:
    recipe: Recipe
    run_dir: Path
    base_model: str  # loadable: a hub name or directory (a builtin is built by then)
    stages: list[str]  # the stages this command runs (a subset of recipe.stages)
    models: dict[str, str] = field(default_factory=dict)  # recipe model name -> loadable
    round_adapters: dict[int, Path] = field(default_factory=dict)  # round N -> its adapter
    ablation_adapters: dict[str, Path] = field(default_factory=dict)  # name -> its adapter

    def round_dir(self, round_index: int) -> Path:
        return self.run_dir / f"round-{round_index}"

    def ablation_dir(self, name: str) -> Path:
        return self.run_dir / "ablations" / name

    @property
    def final_adapter(self) -> Path | None:
        """The policy of the last trained round (what later rounds sample from and merge
        merges); ablations never are."""
        return self.round_adapters[max(self.round_adapters)] if self.round_adapters else None

    def variants(self) -> dict[str, Path | None]:
        """Every policy to evaluate, by report name: initial, each round, each ablation."""
        rounds = {round_variant(i): path for i, path in sorted(self.round_adapters.items())}
        return {INITIAL: None, **rounds, **self.ablation_adapters}

    def generator_spec(self, generator: GeneratorSection, policy_adapter: Path | None,
                       policy_name: str = "policy") -> GeneratorSection:
        """A sampling generator as sample_candidates takes it, with its model made loadable:
        `policy` = the base with `policy_adapter` (or the generator's own adapter), `initial` =
        the base alone, anything else = that model."""
        if generator.model == "policy":
            adapter = generator.adapter or (str(policy_adapter) if policy_adapter else None)
            update = dict(model=self.base_model, adapter=adapter, name=policy_name)
        elif generator.model == INITIAL:
            update = dict(model=self.base_model, adapter=None, name=INITIAL)
        else:
            update = dict(model=self.models.get(generator.model, generator.model),
                          name=generator.model)
        return generator.model_copy(update=update)


# ------------------------------------------------------------------------------ run directory


def say(message: str) -> None:
    """A progress line for people, from the main process only."""
    if distributed.is_main_process():
        print(f"[rrhf-lite] {message}", flush=True)


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
