"""RRHF training: the objective (losses), the trainer and its config, per-candidate log-probs
(logprobs), prompt sharing (shared_prompt, segment_attention), logged metrics, the finite
guard, the RNG a step replays, and DPO pairs for the DPO ablation."""
