"""What a `builtin:` name resolves to (sources): the tiny world (tiny/), the real offline
SmolLM2 model (smollm2), the constraints task (constraints) and everyday questions
(general_questions)."""
