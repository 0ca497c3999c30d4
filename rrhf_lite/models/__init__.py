"""Loading models: for training (training_loader: 4-bit base + LoRA, trainable), for sampling,
scoring and evaluation (inference_loader), which CPU path each 4-bit layer takes (cpu_4bit),
and reward models (reward_checkpoint, reward_reading)."""
