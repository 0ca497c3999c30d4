"""`builtin:general`: everyday questions unrelated to any training task, for one measure that a
policy's general ability did not collapse.

Evaluation (recipe key evaluate.general_prompts) lets the initial model answer them greedily,
then reads the mean per-token log-likelihood of those answers under every variant. A variant
that kept what the initial model could do stays close to the initial value; one that collapsed
onto its training task (always capitals, always lists, always JSON) drops far below it.
"""

from __future__ import annotations

QUESTIONS = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "Why is the sky blue?",
    "What is photosynthesis?",
    "Name three primary colors.",
    "How do I boil an egg?",
    "What does a thermometer measure?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Explain what a verb is.",
    "What is the boiling point of water in Celsius?",
    "Give me a tip for sleeping better.",
    "What language is spoken in Brazil?",
    "What is the opposite of cold?",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a pet goldfish.",
    "What is the main ingredient of guacamole?",
    "Why do leaves change color in autumn?",
    "What is a prime number?",
    "How can I say thank you in Spanish?",
    "What is the tallest mountain on Earth?",
    "Write one sentence about friendship.",
)


def general_rows(limit: int | None = None) -> list[dict]:
    """Rows {"prompt": [user message]} of the first `limit` questions (all when None)."""
    if limit is not None and limit > len(QUESTIONS):
        raise ValueError(f"builtin:general has {len(QUESTIONS)} questions, asked for {limit}")
    chosen = QUESTIONS if limit is None else QUESTIONS[:limit]
    return [{"prompt": [{"role": "user", "content": q}]} for q in chosen]
