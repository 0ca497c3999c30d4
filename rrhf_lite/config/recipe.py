"""The recipe: one YAML file that says which stages to run and with what settings.

This module holds the whole recipe (Recipe) and its loading; rrhf_lite.config.sections holds
the sections it is made of.

Validated up front with pydantic. Unknown keys are errors that name the key and the closest
valid one (a misspelt `lerning_rate` must never be silently ignored); wrong types name the key
and the type expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rrhf_lite.config.ablations import AblationSection
from rrhf_lite.config.sections import (
    DataSection,
    EvaluateSection,
    LoraSection,
    MergeSection,
    ModelSection,
    QuantizationSection,
    SamplingSection,
    ScoringSection,
    Section,
    TrainSection,
    UserPath,
    unknown_key_message,
)
from rrhf_lite.config.yaml_strict import load_strict
from rrhf_lite.errors import UserInputError

STAGES = ("sample", "score", "train", "evaluate", "merge")
class Recipe(Section):
    name: str = "rrhf"
    output_dir: UserPath = "runs/rrhf"
    seed: int = Field(0, ge=0, lt=2**32, description="0 .. 2**32 - 1 (numpy's seed range)")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads on CPU; None = torch's default (tiny models run "
        "faster on 1: thread start-up costs more than their small matrix products gain)",
    )
    stages: list[Literal["sample", "score", "train", "evaluate", "merge"]] = Field(
        default_factory=lambda: list(STAGES)
    )
    rounds: int = Field(1, gt=0, description="Iterated RRHF: rounds of sample -> score -> train")
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    scoring: ScoringSection = Field(default_factory=ScoringSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    ablations: list[AblationSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_have_inputs(self):
        stages = set(self.stages)
        if "sample" in stages and not self.data.prompts:
            raise ValueError("stage 'sample' needs data.prompts")
        if "train" in stages and "sample" not in stages and not self.data.candidates:
            raise ValueError("stage 'train' without 'sample' needs data.candidates")
        if ("score" in stages or "evaluate" in stages) and not (
            self.scoring.reward_model or self.scoring.reward_function or self.scoring.given
        ):
            raise ValueError(
                "stages 'score'/'evaluate' need a reward: set scoring.reward_model, "
                "scoring.reward_function or scoring.given"
            )
        names = [a.name for a in self.ablations]
        if len(set(names)) != len(names):
            raise ValueError(f"two ablations share a name ({names}); each needs its own")
        if self.model.builtin and not self.model.name_or_path.startswith("builtin:"):
            raise ValueError("model.builtin holds settings of a builtin: model, but "
                             f"model.name_or_path is {self.model.name_or_path!r}; remove "
                             "model.builtin")
        cuts = [("sampling.max_prompt_length", self.sampling.max_prompt_length)] + [
            (f"sampling.generators.{i}.max_prompt_length", g.max_prompt_length)
            for i, g in enumerate(self.sampling.generators)]
        for key, sampled in cuts if {"sample", "train"} <= stages else []:
            if sampled not in (None, self.train.max_prompt_length):
                raise ValueError(
                    f"{key} ({sampled}) differs from train.max_prompt_length "
                    f"({self.train.max_prompt_length}): candidates would follow another prompt "
                    "than the one training reads; set train.max_prompt_length only (sampling "
                    "follows it)")
        if self.rounds > 1 and not {"sample", "train"} <= stages:
            raise ValueError(
                "rounds > 1 re-samples from the trained policy and trains again: add 'sample' "
                "and 'train' to stages"
            )
        return self

    @property
    def sampling_prompt_length(self) -> int:
        """Prompt tokens sampling keeps: sampling.max_prompt_length, else the training one."""
        return self.sampling.max_prompt_length or self.train.max_prompt_length

    def policy_load_kwargs(self) -> dict:
        """How sampling and evaluation load the policy's base: as training saw it."""
        return {
            "torch_dtype": self.model.torch_dtype,
            "quantization_config": self.quantization.bnb_config(),
            "fused_cpu_4bit": (self.quantization.fused_cpu_max_rows
                               if self.quantization.fused_cpu_kernel else False),
            "trust_remote_code": self.model.trust_remote_code,
        }

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value):
        if not value:
            raise ValueError("name at least one stage")
        twice = sorted({s for s in value if value.count(s) > 1})
        if twice:
            raise ValueError(f"stage {', '.join(map(repr, twice))} is listed twice; list each "
                             "stage once")
        return sorted(value, key=STAGES.index)


# ---------------------------------------------------------------------------- loading


def _section_fields(loc: tuple) -> dict | None:
    """The fields of the section at `loc` (a pydantic error location), to suggest a close key."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model.model_fields
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model.model_fields


def _format_validation_error(err: ValidationError, source: str) -> UserInputError:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            fields = _section_fields(loc[:-1]) or {}
            lines.append(f"recipe key {key}: {unknown_key_message(loc[-1], fields)}")
        elif item["type"] == "missing":
            lines.append(f"recipe key {key}: required but missing")
        else:
            got = item.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"recipe key {key}: {item['msg']}{got_text}")
    return UserInputError(
        "invalid recipe\n  " + "\n  ".join(lines), where=source,
        hint="fix the keys above; `rrhf-lite schema` prints every key with its type and default",
    )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` overrides; the value is parsed as YAML (so 3, true, [1,2] work)."""
    for item in overrides:
        if "=" not in item:
            raise UserInputError(
                f"--set expects key=value, got {item!r}", hint="e.g. --set train.learning_rate=1e-4"
            )
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[:depth + 1], parts[depth + 1], dotted)
        if isinstance(node, list):
            node, last = node, _index(node, parts[-1], dotted, parts[:-1])
            if last == len(node):
                node.append(None)
        else:
            last = parts[-1]
        try:
            parsed = load_strict(value, f"--set {dotted}")
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserInputError(
                f"the value {value!r} is not valid YAML ({problem})", where=f"--set {dotted}",
                hint="quote the value for the shell, e.g. --set 'key=[a, b]' or "
                "--set key='\"text: with colon\"'") from None
        node[last] = _number_or_same(parsed)
    return raw


def _index(items: list, part: str, dotted: str, path: list[str]) -> int:
    """`part` as a position in the list at `path`: 0 .. len (len appends a new item)."""
    key = ".".join(path)
    if not part.isdigit():
        raise UserInputError(f"{key} is a list: the next part must be a position, got {part!r}",
                             where=f"--set {dotted}", hint=f"e.g. --set {key}.0.<key>=value")
    if int(part) > len(items):
        raise UserInputError(
            f"{key} has {len(items)} item(s): position {part} is past its end",
            where=f"--set {dotted}",
            hint=f"use 0 .. {len(items) - 1}, or {len(items)} to add an item")
    return int(part)


def _default_at(path: list[str]):
    """The recipe's default at `path` (a section or list the YAML left out), as plain data."""
    model: Any = Recipe
    value: Any = None
    for part in path:
        if isinstance(value, list):
            value = value[int(part)] if part.isdigit() and int(part) < len(value) else None
            continue
        fields = getattr(model, "model_fields", None)
        field = fields.get(part) if fields else None
        if field is None or field.is_required():
            return None
        value = field.get_default(call_default_factory=True)
        model = value if isinstance(value, BaseModel) else None
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, list):
            value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
            inner = getattr(field.annotation, "__args__", ())
            model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)),
                         None)
    return value


def _child(node, part: str, path: list[str], following: str, dotted: str):
    """The mapping or list at `part` of `node`, created (from the recipe's default) if absent."""
    if isinstance(node, list):
        position = _index(node, part, dotted, path[:-1])
        if position == len(node):
            node.append({})
        child = node[position]
    else:
        if part not in node:  # a list left out of the YAML starts as its default (generators)
            default = _default_at(path)
            node[part] = default if isinstance(default, list) else (
                [] if following.isdigit() else {})
        child = node[part]
    if child is None:
        child = {}
        node[position if isinstance(node, list) else part] = child
    if not isinstance(child, dict | list):
        raise UserInputError(f"--set {dotted}: '{part}' is not a section or a list")
    return child


def _number_or_same(value):
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise UserInputError(
            f"a recipe is a YAML mapping of keys, got {type(raw).__name__}", where=source,
            hint="see recipes/tiny_world.yaml for the shape",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err, source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Bad input raises UserInputError (exit 2)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserInputError("the recipe path is a directory", where=str(path),
                             hint="give the path of a recipe YAML file inside it")
    if not path.is_file():
        raise UserInputError("recipe file not found", where=str(path), hint="check the path")
    try:
        raw = load_strict(path.read_text(encoding="utf-8"), str(path))
    except OSError as err:
        raise UserInputError(f"cannot read the recipe ({err.strerror})", where=str(path),
                             hint="check the file's permissions") from None
    except UnicodeDecodeError:
        raise UserInputError(
            "recipe is not valid UTF-8", where=str(path), hint="re-save the recipe as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise UserInputError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where,
            hint="fix the YAML at that line; recipes are read with yaml.safe_load, so tags "
            "such as !!python/... are not allowed",
        ) from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        parse_recipe(raw, str(path))  # raises the "a recipe is a mapping" error
    raw = apply_overrides(raw, overrides or [])
    recipe = parse_recipe(raw, str(path))
    recipe.scoring._recipe_dir = str(path.resolve().parent)  # the reward file is found from it
    return recipe


def recipe_schema() -> dict:
    return Recipe.model_json_schema()


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
