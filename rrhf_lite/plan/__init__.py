"""`rrhf-lite plan` and `validate --plan`: peak memory by part (memory_parts) from model shapes
(shapes), a recipe's memory plan on a card (recipe_memory), and the size of a recipe's job
(job_size)."""
