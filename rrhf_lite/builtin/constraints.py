"""A real task for a real model: follow instruction constraints, graded by code.

Each prompt asks for something about a topic ("Describe the ocean.") and adds one or two
constraints, each in a fixed sentence that the reward parses back from the prompt text:

    all_caps      Write your whole answer in capital letters.
    n_items       Answer with exactly N items, one per line, each starting with "- ".
    include_word  Use the word "W" in your answer.
    avoid_word    Do not use the word "W".
    max_words     Answer in at most N words.
    json_keys     Answer with a JSON object only, with exactly the keys "a" and "b".
    end_with      End your answer with the exact phrase "P".

The reward is the mean of the constraints' scores, each in [0, 1] with partial credit (a share
of the letters in capitals, items off by one, a word count a little over, JSON that parses but
has other keys, an object cut off before it closes, the phrase present but not at the end), so
candidates differ in reward and the rank loss has pairs to order. SmolLM2-135M-Instruct meets
some constraints often and others rarely.

Relevance: an answer that never names its prompt's topic gets half the constraint score
(`RELEVANCE_FLOOR`). Without it a short off-topic answer met "at most N words" or "do not use W"
in full, and one round of RRHF learned to be brief rather than to follow constraints
(docs/real-model.md, "What the reward rewards"). The topic is read back from the request sentence
("Describe whales."); a prompt in no known request form is not checked for relevance. "Names the
topic" is a word match with plurals folded and a part of four letters or more accepted ("forest"
for the rainforest, "garden" for gardening): a cheap check that an answer is about something, not a
judge of quality.

Splits: training prompts use TRAIN_TOPICS and every kind but HELD_OUT_KIND; held-out prompts use
HELD_OUT_TOPICS (never trained on) and every kind, HELD_OUT_KIND included (transfer to a kind of
constraint the policy never trained on). Prompts are chat messages; rows carry the kinds.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence

KINDS = ("all_caps", "n_items", "include_word", "avoid_word", "max_words", "json_keys",
         "end_with")
HELD_OUT_KIND = "end_with"
TRAIN_KINDS = tuple(k for k in KINDS if k != HELD_OUT_KIND)

TRAIN_TOPICS = (
    "the ocean", "coffee", "bicycles", "the moon", "gardening", "rainy days", "chess",
    "volcanoes", "bread", "trains", "winter", "honeybees", "music", "the desert", "libraries",
    "mountains", "soccer", "cats", "the internet", "rivers", "pizza", "clocks", "birds",
    "summer holidays",
)
HELD_OUT_TOPICS = (
    "dinosaurs", "the rainforest", "airplanes", "tea", "robots", "snow", "museums", "whales",
)
REQUESTS = (
    "Describe {topic}.", "Tell me about {topic}.", "Write a few sentences about {topic}.",
    "What do you like about {topic}?", "Give some facts about {topic}.",
    "Explain {topic} to a child.",
)
# An off-topic answer keeps this share of its constraint score.
RELEVANCE_FLOOR = 0.5
# Each request sentence read back: the topic is what fills {topic}.
_REQUEST_PATTERNS = tuple(
    re.compile("^" + re.escape(r).replace(re.escape("{topic}"), "(.+?)"), re.I) for r in REQUESTS)
_TOPIC_STOPWORDS = frozenset({"the", "a", "an", "of"})
WORDS = ("blue", "happy", "small", "light", "water", "friend", "old", "fast", "green", "time")
PHRASES = ("The end.", "That is all.", "Thank you!", "Have a nice day.")
JSON_KEYS = (("name", "color"), ("title", "year"), ("city", "size"), ("topic", "summary"))

# The sentence of each constraint; the reward parses these back from the prompt.
SENTENCES = {
    "all_caps": ("Write your whole answer in capital letters.",
                 re.compile(r"Write your whole answer in capital letters\.")),
    "n_items": ('Answer with exactly {n} items, one per line, each starting with "- ".',
                re.compile(r'Answer with exactly (\d+) items, one per line')),
    "include_word": ('Use the word "{word}" in your answer.',
                     re.compile(r'Use the word "([^"]+)" in your answer\.')),
    "avoid_word": ('Do not use the word "{word}".', re.compile(r'Do not use the word "([^"]+)"\.')),
    "max_words": ("Answer in at most {n} words.", re.compile(r"Answer in at most (\d+) words\.")),
    "json_keys": ('Answer with a JSON object only, with exactly the keys "{a}" and "{b}".',
                  re.compile(r'JSON object only, with exactly the keys "([^"]+)" and "([^"]+)"\.')),
    "end_with": ('End your answer with the exact phrase "{phrase}"',
                 re.compile(r'End your answer with the exact phrase "([^"]+)"')),
}
# Pairs that contradict or cannot be graded together are never drawn.
CONFLICTS = {frozenset(p) for p in (("json_keys", "n_items"), ("json_keys", "all_caps"),
                                    ("json_keys", "end_with"), ("json_keys", "include_word"),
                                    ("include_word", "avoid_word"), ("n_items", "max_words"))}


def instruction(kind: str, rng: random.Random) -> str:
    template = SENTENCES[kind][0]
    if kind == "n_items":
        return template.format(n=rng.choice((2, 3, 4, 5)))
    if kind in ("include_word", "avoid_word"):
        return template.format(word=rng.choice(WORDS))
    if kind == "max_words":
        return template.format(n=rng.choice((5, 8, 10, 15)))
    if kind == "json_keys":
        a, b = rng.choice(JSON_KEYS)
        return template.format(a=a, b=b)
    if kind == "end_with":
        return template.format(phrase=rng.choice(PHRASES)) + "."
    return template


def make_prompt(topic: str, kinds: Sequence[str], rng: random.Random) -> str:
    request = rng.choice(REQUESTS).format(topic=topic)
    request = request[0].upper() + request[1:]
    return " ".join([request, *(instruction(k, rng) for k in kinds)])


def _draw_kinds(pool: Sequence[str], rng: random.Random, required: str | None = None) -> list[str]:
    first = required or rng.choice(pool)
    if rng.random() < 0.5:
        return [first]
    others = [k for k in pool if k != first and frozenset((first, k)) not in CONFLICTS]
    return [first, rng.choice(others)] if others else [first]


def make_rows(n: int, *, seed: int, held_out: bool) -> list[dict]:
    """`n` distinct prompt rows {"prompt": [user message], "kinds": [...], "topic"}.

    Training rows: TRAIN_TOPICS, TRAIN_KINDS. Held-out rows: HELD_OUT_TOPICS, every kind, one in
    four with HELD_OUT_KIND first.
    """
    rng = random.Random(f"constraints-{seed}-{'eval' if held_out else 'train'}")
    topics = HELD_OUT_TOPICS if held_out else TRAIN_TOPICS
    pool = KINDS if held_out else TRAIN_KINDS
    rows, seen = [], set()
    for _attempt in range(50 * n + 100):
        if len(rows) == n:
            break
        required = HELD_OUT_KIND if held_out and len(rows) % 4 == 3 else None
        kinds = _draw_kinds(pool, rng, required)
        topic = rng.choice(topics)
        text = make_prompt(topic, kinds, rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": [{"role": "user", "content": text}], "kinds": kinds,
                     "topic": topic})
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct prompts could be drawn, asked for {n}")
    return rows


# --- the reward -------------------------------------------------------------------------------

def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def parse_constraints(prompt) -> list[tuple[str, tuple]]:
    """The constraints a prompt states, as (kind, arguments), in the order of SENTENCES."""
    text = _prompt_text(prompt)
    found = []
    for kind, (_template, pattern) in SENTENCES.items():
        match = pattern.search(text)
        if match:
            found.append((kind, match.groups()))
    return found


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _json_object(text: str):
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        value = json.loads(body)
    except ValueError:
        return None, False
    return value, True


def _unfinished_object(text: str, keys: tuple) -> float:
    """Credit for an answer that opens a JSON object but does not parse (the token limit often
    cuts it off): 0.1 for the opening brace, up to 0.1 more for the wanted keys written as
    "key": ; always below a finished object's 0.25, and 0 for anything else."""
    body = re.sub(r"^```(?:json)?\s*", "", text)
    if not body.startswith("{"):
        return 0.0
    written = sum(bool(re.search(rf'"{re.escape(key)}"\s*:', body)) for key in keys)
    return 0.1 + 0.1 * written / len(keys)


def check(kind: str, args: tuple, response: str) -> float:
    """Score in [0, 1] of one constraint on one response (partial credit, see the module doc)."""
    text = response.strip()
    if kind == "all_caps":
        letters = [c for c in text if c.isalpha()]
        return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
    if kind == "n_items":
        n = int(args[0])
        items = [line for line in text.splitlines() if re.match(r"\s*[-*]\s+\S", line)]
        return max(0.0, 1.0 - abs(len(items) - n) / n)
    if kind == "include_word":
        return 1.0 if re.search(rf"\b{re.escape(args[0])}\b", text, re.I) else 0.0
    if kind == "avoid_word":
        return 0.0 if re.search(rf"\b{re.escape(args[0])}\b", text, re.I) else 1.0
    if kind == "max_words":
        n, count = int(args[0]), len(_words(text))
        if count == 0:
            return 0.0
        return 1.0 if count <= n else n / count
    if kind == "json_keys":
        value, parsed = _json_object(text)
        if not parsed:
            return _unfinished_object(text, args)
        if not isinstance(value, dict):
            return 0.25
        wanted = set(args)
        return 0.25 + 0.75 * len(wanted & set(value)) / len(wanted | set(value))
    if kind == "end_with":
        phrase = args[0]
        if text.endswith(phrase) or text.endswith(phrase.rstrip(".!")):
            return 1.0
        return 0.5 if phrase.lower().rstrip(".!") in text.lower() else 0.0
    raise ValueError(f"unknown constraint kind {kind!r}")


def parse_topic(prompt) -> str | None:
    """The topic of a prompt's request sentence ("Describe the ocean. ..." -> "the ocean"), or None."""
    text = _prompt_text(prompt).strip()
    for pattern in _REQUEST_PATTERNS:
        match = pattern.match(text)
        if match:
            return match.group(1)
    return None


def _singular(word: str) -> str:
    word = word.lower()
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("oes"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _names(word: str, keyword: str) -> bool:
    """Whether an answer's word names a topic keyword (both singular): equal, or a part of four
    letters or more at either end of it ("forest"/"rainforest" and "garden"/"gardening" count,
    "cat"/"category" does not)."""
    if word == keyword:
        return True
    return len(word) >= 4 and (keyword.endswith(word) or keyword.startswith(word)) or (
        len(keyword) >= 4 and word.startswith(keyword))


def on_topic(topic: str, response: str) -> bool:
    """Whether the response names any content word of the topic."""
    keywords = [_singular(w) for w in _words(topic) if w.lower() not in _TOPIC_STOPWORDS]
    words = {_singular(w) for w in _words(response)}
    return any(_names(word, keyword) for keyword in keywords for word in words)


def relevance(prompt, response: str) -> float:
    """1 for an answer that names its prompt's topic (or a prompt with no known topic),
    RELEVANCE_FLOOR for one that does not."""
    topic = parse_topic(prompt)
    if topic is None or on_topic(topic, response):
        return 1.0
    return RELEVANCE_FLOOR


def score(prompt, response: str) -> float:
    """Mean constraint score, times the relevance factor."""
    constraints = parse_constraints(prompt)
    if not constraints:
        return 0.0
    met = sum(check(kind, args, response) for kind, args in constraints) / len(constraints)
    return met * relevance(prompt, response)


def reward(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """The recipe's reward function: each (prompt, response)'s mean constraint score in [0, 1],
    halved when the answer does not name the prompt's topic."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [score(p, r) for p, r in zip(prompts, responses, strict=True)]


def success_by_kind(prompts: Sequence, responses: Sequence[str]) -> dict[str, float]:
    """Share of constraints of each kind met in full (score 1), over all prompts that state one,
    and under "on_topic" the share of answers that name their prompt's topic."""
    met: dict[str, list[float]] = {}
    for prompt, response in zip(prompts, responses, strict=True):
        for kind, args in parse_constraints(prompt):
            met.setdefault(kind, []).append(float(check(kind, args, response) == 1.0))
        topic = parse_topic(prompt)
        if topic is not None:
            met.setdefault("on_topic", []).append(float(on_topic(topic, response)))
    return {kind: sum(v) / len(v) for kind, v in sorted(met.items())}
