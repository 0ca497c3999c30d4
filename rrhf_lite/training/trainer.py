"""RRHFTrainer: the RRHF objective on a transformers.Trainer (its RRHFConfig: trainer_config).

Micro-batched candidates with an exact gradient. The loss L depends on the model only through
the per-candidate token log-prob sums S_i (p_i = S_i / |y_i|^lambda and the SFT term
-S_best / |y_best| are both functions of S; the token counts are constants). So
    dL/dtheta = sum_i (dL/dS_i) * dS_i/dtheta.
A training step (1) runs every chunk of candidates without autograd to get all S_i, (2) takes
g_i = dL/dS_i from the loss on those detached sums, (3) re-runs each chunk with autograd and
backpropagates sum_{i in chunk} g_i * S_i. The sum over chunks is the full-batch gradient, while
only one chunk's activations live at a time. Dropout masks match between the two passes because
each chunk's RNG state is saved in pass 1 and restored in pass 3.

No logits in training (logprob_path "auto"/"hidden"): when the model's output embedding is a
plain Linear and its logits are exactly that Linear of the hidden states (LLaMA family, most
decoders; checked once on real input), the model runs without its head and rrhf_kernels reduces
the hidden states with the head's weight tile by tile. Pass 1 also keeps each token's
logsumexp; pass 3, knowing g_i, computes the gradients during the forward
(weighted_logprob_sum_from_hidden), so nothing [N, T, V]-sized exists at any point. Other models
(LoRA on the head, softcapped logits, ...) and parameter-sharding engines keep the logits path.

Several processes (accelerate launch / torchrun with DDP, FSDP or DeepSpeed): the argument holds
per rank, since each rank's gradient is exact for its own batch and the engine averages the
ranks' gradients once per optimizer step (only the step's last backward synchronises). Engines
that shard parameters (FSDP, ZeRO-3) or reduce gradients in every backward (ZeRO-2) need the same
number of forwards and backwards on every rank, so ranks with fewer candidate chunks run
zero-weight padding chunks. Logged metrics are reduced across ranks.

Other objectives (`loss_type`, rrhf_lite.training.objectives) are functions of the same S_i, so
all of the above holds for them unchanged. The DPO family also needs each candidate's reference
sum R_i: with LoRA, the same model with the adapter disabled (no second model); full fine-tuning
has no adapter to disable, so the trainer keeps a frozen copy of the initial model (eval mode,
no gradient, same dtype and device; said once in the log). Either runs under no_grad through the
same chunks (micro-batched, prompt-shared, hidden path) before pass 1; R_i are constants of the
loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from rrhf_lite.data.listwise import load_listwise
from rrhf_lite.data.tokenization import RRHFCollator, tokenize_listwise
from rrhf_lite.errors import UserInputError
from rrhf_lite.models import cpu_4bit
from rrhf_lite.training.config import RRHFConfig
from rrhf_lite.training.finite_guard import NonFiniteGuard
from rrhf_lite.training.logprobs import (
    choose_output_head,
    choose_prompt_sharing,
    chunk_hidden_logprobs,
    chunk_logprob_sums,
    linear_output_head,
)
from rrhf_lite.training.metrics import LoggedMetrics
from rrhf_lite.training.objectives import REFERENCE_LOSS_TYPES, listwise_loss
from rrhf_lite.training.rng import rng_state, set_rng_state
from rrhf_lite.training.shared_prompt import segments_in_use, unwrapped

logger = logging.getLogger(__name__)


class _Features(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


class RRHFTrainer(LoggedMetrics, Trainer):
    """A transformers.Trainer that optimises the RRHF loss.

    Args (beyond Trainer's):
        model: a causal LM, a PeftModel, or a base model with `peft_config` (wrapped here; a
            k-bit model is prepared for k-bit training first, as TRL does).
        args: RRHFConfig.
        train_dataset / eval_dataset: listwise data, anything `rrhf_lite.data.listwise.load_listwise`
            accepts (rows, a path, a datasets.Dataset), or already tokenised features
            ({"prompt_ids", "responses_ids", "scores"}).
        processing_class: the tokenizer (needed unless the data is tokenised).
        peft_config: a peft.LoraConfig (or any PeftConfig).
    Logged metrics per step: loss/total, loss/rank, loss/sft, rank/accuracy, rank/margin,
    rank/pairs, scores/best, scores/mean (eval_ prefixed in evaluation).
    """

    def __init__(self, model=None, args: RRHFConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, data_collator=None,
                 callbacks=None, **kwargs):
        if args is None:
            raise UserInputError("RRHFTrainer needs args=RRHFConfig(...)", where="args",
                                 hint="pass an RRHFConfig")
        if not isinstance(args, RRHFConfig):
            raise TypeError(f"args must be an RRHFConfig, got {type(args).__name__}")
        if peft_config is not None:
            model = self._wrap_peft(model, peft_config, args)
        if model is not None:
            # Evaluation runs in eval mode without grad, where bitsandbytes would switch CPU
            # 4-bit layers to its packed bf16 inference kernel: no backward, other numbers.
            cpu_4bit.configure_for_training(model)
        tokenizer = processing_class
        self.tokenize_stats: dict[str, dict[str, int]] = {}
        self._forward_choices: dict = {}  # decided on the first batch (forward_choices)
        train_dataset = self._prepare_dataset(train_dataset, tokenizer, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(v, tokenizer, args, f"eval_{k}")
                            for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, tokenizer, args, "eval")
        if data_collator is None:
            if tokenizer is None:
                raise UserInputError("RRHFTrainer needs processing_class=tokenizer",
                                     where="processing_class", hint="pass the model's tokenizer")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            data_collator = RRHFCollator(pad)
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         data_collator=data_collator, callbacks=callbacks, **kwargs)
        self.finite_guard = NonFiniteGuard(self)  # a NaN/inf loss or weight stops training
        self.add_callback(self.finite_guard)
        # the DPO family's reference without an adapter to disable: a frozen copy of the model
        # as it is now (moved to its device by the Trainer), kept outside the Trainer's model
        self.ref_model = self._frozen_reference() if args.loss_type in REFERENCE_LOSS_TYPES else None

    # ---------------------------------------------------------------- setup

    @staticmethod
    def _wrap_peft(model, peft_config, args: RRHFConfig):
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if isinstance(model, PeftModel):
            return model
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(args.activation_checkpointing),
                gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs)
        elif args.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
        return get_peft_model(model, peft_config)

    def _frozen_reference(self):
        """None for a PeftModel (its reference is the adapter disabled); otherwise a frozen copy
        of the model: eval mode, no parameter requiring a gradient, same dtype and device."""
        from peft import PeftModel

        if self.model is None or isinstance(self.model, PeftModel):
            return None
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled and
                                    self.accelerator.state.deepspeed_plugin.zero_stage == 3):
            raise UserInputError(
                f"loss_type {self.args.loss_type!r} with full fine-tuning keeps a frozen copy of the "
                "model as its reference, which FSDP and DeepSpeed ZeRO-3 would not shard",
                where="loss_type", hint="train with LoRA (its reference is the adapter disabled), "
                "use DDP or ZeRO-2, or use loss_type rrhf or pro")
        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        weights = sum(p.numel() for p in reference.parameters())
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in reference.parameters()})
        # a warning, not info: the CLI shows only warnings, and this doubles the weights in memory
        logger.warning("rrhf-lite: loss_type %s without LoRA: the reference is a frozen copy of "
                       "the initial model (%.1f M weights, %s, eval mode, no gradient), a second "
                       "model in memory", self.args.loss_type, weights / 1e6, "/".join(dtypes))
        return reference

    def _prepare_dataset(self, data, tokenizer, args: RRHFConfig, name: str):
        if data is None:
            return None
        if isinstance(data, list) and data and isinstance(data[0], dict) and "responses_ids" in data[0]:
            return _Features(data)
        if tokenizer is None:
            raise UserInputError("RRHFTrainer needs processing_class=tokenizer to tokenise data",
                                 where="processing_class", hint="pass the model's tokenizer")
        examples = load_listwise(data, require_scores=True)
        if args.skip_tied and name == "train":
            examples = self._without_tied_rows(examples)
        features, stats = tokenize_listwise(
            examples, tokenizer, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, truncation_side=args.truncation_side)
        self.tokenize_stats[name] = stats.as_dict()
        if not features:
            raise UserInputError(
                f"no {name} row is left after truncation ({stats.rows_dropped} dropped)",
                where="max_length", hint="raise max_length or lower max_prompt_length")
        return _Features(features)

    @staticmethod
    def _without_tied_rows(examples: list[dict]) -> list[dict]:
        """skip_tied: the rows with at least two different rewards (k = 1 rows stay: SFT)."""
        kept = [ex for ex in examples if len(ex["responses"]) == 1 or len(set(ex["scores"])) > 1]
        if not kept:
            raise UserInputError(
                f"every one of the {len(examples)} training rows has all its rewards tied, and "
                "skip_tied leaves them all out", where="skip_tied",
                hint="set skip_tied false, or get candidates that the reward tells apart")
        if len(kept) < len(examples):
            logger.warning("skip_tied: %d of %d training rows left out (all rewards tied)",
                           len(examples) - len(kept), len(examples))
        return kept

    # ---------------------------------------------------------------- the loss

    def _chunks(self, n: int) -> list[slice]:
        size = self.args.candidate_micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _padding_chunks(self, chunks: list[slice]) -> int:
        """How many zero-weight chunks this rank adds so that every rank runs as many chunks.

        FSDP and DeepSpeed ZeRO-3 gather parameters in every forward, ZeRO-2 reduces gradients
        in every backward: a rank running fewer chunks than another would leave it waiting.
        Applied under every multi-process engine (one tiny all-gather per micro-batched step).
        """
        if self.args.candidate_micro_batch_size is None or self.accelerator.num_processes == 1:
            return 0
        count = torch.tensor([len(chunks)], device=self.accelerator.device)
        return int(self.accelerator.gather(count).max()) - len(chunks)

    def _output_head(self, model, inputs: dict):
        """The Linear head when log-probs come from hidden states, else None; decided once."""
        if "logprob_path" in self._forward_choices:  # decided on an earlier batch
            return self._head
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        with self.compute_loss_context_manager():
            head, reason = choose_output_head(model, inputs["input_ids"][:1], inputs["attention_mask"][:1],
                                              self.args.logprob_path, sharded=sharded)
        if head is None and self.args.logprob_path == "hidden":
            raise UserInputError(f"logprob_path 'hidden' is not possible here: {reason}",
                                 where="logprob_path", hint="use 'auto' or 'logits'")
        if head is None:
            logger.info("rrhf-lite: candidate log-probs from [N, T, V] logits (%s)", reason)
        else:
            logger.info("rrhf-lite: candidate log-probs straight from hidden states and the %d x %d "
                        "output embedding: no logits tensor in training", *head.weight.shape)
        self._head = head
        self._forward_choices.update(logprob_path="logits" if head is None else "hidden",
                                    logprob_path_reason=reason)
        return head

    @staticmethod
    def _prompt_groups(inputs: dict) -> torch.Tensor:
        """Each candidate's prompt: its row b in the [B, K] grid of candidate_index."""
        return torch.div(inputs["candidate_index"], inputs["rewards"].shape[1], rounding_mode="floor")

    def _share_prompt(self, model, inputs: dict) -> bool:
        """Whether chunks are packed by prompt (each prompt once for its candidates); decided once."""
        if "share_prompt" in self._forward_choices:  # decided on an earlier batch
            return self._forward_choices["share_prompt"]
        setting = self.args.share_prompt
        # the check reads hidden states where training will (the head is decided first there)
        head = self._head if "logprob_path" in self._forward_choices else None
        with self.compute_loss_context_manager():
            share, reason = choose_prompt_sharing(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                self._prompt_groups(inputs), setting, head=head)
        if not share and setting is True:
            raise UserInputError(f"share_prompt true is not possible here: {reason}",
                                 where="share_prompt", hint="use 'auto' or false")
        if share:
            logger.info("rrhf-lite: each prompt runs once for its candidates (share_prompt %s: "
                        "packed rows, %s)", setting,
                        "attention over the unmasked parts only" if segments_in_use(model)
                        else "4-D attention mask")
        else:
            logger.info("rrhf-lite: every candidate row repeats its prompt (share_prompt off: %s)", reason)
        self._forward_choices.update(share_prompt=share, share_prompt_reason=reason)
        return share

    @property
    def forward_choices(self) -> dict:
        """How candidates went through the model, as decided on the first batch: `logprob_path`
        ("hidden" / "logits") and `share_prompt` (bool), each with its reason. Empty before."""
        return dict(self._forward_choices)

    def _chunk_sums(self, model, inputs: dict, part: slice, *, head=None, **hidden_kw):
        """(sums, counts) of a chunk; with the hidden path, `hidden_kw` (coef, lse, return_lse)
        go to chunk_hidden_logprobs and change what comes back (see there), and `head` replaces
        the policy's output embedding (the frozen reference copy has its own)."""
        policy_head = self._output_head(model, inputs)
        head = None if policy_head is None else (head or policy_head)
        groups = self._prompt_groups(inputs)[part] if self._share_prompt(model, inputs) else None
        args = (inputs["input_ids"][part], inputs["attention_mask"][part], inputs["labels"][part])
        with self.compute_loss_context_manager():
            if head is None:
                return chunk_logprob_sums(model, *args, backend=self.args.logprob_backend, groups=groups)
            return chunk_hidden_logprobs(model, head, *args, backend=self.args.logprob_backend,
                                         groups=groups, **hidden_kw)

    def _add_reference_sums(self, model, inputs: dict, chunks: list[slice], padding: int = 0) -> None:
        """inputs["reference_sums"] [N]: each candidate's log-prob sum under the reference, for
        the DPO family (a no-op for rrhf and pro): the base with the adapter disabled, or the
        frozen copy (ref_model) in full fine-tuning. The same chunks, prompt sharing and log-prob
        path as the policy; no gradient; the RNG state is left as found."""
        if self.args.loss_type not in REFERENCE_LOSS_TYPES or "reference_sums" in inputs:
            return
        self._output_head(model, inputs)  # decide both on the policy, not inside the context
        self._share_prompt(model, inputs)
        state = rng_state()
        runs = chunks + [slice(0, 1)] * padding  # keep sharded engines in step, as the policy does
        if self.ref_model is None:  # LoRA: the same model, its adapter disabled
            context, reference, head = self.accelerator.unwrap_model(model).disable_adapter(), model, None
        else:
            context, reference, head = contextlib.nullcontext(), self._reference_like(model), \
                linear_output_head(self.ref_model)
        with torch.no_grad(), context:
            sums = [self._chunk_sums(reference, inputs, part, head=head)[0] for part in runs]
        set_rng_state(state)
        inputs["reference_sums"] = torch.cat(sums[:len(chunks)]).detach()

    def _reference_like(self, model):
        """The frozen copy with the policy's attention implementation (prompt sharing may have
        switched the policy to rrhf_lite.training.segment_attention, which reads the layout)."""
        policy_config = getattr(unwrapped(model), "config", None)
        if policy_config is not None and hasattr(self.ref_model, "config"):
            self.ref_model.config._attn_implementation = policy_config._attn_implementation
        return self.ref_model

    def loss_from_sums(self, sums: torch.Tensor, counts: torch.Tensor, inputs: dict):
        """The objective's loss and metrics from flat per-candidate sums [N] and counts [N] (and,
        for the DPO family, inputs["reference_sums"] [N])."""
        rewards, mask, index = inputs["rewards"], inputs["candidate_mask"], inputs["candidate_index"]
        B, K = rewards.shape
        sums = sums.float()
        counts_f = counts.to(sums.dtype).clamp(min=1)
        scores = sums / counts_f ** self.args.length_penalty

        def grid(values):
            return values.new_zeros(B * K).index_copy(0, index, values).view(B, K)

        reference = inputs.get("reference_sums")
        return listwise_loss(
            self.args.loss_type, grid(scores), grid(sums), grid(counts_f), rewards.float(), mask,
            None if reference is None else grid(reference.float()), beta=self.args.beta,
            rank_weight=self.args.rank_weight, sft_weight=self.args.sft_weight)

    def _full_loss(self, model, inputs: dict):
        """All chunks in one autograd graph (evaluation, or compute_loss for custom loops)."""
        chunks = self._chunks(len(inputs["input_ids"]))
        self._add_reference_sums(model, inputs, chunks, self._padding_chunks(chunks))
        parts = [self._chunk_sums(model, inputs, part) for part in chunks]
        sums = torch.cat([s for s, _ in parts])
        counts = torch.cat([c for _, c in parts])
        loss, metrics = self.loss_from_sums(sums, counts, inputs)
        for _ in range(self._padding_chunks(chunks)):  # keep sharded engines in step
            loss = loss + 0.0 * self._chunk_sums(model, inputs, slice(0, 1))[0].sum()
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self._full_loss(model, inputs)
        self._store_metrics(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def _backward(self, loss: torch.Tensor) -> None:
        # the loss is already scaled for gradient accumulation: DeepSpeed must not scale it again
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.accelerator.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    @contextlib.contextmanager
    def _defer_gradient_sync(self, model):
        """Accumulate this backward locally; the step's last backward synchronises the ranks."""
        if not self.accelerator.sync_gradients:
            yield  # the Trainer already defers: not the last batch of the accumulation window
        elif self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # accelerate's DeepSpeed backward steps the optimizer when sync_gradients is set
            state = self.accelerator.gradient_state
            state._set_sync_gradients(False)
            try:
                yield
            finally:
                state._set_sync_gradients(True)
        elif getattr(self, "is_distributed_loading_by_transformers", False):
            with self._defer_fsdp_gradient_reduction():
                yield
        else:
            with self.accelerator.no_sync(model):  # DDP, FSDP; a no-op in one process
                yield

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Two-pass exact micro-batched step; returns the loss scaled for gradient accumulation."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # per-batch losses are prompt means: average them over the accumulation window
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = 1.0 / steps
        if self.args.n_gpu > 1:
            raise NotImplementedError("RRHFTrainer runs one device per process (use DDP, not DataParallel)")
        chunks = self._chunks(len(inputs["input_ids"]))
        padding = self._padding_chunks(chunks)
        self._add_reference_sums(model, inputs, chunks, padding)
        if len(chunks) == 1 and padding == 0:
            sums, counts = self._chunk_sums(model, inputs, chunks[0])
            loss, metrics = self.loss_from_sums(sums, counts, inputs)
            self._backward(loss * scale)
        else:
            loss, metrics = self._micro_batched_backward(model, inputs, chunks, scale, padding)
        self._store_metrics(metrics, "train")
        self.finite_guard.note_loss(loss)
        return loss.detach() * scale

    def _micro_batched_backward(self, model, inputs, chunks, scale, padding=0):
        states, sums, counts, lses = [], [], [], []
        # padding chunks (one candidate, weight 0) only keep sharded engines in step across ranks
        runs = chunks + [slice(0, 1)] * padding
        hidden = self._output_head(model, inputs) is not None
        with torch.no_grad():  # pass 1: every score, no activations kept
            for i, part in enumerate(runs):
                states.append(rng_state())
                if hidden:  # each token's logsumexp, reused by pass 3
                    s, c, lse = self._chunk_sums(model, inputs, part, return_lse=True)
                    lses.append(lse)
                else:
                    s, c = self._chunk_sums(model, inputs, part)
                if i < len(chunks):
                    sums.append(s)
                    counts.append(c)
        after = rng_state()
        leaf = torch.cat(sums).detach().requires_grad_(True)
        with torch.enable_grad():  # pass 2: g_i = dL/dS_i, cheap (B x k numbers)
            loss, metrics = self.loss_from_sums(leaf, torch.cat(counts), inputs)
            (grad,) = torch.autograd.grad(loss, leaf)
        for i, (part, state) in enumerate(zip(runs, states, strict=True)):  # pass 3: per chunk
            set_rng_state(state)  # same dropout masks as in pass 1
            weight = grad[part] if i < len(chunks) else torch.zeros_like(grad[:1])
            # only the last backward synchronises ranks (the others accumulate locally)
            sync = i == len(runs) - 1
            with contextlib.nullcontext() if sync else self._defer_gradient_sync(model):
                if hidden:  # gradients made during the forward: no logits, no logits' gradient
                    total, _, _ = self._chunk_sums(model, inputs, part, coef=weight, lse=lses[i])
                    self._backward(total * scale)
                else:
                    s, _ = self._chunk_sums(model, inputs, part)
                    self._backward((weight.to(s.dtype) * s).sum() * scale)
        set_rng_state(after)
        return loss, metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self._full_loss(model, inputs)
        self._store_metrics(metrics, "eval")
        return loss.detach(), None, None
