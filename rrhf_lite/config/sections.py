"""The sections of a recipe: each carries its settings, defaults and checks, and builds what its
stages need from them (a BitsAndBytesConfig, a reward spec, a generator), so no stage keeps a
second copy of the defaults. The whole recipe and its loading live in rrhf_lite.config.recipe.
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rrhf_lite.utils.precision import torch_dtype


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (`learning_rate: .inf` and
    # `num_train_epochs: .nan` are errors naming the key, not a NaN adapter or an overflow later)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _expand_user(value: str | None) -> str | None:
    """`~/x` -> `$HOME/x` (paths only; a hub name never starts with ~); no NUL characters."""
    if value is None:
        return None
    if "\x00" in value:
        raise ValueError("a path or name cannot contain a NUL character")
    return os.path.expanduser(value) if value.startswith("~") else value


# A path or a hub name: `~` is expanded once, here, so every stage sees the same path.
UserPath = Annotated[str, AfterValidator(_expand_user)]
OptionalUserPath = Annotated[str | None, AfterValidator(_expand_user)]

# transformers' attention implementations; a hub kernel ("org/repo") is also accepted.
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
             "paged_attention", "sdpa_paged", "eager_paged", "flash_paged")
SEED = Field(None, ge=0, lt=2**32, description="0 .. 2**32 - 1")


def unknown_key_message(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown key '{key}'{hint}"



# bitsandbytes quantises 4-bit weights in blocks of 64 (BitsAndBytesConfig has no key for it);
# merge's round trip must use the same block size to re-create the weights training saw.
BNB_4BIT_BLOCKSIZE = 64


class ModelSection(Section):
    """The policy's base model: a hub name, a local directory, or `builtin:tiny-world`."""

    name_or_path: UserPath = Field(description="Base model: hub name, local dir, or builtin:tiny-world")
    tokenizer: OptionalUserPath = Field(None, description="Tokenizer if not the model's own")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off by default)")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    builtin: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of a builtin: model (tiny world: steps, p_correct, hidden_size, ...)",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value):
        if value is None or value in ATTENTION or value.count("/") == 1:
            return value
        close = difflib.get_close_matches(value, ATTENTION, n=1)
        raise ValueError(f"unknown attention implementation {value!r}"
                         + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (one of {', '.join(ATTENTION)}, or a hub kernel 'org/repo')")


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Load the base in 4-bit through bitsandbytes")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    double_quant: bool = True
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype holding the packed 4-bit weights; auto = model.torch_dtype "
        "under FSDP / DeepSpeed ZeRO-3 (one dtype per sharded block), uint8 otherwise",
    )
    fused_cpu_kernel: bool = Field(
        True, description="On CPUs with AVX512-BF16: sampling and evaluation run the 4-bit layers "
        "whose shapes allow it through bitsandbytes' fused bf16 kernel (logits within bf16 "
        "rounding of training's) for calls of up to fused_cpu_max_rows input rows; false = "
        "dequantise + matmul everywhere, as training does",
    )
    fused_cpu_max_rows: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="The largest call (input rows: batch x new tokens) that takes the "
        "fused kernel; larger calls (prefills, big batches) dequantise + matmul. auto = measured "
        "once on this CPU for the model's layer shapes, then cached",
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
    prompts: OptionalUserPath = Field(None, description="Prompts to sample from (file, hub name, builtin:...)")
    prompts_split: str = "train"
    candidates: OptionalUserPath = Field(
        None, description="Listwise training data when not sampling (file or hub name)"
    )
    candidates_split: str = "train"
    eval_prompts: OptionalUserPath = Field(None, description="Held-out prompts for evaluation")
    eval_split: str = "test"
    max_prompts: int | None = Field(None, gt=0, description="Use only the first N training prompts")
    max_eval_prompts: int | None = Field(None, gt=0)
    plain_prompts_as_chat: bool = Field(
        True, description="Plain-text prompts (data.prompts, data.eval_prompts) become "
        "single-turn chats [{role: user, content: ...}] when the model has a chat template, "
        "said once in the log; false = the model reads the bare text")


class GeneratorSection(Section):
    """One source of candidates. `model` is `policy` (the model being trained, with its latest
    adapter), `initial` (the base model as it was), or any other model name or path."""

    model: UserPath = "policy"
    adapter: OptionalUserPath = None
    name: str | None = Field(None, description="Label in the candidates' sources; default: the model")
    method: Literal["greedy", "beam", "diverse_beam", "top_p"] = "diverse_beam"
    num_candidates: int = Field(4, gt=0)
    num_beams: int | None = Field(None, gt=0, description="Beams (beam methods); None = num_candidates")
    num_beam_groups: int = Field(4, gt=0)
    diversity_penalty: float = Field(1.0, ge=0.0)
    length_penalty: float = Field(1.0, description="Beam score = log-prob sum / length ** this")
    temperature: float = Field(0.8, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="top_p sampling: 0 = no top-k cut")
    # None: the sampling section's value (sample_candidates' arguments of the same name)
    max_new_tokens: int | None = Field(None, gt=0)
    max_prompt_length: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    seed: int | None = SEED

    @field_validator("num_beam_groups")
    @classmethod
    def _groups_divide_the_beams(cls, groups: int, info: ValidationInfo) -> int:
        if info.data.get("method") != "diverse_beam" or "num_candidates" not in info.data:
            return groups
        candidates = info.data["num_candidates"]
        beams = info.data.get("num_beams") or candidates
        if beams < candidates or beams % groups:
            raise ValueError(
                f"num_beams ({beams}) must be >= num_candidates ({candidates}) and a multiple of "
                f"num_beam_groups ({groups}); e.g. num_candidates 4 with num_beam_groups 4 (or "
                "2), or set num_beams")
        return groups


class SamplingSection(Section):
    generators: list[GeneratorSection] = Field(default_factory=lambda: [GeneratorSection()])
    include_dataset_responses: bool = Field(
        True, description="Add the data set's own answers (chosen/rejected/responses) as candidates"
    )
    max_new_tokens: int = Field(128, gt=0)
    max_prompt_length: int | None = Field(
        None, gt=0, description="Prompts are left-truncated to this (BOS kept); None = "
        "train.max_prompt_length, so candidates follow the very prompt training reads",
    )
    batch_size: int = Field(8, gt=0)


class ScoringSection(Section):
    """Exactly one source of rewards."""

    reward_model: OptionalUserPath = Field(None, description="HF sequence-classification reward "
                                           "model; with reward_format gptj_value_head, the raw "
                                           "checkpoint (file, directory or hub name)")
    reward_format: Literal["sequence_classification", "gptj_value_head"] = Field(
        "sequence_classification", description="sequence_classification: a transformers "
        "classifier in safetensors, read at the last token. gptj_value_head: a raw PyTorch state "
        "dict of GPT-J + linear value head (Dahoas/gptj-rm-static's hf_ckpt.pt), read with "
        "torch.load(weights_only=True), converted once to safetensors, scored as the reference "
        "does: EOS appended, the value read at the first EOS",
    )
    reward_base: OptionalUserPath = Field(
        None, description="gptj_value_head: the model the checkpoint was trained from "
        "(EleutherAI/gpt-j-6B); only its config.json and tokenizer are read",
    )
    reward_function: str | None = Field(
        None, description="Your Python reward as module:function (my_reward:reward, my_reward.py "
        "beside the recipe) or path/to/file.py:function, found from the recipe's directory, then "
        "the working directory. Signature: reward(prompts, responses) -> list[float], one float "
        "per pair, called in batches of scoring.batch_size; a prompt is the data's own (text, or "
        "a list of {role, content} messages). `rrhf-lite validate` calls it once",
    )
    given: bool = Field(False, description="Scores are already in the candidates file")
    joiner: str = Field("", description="Text between prompt and response for the reward model")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=0)

    # the directory of the recipe file (set by load_recipe): reward_function is found from it
    _recipe_dir: str | None = PrivateAttr(None)

    def reward_search_dirs(self) -> tuple[str, ...]:
        """Where reward_function is looked for before the working directory."""
        return (self._recipe_dir,) if self._recipe_dir else ()

    @model_validator(mode="after")
    def _exactly_one_source(self):
        chosen = [n for n in ("reward_model", "reward_function") if getattr(self, n)]
        if self.given:
            chosen.append("given")
        if len(chosen) > 1:
            raise ValueError(f"set only one of reward_model, reward_function, given (got {chosen})")
        if self.reward_format == "gptj_value_head" and not (self.reward_model and self.reward_base):
            raise ValueError("reward_format gptj_value_head needs reward_model (the raw "
                             "checkpoint) and reward_base (e.g. EleutherAI/gpt-j-6B: its config "
                             "and tokenizer)")
        if self.reward_base and self.reward_format != "gptj_value_head":
            raise ValueError("reward_base is read only with reward_format gptj_value_head")
        return self

    @field_validator("reward_function")
    @classmethod
    def _module_colon_function(cls, value):
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError("must look like 'module:function' or 'path/to/file.py:function'")
        return value

    @field_validator("reward_model")
    @classmethod
    def _not_builtin(cls, value):
        if value is not None and value.startswith("builtin:"):
            raise ValueError("there is no built-in reward model; the tiny world grades with "
                             "reward_function: rrhf_lite.builtin.tiny.tasks:reward")
        return value

    def reward_spec(self, *, trust_remote_code: bool = False, device: str | None = None) -> dict:
        """What score_candidates takes: {"model": ...} | {"function": ...} | {"given": True}."""
        if self.reward_model:
            spec = {"model": self.reward_model, "batch_size": self.batch_size,
                    "max_length": self.max_length, "joiner": self.joiner,
                    "trust_remote_code": trust_remote_code, "device": device}
            if self.reward_format == "gptj_value_head":  # the reference's reading
                spec.update(format=self.reward_format, base=self.reward_base, append_eos=True,
                            read_at="first_eos", trust_remote_code=False)
            return spec
        if self.reward_function:
            return {"function": self.reward_function, "batch_size": self.batch_size,
                    "search_dirs": self.reward_search_dirs()}
        return {"given": True}


class TrainSection(Section):
    num_train_epochs: float = Field(3.0, gt=0, le=1e6)
    max_steps: int = Field(-1, description="Overrides epochs when > 0")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    per_device_train_batch_size: int = Field(1, gt=0, description="Prompts per device step")
    gradient_accumulation_steps: int = Field(8, gt=0)
    length_penalty: float = Field(1.0, ge=0.0, description="lambda in p_i = sum / |y_i|^lambda")
    loss_type: Literal["rrhf", "pro", "pl_dpo", "lipo", "dpo_pairs"] = Field(
        "rrhf", description="The objective on the k candidates: rrhf; pro (Preference Ranking "
        "Optimisation); pl_dpo (Plackett-Luce DPO), lipo (LiPO-lambda), dpo_pairs (DPO over every "
        "pair): the DPO family, against the base with the LoRA adapter disabled")
    beta: float = Field(0.1, gt=0.0, description="DPO family: u_i = beta * (log pi - log pi_ref)")
    rank_weight: float = Field(1.0, ge=0.0, description="Weight of the objective's preference term")
    sft_weight: float | None = Field(
        None, ge=0.0, description="Weight of the SFT term on the best candidate; None = the "
        "objective's paper default: 1 for rrhf and pro, 0 for the DPO family")
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
    share_prompt: Literal["auto"] | bool = Field(
        "auto", description="auto = each prompt runs once for its k candidates (packed rows, a "
        "4-D attention mask; same numbers) where the model allows it, said once in the log; "
        "true = require that; false = every candidate row repeats its prompt")
    gradient_checkpointing: bool = True
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, fp16 on others (T4), none on CPU"
    )
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int | None = 2
    report_to: str | list[str] = "none"
    skip_tied: bool = Field(
        False, description="Leave out of training the rows whose candidates all have the same "
        "reward: no ranking to learn, and the SFT term would imitate the first of equals (with a "
        "programmatic reward often a failure all candidates share); false = the paper's code")
    allow_sft_only: bool = Field(
        False, description="Train even when most rows have one candidate (k = 1: no rank pair, "
        "the SFT loss alone); by default such a run stops with exit code 2 and says why")
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
    perplexity_model: OptionalUserPath = Field(
        None, description="Fixed LM under which every variant's answers get a perplexity "
        "(the paper's measure); None = the initial model, unquantised",
    )
    ranking_accuracy: bool = Field(
        True, description="Report each variant's ranking/accuracy: how often its own log-probs "
        "order the held-out candidates as the reward does (the paper's model-as-reward-model "
        "measure; about a third of the quickstart's evaluation time on a CPU)",
    )
    ranking_candidates: OptionalUserPath = Field(
        None, description="Held-out listwise set for the model-as-reward-model ranking accuracy"
    )
    general_prompts: OptionalUserPath = Field(
        None, description="Prompts unrelated to the task (file, hub name, builtin:general): the "
        "initial model answers them greedily, and each variant's mean per-token log-likelihood "
        "of those answers shows whether general ability collapsed; None = not measured",
    )
    max_general_prompts: int | None = Field(16, gt=0)
    examples: int = Field(3, ge=0, description="Held-out prompts shown with the initial and the "
                          "final policy's answers in report.md")
    plots: bool = True


class MergeSection(Section):
    torch_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the merged weights (`rrhf-lite merge --dtype`, same default)")
    roundtrip_nf4: bool = Field(
        True, description="Pass the base through NF4 first, to match what the adapter saw"
    )
    tolerance: float | None = Field(
        None, ge=0.0, description="max |logit difference| the merge check accepts (`rrhf-lite "
        "merge --tolerance`); default: relative to the logits' scale, per merged dtype")
    force: bool = False
