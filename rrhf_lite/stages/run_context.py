"""What the stages of one `rrhf-lite run` hand each other: the recipe, the run directory, the
models it loads, and the adapters trained so far (rounds and ablations kept apart).

The run directory itself (created, reused, locked) is the pipeline's: rrhf_lite.pipeline.run_dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rrhf_lite.config.recipe import Recipe
from rrhf_lite.config.sections import GeneratorSection

INITIAL = "initial"


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
    # the recipe the run directory held before this command (None: new, or unreadable); outputs
    # an older rrhf-lite wrote without a record of their inputs are judged against it
    previous_recipe: Recipe | None = None

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
