"""What each stage of `rrhf-lite run` reads, written down so that a rerun can tell what changed:
the recipe keys the stage reads (dotted, with their values), and fingerprints of the files and
models behind them. rrhf_lite.pipeline.reruns compares them with a stage's record.

- data files (prompts, eval prompts, given candidates, ranking candidates, general prompts):
  their bytes. A hub data set or a `builtin:` set is its name, split, size and the seed, which
  are recipe keys already;
- the stages' own outputs a later stage reads (candidates, scored rows, adapters): their bytes,
  so a stage reruns when what it reads was rewritten, and only then;
- the reward function: the bytes of its module's file; a reward model: as a model;
- a model in a local directory: its files' names, sizes and modification times (hashing a
  14 GB checkpoint on every rerun would cost minutes); a hub or `builtin:` model is its name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_lite.builtin.sources import is_builtin
from rrhf_lite.config.ablations import AblationSection
from rrhf_lite.config.recipe import Recipe
from rrhf_lite.stages.run_context import RunState
from rrhf_lite.stages.score import reward_module
from rrhf_lite.utils.digest import content_digest, stat_digest
from rrhf_lite.utils.io import looks_like_local_path

# Keys that change no stage's output: how training logs and checkpoints (not what it learns),
# and what evaluation computes afresh on every run from its cached answers (perplexity,
# best-of-n, the report's examples and plots).
IGNORED = frozenset({
    "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.report_to",
    "train.resume", "train.allow_sft_only",
    "evaluate.plots", "evaluate.examples", "evaluate.best_of_n", "evaluate.perplexity_model",
    "merge.force",
})
# The keys of the whole recipe that say where and how a run runs, not what it computes.
NOT_RESULTS = frozenset({"output_dir", "cpu_threads"})

PROMPTS = ("data.prompts", "data.prompts_split", "data.max_prompts", "data.plain_prompts_as_chat")
MODEL = ("seed", "model", "quantization")


@dataclass
class StageInputs:
    """What one stage reads: `keys` (dotted recipe keys, a key covering everything under it),
    `values` (each recipe value under them), `content` (label -> fingerprint of a file,
    directory or model; None = not there now) and `files` (the local paths among them)."""

    keys: tuple[str, ...]
    values: dict[str, Any]
    content: dict[str, str | None] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def record(self) -> dict:
        return {"recipe": self.values, "content": self.content}


def recipe_values(recipe: Recipe, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """{dotted key: value} of every leaf under `keys` (all of the recipe when None), lists by
    index (sampling.generators.0.method), ablations by name (ablations.no_rank_loss.train...)."""
    dump = recipe.model_dump(mode="json")
    dump["ablations"] = {a["name"]: a for a in dump.get("ablations", [])}
    out: dict[str, Any] = {}
    for key in keys if keys is not None else tuple(dump):
        node: Any = dump
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        _flatten(key, node, out)
    return {k: v for k, v in out.items() if k not in IGNORED}


def _flatten(prefix: str, node: Any, out: dict) -> None:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(f"{prefix}.{key}", value, out)
    elif isinstance(node, list) and node:
        for index, value in enumerate(node):
            _flatten(f"{prefix}.{index}", value, out)
    else:
        out[prefix] = node


class _Reader:
    """Collects a stage's content fingerprints and its local files."""

    def __init__(self, state: RunState):
        self.state, self.content, self.files = state, {}, []

    def data(self, key: str, source: str | None) -> None:
        """A data source named by a recipe key: a local file's bytes (a hub or builtin set is
        its name, already among the keys)."""
        if not source or is_builtin(source):
            return
        path = Path(source).expanduser()
        if path.exists() or looks_like_local_path(source):
            self._add(f"{key} (file content)", path, content_digest)

    def output(self, path: Path) -> None:
        """A file or directory an earlier stage of this run wrote."""
        self._add(path.relative_to(self.state.run_dir).as_posix(), path, content_digest)

    def adapter(self, key: str, path: str | Path | None) -> None:
        if path:
            self._add(f"{key} (adapter files)", Path(path).expanduser(), content_digest)

    def model(self, key: str, name: str | None) -> None:
        if name and not is_builtin(name) and Path(name).expanduser().exists():
            self._add(f"{key} (its files' names, sizes and times)", Path(name).expanduser(),
                      stat_digest)

    def reward(self, recipe: Recipe) -> None:
        scoring = recipe.scoring
        if scoring.reward_function:
            module, _ = reward_module(scoring.reward_function, scoring.reward_search_dirs())
            try:
                source = inspect.getsourcefile(module)
            except TypeError:  # a built-in module has no file
                source = None
            if source:
                self._add("scoring.reward_function (its module's source)", Path(source),
                          content_digest)
        self.model("scoring.reward_model", scoring.reward_model)
        self.model("scoring.reward_base", scoring.reward_base)

    def base_model(self, recipe: Recipe) -> None:
        self.model("model.name_or_path", recipe.model.name_or_path)
        self.model("model.tokenizer", recipe.model.tokenizer)

    def generators(self, recipe: Recipe) -> None:
        for index, generator in enumerate(recipe.sampling.generators):
            if generator.model not in ("policy", "initial"):
                self.model(f"sampling.generators.{index}.model", generator.model)
            self.adapter(f"sampling.generators.{index}.adapter", generator.adapter)

    def _add(self, label: str, path: Path, fingerprint) -> None:
        self.content[label] = fingerprint(path)
        self.files.append(path)

    def inputs(self, keys: tuple[str, ...]) -> StageInputs:
        return StageInputs(keys, recipe_values(self.state.recipe, keys), self.content, self.files)


# ------------------------------------------------------------------------------ the stages


def sample_inputs(state: RunState, round_index: int) -> StageInputs:
    recipe, read = state.recipe, _Reader(state)
    read.data("data.prompts", recipe.data.prompts)
    read.base_model(recipe)
    read.generators(recipe)
    if round_index > 1:  # round N samples from round N-1's policy
        read.output(state.round_dir(round_index - 1) / "train" / "adapter")
    return read.inputs((*MODEL, "sampling", *PROMPTS, "train.max_prompt_length"))


def score_inputs(state: RunState, source: Path | str) -> StageInputs:
    recipe, read = state.recipe, _Reader(state)
    keys: tuple[str, ...] = ("scoring", "model.trust_remote_code")
    if isinstance(source, Path) and source.is_relative_to(state.run_dir):
        read.output(source)
    else:  # the recipe's own candidates
        keys += ("data.candidates", "data.candidates_split")
        read.data("data.candidates", str(source))
    read.reward(recipe)
    return read.inputs(keys)


def train_inputs(state: RunState, data: Path | str, init_adapter: Path | None,
                 ablation: AblationSection | None = None) -> StageInputs:
    recipe, read = state.recipe, _Reader(state)
    keys: tuple[str, ...] = (*MODEL, "lora", "train")
    if isinstance(data, Path) and data.is_relative_to(state.run_dir):
        read.output(data)
    else:
        keys += ("data.candidates", "data.candidates_split")
        read.data("data.candidates", str(data))
    read.base_model(recipe)
    if init_adapter is not None:
        read.output(init_adapter)
    if ablation is not None:
        keys += (f"ablations.{ablation.name}",)
        if ablation.method == "dpo" and not (ablation.dpo and ablation.dpo.max_steps):
            # DPO takes as many steps as RRHF's round 1 did: that round's summary says how many
            summary = state.round_dir(1) / "train" / "train_summary.json"
            read.output(summary)
    return read.inputs(keys)


def evaluation_inputs(state: RunState) -> StageInputs:
    """What every variant's evaluation shares: the prompt sets, the reward, the held-out
    candidates (sampled from the initial model unless the recipe gives them), the general
    prompts, the settings answers are generated and ranked with."""
    recipe, read = state.recipe, _Reader(state)
    data, evaluate = recipe.data, recipe.evaluate
    keys: tuple[str, ...] = (*MODEL, "scoring", "evaluate", "data.eval_prompts",
                             "data.eval_split", "data.max_eval_prompts",
                             "data.plain_prompts_as_chat", "train.max_length",
                             "train.max_prompt_length", "train.length_penalty",
                             "train.candidate_micro_batch_size")
    read.data("data.eval_prompts", data.eval_prompts)
    if not data.eval_prompts or evaluate.train_prompts:  # training prompts are asked too
        keys += ("data.prompts", "data.prompts_split")
        read.data("data.prompts", data.prompts)
    if evaluate.ranking_candidates:
        read.data("evaluate.ranking_candidates", evaluate.ranking_candidates)
    else:
        keys += ("sampling",)
        read.generators(recipe)
    read.data("evaluate.general_prompts", evaluate.general_prompts)
    read.base_model(recipe)
    read.reward(recipe)
    return read.inputs(keys)


def variant_inputs(state: RunState, adapter: Path | None) -> StageInputs:
    """One variant's own input beyond evaluation_inputs: its adapter (none: the initial model)."""
    read = _Reader(state)
    if adapter is not None:
        read.output(adapter)
    return read.inputs(())


def merge_inputs(state: RunState, adapter: Path) -> StageInputs:
    read = _Reader(state)
    read.output(adapter)
    read.base_model(state.recipe)
    return read.inputs(("model", "quantization", "merge"))
