"""The constraints task: prompt sets and the graded reward (pure Python, no model)."""

from __future__ import annotations

import pytest

from rrhf_lite.builtin import constraints as tc
from rrhf_lite.builtin.sources import load_prompt_rows


def msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_every_kind_is_parsed_back_from_its_own_sentence():
    import random

    rng = random.Random(0)
    for kind in tc.KINDS:
        prompt = tc.make_prompt("the ocean", [kind], rng)
        assert [k for k, _ in tc.parse_constraints(msg(prompt))] == [kind], prompt


@pytest.mark.parametrize("kind,args,response,expected", [
    ("all_caps", (), "THE OCEAN IS BIG.", 1.0),
    ("all_caps", (), "THE OCEAN is", 0.8),
    ("all_caps", (), "", 0.0),
    ("n_items", ("3",), "- a\n- b\n- c", 1.0),
    ("n_items", ("3",), "Here:\n- a\n- b", pytest.approx(2 / 3)),
    ("n_items", ("2",), "no list at all", 0.0),
    ("include_word", ("blue",), "The sky is Blue today.", 1.0),
    ("include_word", ("blue",), "Bluer skies.", 0.0),
    ("avoid_word", ("blue",), "The sky is grey.", 1.0),
    ("avoid_word", ("blue",), "blue sky", 0.0),
    ("max_words", ("5",), "one two three", 1.0),
    ("max_words", ("5",), "one two three four five six seven eight nine ten", 0.5),
    ("json_keys", ("name", "color"), '{"name": "sea", "color": "blue"}', 1.0),
    ("json_keys", ("name", "color"), '```json\n{"name": "sea", "color": "blue"}\n```', 1.0),
    ("json_keys", ("name", "color"), '{"name": "sea"}', 0.25 + 0.75 / 2),
    ("json_keys", ("name", "color"), "[1, 2]", 0.25),
    ("json_keys", ("name", "color"), "name: sea", 0.0),
    ("json_keys", ("name", "color"), 'Sure! {"name": "sea", "color": "blue"}', 0.0),
    ("json_keys", ("name", "color"), '{\n  "name": "sea",\n  "color": "bl', pytest.approx(0.2)),
    ("json_keys", ("name", "color"), '```json\n{"name": "the sea is', pytest.approx(0.15)),
    ("json_keys", ("name", "color"), '{"title": "x", "ye', pytest.approx(0.1)),
    ("end_with", ("The end.",), "A story. The end.", 1.0),
    ("end_with", ("The end.",), "The end. And more.", 0.5),
    ("end_with", ("The end.",), "Nothing", 0.0),
])
def test_check_grades_each_kind(kind, args, response, expected):
    assert tc.check(kind, args, response) == expected


def test_reward_is_the_mean_of_the_constraints_and_reads_strings_or_messages():
    prompt = ('Describe cats. Write your whole answer in capital letters. '
              'Use the word "happy" in your answer.')
    assert tc.reward([prompt, msg(prompt)], ["CATS ARE HAPPY.", "cats are happy."]) == [1.0, 0.5]
    assert tc.reward(["Describe cats."], ["anything"]) == [0.0]  # no constraint: nothing met
    with pytest.raises(ValueError):
        tc.reward([prompt], [])


def test_success_by_kind_counts_only_full_marks():
    prompts = [msg('Describe cats. Answer in at most 5 words.'),
               msg('Describe dogs. Answer in at most 5 words.')]
    assert tc.success_by_kind(prompts, ["Cats purr.", "one two three four five six"]) == {
        "max_words": 0.5, "on_topic": 0.5}


def test_splits_are_disjoint_with_unseen_topics_and_one_unseen_kind():
    train = tc.make_rows(200, seed=0, held_out=False)
    held = tc.make_rows(80, seed=0, held_out=True)
    train_texts = {r["prompt"][0]["content"] for r in train}
    held_texts = {r["prompt"][0]["content"] for r in held}
    assert len(train_texts) == 200 and len(held_texts) == 80 and not train_texts & held_texts
    assert {r["topic"] for r in train} <= set(tc.TRAIN_TOPICS)
    assert {r["topic"] for r in held} <= set(tc.HELD_OUT_TOPICS)
    assert not set(tc.TRAIN_TOPICS) & set(tc.HELD_OUT_TOPICS)
    train_kinds = {k for r in train for k in r["kinds"]}
    held_kinds = {k for r in held for k in r["kinds"]}
    assert tc.HELD_OUT_KIND not in train_kinds and train_kinds == set(tc.TRAIN_KINDS)
    assert tc.HELD_OUT_KIND in held_kinds
    # The kinds a row says it has are the ones the reward parses from its text.
    for row in train + held:
        assert sorted(k for k, _ in tc.parse_constraints(row["prompt"])) == sorted(row["kinds"])
        assert not any(frozenset(row["kinds"]) == c for c in tc.CONFLICTS)


def test_rows_are_reproducible_and_served_as_builtin_prompts():
    assert tc.make_rows(10, seed=3, held_out=False) == tc.make_rows(10, seed=3, held_out=False)
    assert tc.make_rows(10, seed=3, held_out=False) != tc.make_rows(10, seed=4, held_out=False)
    rows = load_prompt_rows("builtin:constraints/eval", split="test", limit=12, seed=1, key="k")
    assert rows == tc.make_rows(12, seed=1, held_out=True)


def test_topic_is_read_back_from_every_request_form():
    for topic in tc.TRAIN_TOPICS + tc.HELD_OUT_TOPICS:
        for request in tc.REQUESTS:
            text = request.format(topic=topic)
            text = text[0].upper() + text[1:] + " Answer in at most 5 words."
            assert tc.parse_topic(msg(text)) == topic
    assert tc.parse_topic("Summarise this article. Answer in at most 5 words.") is None


@pytest.mark.parametrize("topic,response,expected", [
    ("whales", "Whales are blue.", True),
    ("whales", "I'm a helpful AI user, trained by Hugging Slim.", False),
    ("the rainforest", "The forest is green.", True),
    ("gardening", "I love my garden.", True),
    ("volcanoes", "A volcano erupts.", True),
    ("libraries", "My library is quiet.", True),
    ("rainy days", "One day it rained.", True),
    ("cats", "A category of things.", False),
    ("tea", "Teach me.", False),
    ("the ocean", "", False),
])
def test_on_topic_folds_plurals_and_accepts_parts_of_four_letters(topic, response, expected):
    assert tc.on_topic(topic, response) is expected


def test_an_off_topic_answer_keeps_only_the_relevance_floor_of_its_score():
    prompt = msg('Tell me about whales. Do not use the word "fast".')
    on, off = tc.reward([prompt, prompt], ["Whales sing.", "I'm a helpful AI assistant."])
    assert on == 1.0 and off == tc.RELEVANCE_FLOOR
    # A prompt in no known request form is graded on its constraints alone.
    assert tc.reward(['Summarise this. Do not use the word "fast".'], ["Fine."]) == [1.0]
    # The floor scales partial credit too, and never lifts a zero.
    half = msg("Describe snow. Answer in at most 5 words.")
    ten = "one two three four five six seven eight nine ten"
    assert tc.reward([half, half], [ten, "snow " + ten]) == [
        pytest.approx(0.5 * tc.RELEVANCE_FLOOR), pytest.approx(5 / 11)]
    assert tc.reward([msg('Describe snow. Use the word "blue" in your answer.')], ["No."]) == [0.0]


def test_success_by_kind_reports_the_on_topic_share():
    prompts = [msg("Describe cats. Answer in at most 5 words."),
               msg("Describe dogs. Answer in at most 5 words.")]
    assert tc.success_by_kind(prompts, ["Cats purr.", "Woof."])["on_topic"] == 0.5
