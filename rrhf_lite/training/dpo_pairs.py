"""DPO on RRHF's data: each prompt's best-vs-worst pair of its scored candidates, in the tokens
RRHF training sees, trained by TRL's DPOTrainer.

Why pairs are tokenised here and not by TRL: TRL renders chosen/rejected text itself (its chat
template call, its EOS rule, a prompt cut where two tokenisations diverge), so a BPE tokenizer
or a chat template can give it other tokens than `rrhf_lite.data.tokenization` gives RRHF. Here both
methods train on the same ids: the prompt from `tokenize_prompt`, each response from
`tokenize_example` (EOS exactly once, same truncation), and `DPOTrainer` receives them already
tokenised ({"prompt_ids", "chosen_ids", "rejected_ids"}, the columns its collator reads).

trl is imported inside the functions that need it (it adds seconds to every CLI start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from rrhf_lite.data.tokenization import TokenizeStats, tokenize_listwise

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def best_worst_pairs(examples: Iterable[dict]) -> tuple[list[dict], int]:
    """Listwise rows -> (one pair per prompt, number of prompts skipped).

    Each row {"prompt", "responses", "scores"} (any k) gives {"prompt", "responses": [best,
    worst], "scores": [its best, its worst]}: best = the first response with the highest score,
    worst = the first with the lowest. A prompt whose scores all tie (k = 1 included) holds no
    preference and is skipped.
    """
    pairs, skipped = [], 0
    for row in examples:
        scores = [float(s) for s in row["scores"]]
        high, low = max(scores), min(scores)
        if high == low:
            skipped += 1
            continue
        best, worst = scores.index(high), scores.index(low)
        pairs.append({"prompt": row["prompt"],
                      "responses": [row["responses"][best], row["responses"][worst]],
                      "scores": [high, low]})
    return pairs, skipped


def tokenize_pairs(pairs: list[dict], tokenizer, *, max_length: int | None,
                   max_prompt_length: int | None, truncation_side: str = "left",
                   ) -> tuple[list[dict], TokenizeStats]:
    """Pairs from best_worst_pairs -> DPOTrainer's tokenised rows, exactly RRHF's tokens:
    prompt_ids as RRHF's prompt, chosen_ids / rejected_ids as RRHF's response ids of those two
    candidates (rows whose prompt leaves no room for a response are dropped, as RRHF drops them)."""
    features, stats = tokenize_listwise(pairs, tokenizer, max_length=max_length,
                                        max_prompt_length=max_prompt_length,
                                        truncation_side=truncation_side)
    rows = [{"prompt_ids": f["prompt_ids"], "chosen_ids": f["responses_ids"][0],
             "rejected_ids": f["responses_ids"][1]} for f in features]
    return rows, stats


def pretokenized_dpo_trainer():
    """The DPOTrainer class that trains on already tokenised pairs (imports trl)."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, fed the pairs of `tokenize_pairs` as they are.

        Two departures from TRL's defaults, both so that DPO trains what RRHF trains:
        - the data set is not re-tokenised (`_prepare_dataset` checks the columns and keeps the
          rows: no chat template applied twice, no EOS added or text re-split);
        - the LoRA weights stay in the dtype PEFT made them (float32): TRL casts a 4-bit
          model's adapter to bfloat16, where updates below bf16's resolution are lost, and RRHF
          trains the adapter in float32.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name, param in self.model.named_parameters():
                if "lora_" in name and param.requires_grad and param.dtype == torch.bfloat16:
                    param.data = param.data.float()

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
            if missing:
                raise ValueError(f"the {dataset_name} pairs lack {missing}: build them with "
                                 "rrhf_lite.training.dpo_pairs.tokenize_pairs")
            return dataset

    return PretokenizedDPOTrainer
