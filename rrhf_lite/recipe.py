"""The recipe: one YAML file that says which stages to run and with what settings.

Validated up front with pydantic. Unknown keys are errors that name the key and the closest
valid one (a misspelt `lerning_rate` must never be silently ignored); wrong types name the key
and the type expected.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rrhf_lite.errors import UserInputError
from rrhf_lite.precision import torch_dtype

STAGES = ("sample", "score", "train", "evaluate", "merge")
# bitsandbytes quantises 4-bit weights in blocks of 64 (BitsAndBytesConfig has no key for it);
# merge's round trip must use the same block size to re-create the weights training saw.
BNB_4BIT_BLOCKSIZE = 64


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The policy's base model: a hub name, a local directory, or `builtin:tiny-world`."""

    name_or_path: str = Field(description="Base model: hub name, local dir, or builtin:tiny-world")
    tokenizer: str | None = Field(None, description="Tokenizer if not the model's own")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off by default)")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    builtin: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of a builtin: model (tiny world: steps, p_correct, hidden_size, ...)",
    )


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Load the base in 4-bit through bitsandbytes")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    double_quant: bool = True
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype holding the packed 4-bit weights; auto = model.torch_dtype "
        "under FSDP / DeepSpeed ZeRO-3 (one dtype per sharded block), uint8 otherwise",
    )

    def bnb_config(self, *, device: str | None = None, quant_storage=None):
        """The BitsAndBytesConfig the base is loaded with, or None when it is not 4-bit.

        One config for training, sampling, evaluation (and merge's round trip, see roundtrip),
        so every stage sees the same 4-bit base. `quant_storage` (a torch.dtype) overrides the
        section's; training passes the one its sharding engine needs.
        """
        if not self.load_in_4bit:
            return None
        from transformers import BitsAndBytesConfig

        storage = "uint8" if self.quant_storage == "auto" else self.quant_storage
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype, device),
            bnb_4bit_quant_storage=quant_storage or torch_dtype(storage),
        )

    def roundtrip(self) -> dict:
        """merge_adapter's round-trip settings: the 4-bit format the adapter was trained against."""
        return {"quant_type": self.quant_type, "blocksize": BNB_4BIT_BLOCKSIZE,
                "double_quant": self.double_quant}


class LoraSection(Section):
    enabled: bool = Field(True, description="Train LoRA adapters; false = full fine-tuning")
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class DataSection(Section):
    prompts: str | None = Field(None, description="Prompts to sample from (file, hub name, builtin:...)")
    prompts_split: str = "train"
    candidates: str | None = Field(
        None, description="Listwise training data when not sampling (file or hub name)"
    )
    candidates_split: str = "train"
    eval_prompts: str | None = Field(None, description="Held-out prompts for evaluation")
    eval_split: str = "test"
    max_prompts: int | None = Field(None, gt=0, description="Use only the first N training prompts")
    max_eval_prompts: int | None = Field(None, gt=0)


class GeneratorSection(Section):
    """One source of candidates. `model` is `policy` (the model being trained, with its latest
    adapter), `initial` (the base model as it was), or any other model name or path."""

    model: str = "policy"
    adapter: str | None = None
    method: Literal["greedy", "beam", "diverse_beam", "top_p"] = "diverse_beam"
    num_candidates: int = Field(4, gt=0)
    num_beams: int | None = Field(None, gt=0, description="Beams (beam methods); None = num_candidates")
    num_beam_groups: int = Field(4, gt=0)
    diversity_penalty: float = Field(1.0, ge=0.0)
    length_penalty: float = Field(1.0, description="Beam score = log-prob sum / length ** this")
    temperature: float = Field(0.8, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="top_p sampling: 0 = no top-k cut")


class SamplingSection(Section):
    generators: list[GeneratorSection] = Field(default_factory=lambda: [GeneratorSection()])
    include_dataset_responses: bool = Field(
        True, description="Add the data set's own answers (chosen/rejected/responses) as candidates"
    )
    max_new_tokens: int = Field(128, gt=0)
    max_prompt_length: int = Field(256, gt=0, description="Prompts are left-truncated to this")
    batch_size: int = Field(8, gt=0)


class ScoringSection(Section):
    """Exactly one source of rewards."""

    reward_model: str | None = Field(None, description="HF sequence-classification reward model")
    reward_function: str | None = Field(None, description="Python callable as module:function")
    given: bool = Field(False, description="Scores are already in the candidates file")
    joiner: str = Field("", description="Text between prompt and response for the reward model")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _exactly_one_source(self):
        chosen = [n for n in ("reward_model", "reward_function") if getattr(self, n)]
        if self.given:
            chosen.append("given")
        if len(chosen) > 1:
            raise ValueError(f"set only one of reward_model, reward_function, given (got {chosen})")
        return self

    @field_validator("reward_function")
    @classmethod
    def _module_colon_function(cls, value):
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError("must look like 'package.module:function'")
        return value

    @field_validator("reward_model")
    @classmethod
    def _not_builtin(cls, value):
        if value is not None and value.startswith("builtin:"):
            raise ValueError("there is no built-in reward model; the tiny world grades with "
                             "reward_function: rrhf_lite.tiny.tasks:reward")
        return value

    def reward_spec(self, *, trust_remote_code: bool = False, device: str | None = None) -> dict:
        """What score_candidates takes: {"model": ...} | {"function": ...} | {"given": True}."""
        if self.reward_model:
            return {"model": self.reward_model, "batch_size": self.batch_size,
                    "max_length": self.max_length, "joiner": self.joiner,
                    "trust_remote_code": trust_remote_code, "device": device}
        if self.reward_function:
            return {"function": self.reward_function, "batch_size": self.batch_size}
        return {"given": True}


class TrainSection(Section):
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    per_device_train_batch_size: int = Field(1, gt=0, description="Prompts per device step")
    gradient_accumulation_steps: int = Field(8, gt=0)
    length_penalty: float = Field(1.0, ge=0.0, description="lambda in p_i = sum / |y_i|^lambda")
    rank_weight: float = Field(1.0, ge=0.0)
    sft_weight: float = Field(1.0, ge=0.0)
    max_length: int = Field(512, gt=0)
    max_prompt_length: int = Field(256, gt=0)
    truncation_side: Literal["left", "right"] = "left"
    candidate_micro_batch_size: int | None = Field(
        None, gt=0, description="Candidates per forward pass; None = all at once"
    )
    logprob_backend: Literal["auto", "triton", "torch"] = "auto"
    logprob_path: Literal["auto", "hidden", "logits"] = Field(
        "auto", description="auto = log-probs straight from hidden states (no [N, T, V] logits) "
        "where the model's head allows it; hidden = require that; logits = never")
    gradient_checkpointing: bool = True
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, fp16 on others (T4), none on CPU"
    )
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int | None = 2
    report_to: str | list[str] = "none"
    resume: bool = Field(True, description="Resume from the last checkpoint in the run directory")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other transformers.TrainingArguments field"
    )


class EvaluateSection(Section):
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0)
    best_of_n: bool = Field(True, description="Reward of the best initial-model candidate")
    train_prompts: int = Field(
        0, ge=0, description="Also report greedy reward on this many training prompts"
    )
    perplexity_model: str | None = Field(
        None, description="Fixed LM under which every variant's answers get a perplexity "
        "(the paper's measure); None = the initial model, unquantised",
    )
    ranking_candidates: str | None = Field(
        None, description="Held-out listwise set for the model-as-reward-model ranking accuracy"
    )
    plots: bool = True


class MergeSection(Section):
    torch_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    roundtrip_nf4: bool = Field(
        True, description="Pass the base through NF4 first, to match what the adapter saw"
    )
    force: bool = False


# Variant names the run gives itself (evaluation rows, eval/ files, plots): not for ablations.
RESERVED_VARIANTS = re.compile(r"initial|rrhf|rrhf_round\d+|best-of-n")
ABLATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class AblationSection(Section):
    """A variant trained on the same candidates with some train.* keys changed (e.g. no rank loss).

    `name` becomes a directory (ablations/<name>/) and a row of the report: letters, digits,
    "_", "-", "." (not first), and none of the run's own variant names (initial, rrhf,
    rrhf_round<N>, best-of-n).
    """

    name: str
    train: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value):
        if not ABLATION_NAME.fullmatch(value):
            raise ValueError("use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                             "or digit (the name becomes a directory)")
        if RESERVED_VARIANTS.fullmatch(value):
            raise ValueError(f"{value!r} names one of the run's own variants; choose another name")
        return value

    @field_validator("train")
    @classmethod
    def _known_train_keys(cls, value):
        for key in value:
            if key not in TrainSection.model_fields:
                raise ValueError(_unknown_key_message(key, TrainSection.model_fields))
        return value


class Recipe(Section):
    name: str = "rrhf"
    output_dir: str = "runs/rrhf"
    seed: int = 0
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
        if self.rounds > 1 and not {"sample", "train"} <= stages:
            raise ValueError(
                "rounds > 1 re-samples from the trained policy and trains again: add 'sample' "
                "and 'train' to stages"
            )
        return self

    def policy_load_kwargs(self) -> dict:
        """How sampling and evaluation load the policy's base: as training saw it."""
        return {
            "torch_dtype": self.model.torch_dtype,
            "quantization_config": self.quantization.bnb_config(),
            "trust_remote_code": self.model.trust_remote_code,
        }

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value):
        if not value:
            raise ValueError("name at least one stage")
        if len(set(value)) != len(value):
            raise ValueError("a stage is listed twice")
        return sorted(value, key=STAGES.index)


# ---------------------------------------------------------------------------- loading


def _unknown_key_message(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown key '{key}'{hint}"


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
            lines.append(f"recipe key {key}: {_unknown_key_message(loc[-1], fields)}")
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
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserInputError(f"--set {dotted}: '{part}' is not a section")
            node = child
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {dotted}: value is not valid YAML ({exc})") from None
        node[parts[-1]] = _number_or_same(parsed)
    return raw


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
            hint="see recipes/quickstart.yaml for the shape",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err, source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Bad input raises UserInputError (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("recipe file not found", where=str(path), hint="check the path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    return parse_recipe(raw, str(path))


def recipe_schema() -> dict:
    return Recipe.model_json_schema()


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
