"""An example reward function for `scoring.reward_function: my_reward:reward`.

The contract (docs/recipes.md, "Your own reward function"):

    reward(prompts, responses) -> list[float]

- `prompts` and `responses` are lists of the same length (one batch of scoring.batch_size
  pairs, 8 by default; a prompt's k candidates may be split across batches).
- A prompt is a string or a list of chat messages [{"role": "user", "content": "..."}]. With
  a chat model (SmolLM2-Instruct has a chat template) the plain-text prompts of this example
  arrive as one-message chats, as the model was asked; prompt_text() reads both. A response
  is a string.
- Return one finite float per pair, in order; higher is better. Only the order of a prompt's
  candidates matters to RRHF's rank loss, so any scale works.
- An exception raised here stops the run with exit code 2 and your file and line;
  `rrhf-lite validate RECIPE` calls the function once, on the data's first prompt.

This one rewards a one-word answer that is not the word asked about (a synonym task). It
checks the form only, so RRHF learns exactly that: on a 2-core CPU (2026-12-02, seed 0) the
recipe's held-out reward rose from 0.12 to 0.85, with answers such as "Awesome!" for "hot".
What a reward does not check, the policy does not learn: add a word list to reward meaning.
"""

import re

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def prompt_text(prompt) -> str:
    """The user's last message, whether the prompt is text or chat messages."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def score(prompt, response: str) -> float:
    words = WORD.findall(response)
    if not words:
        return 0.0
    value = 1.0 / len(words)  # 1 for one word, less for every word more
    asked = re.search(r'"([^"]+)"', prompt_text(prompt))
    if asked and words[0].lower() == asked.group(1).lower():
        value *= 0.25  # repeating the word is not a synonym
    return value


def reward(prompts, responses):
    return [score(p, r) for p, r in zip(prompts, responses, strict=True)]
