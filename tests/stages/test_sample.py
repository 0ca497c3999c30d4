"""The sample stage: prompt loading, every generation method, dataset answers, dedupe, seeds."""

from __future__ import annotations

import json

import pytest

from rrhf_lite.data.prompts import load_prompts
from rrhf_lite.errors import UserInputError
from rrhf_lite.generation.diverse_beam import diverse_beam_search
from rrhf_lite.models.inference_loader import encode_prompts, load_causal_lm
from rrhf_lite.stages.sample import sample_candidates
from rrhf_lite.utils.io import read_jsonl

PROMPTS = [
    {"prompt": "copy abc=", "chosen": "abc", "rejected": "abd"},
    {"query": "add 12+7="},
    {"prompt": "sort 3142=", "responses": ["1234", "4321"]},
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir), device="cpu")


def test_load_prompts_jsonl_json_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"query": "b", "chosen": "x"}\n{"text": "c"}\n')
    with pytest.raises(UserInputError) as err:
        load_prompts(path)
    assert f"{path} line 4" in str(err.value) and "prompt" in str(err.value)
    records = load_prompts(path, limit=2)
    assert [r["prompt"] for r in records] == ["a", "b"] and records[1]["chosen"] == "x"

    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": ""}]))
    with pytest.raises(UserInputError, match="item 2"):
        load_prompts(as_json)
    with pytest.raises(UserInputError, match="file not found"):
        load_prompts(tmp_path / "missing.jsonl")
    assert load_prompts(["plain string"])[0]["prompt"] == "plain string"


def test_load_prompts_parquet(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "x=", "chosen": "1"}, {"prompt": "y=", "chosen": "2"}]
                               ).to_parquet(str(path))
    assert [r["prompt"] for r in load_prompts(path)] == ["x=", "y="]


def test_all_methods_dataset_answers_and_output_file(tiny_lm_dir, tmp_path):
    generators = [
        {"model": str(tiny_lm_dir), "name": "pol", "method": "diverse_beam", "num_candidates": 4,
         "num_beam_groups": 2, "diversity_penalty": 2.0},
        {"model": str(tiny_lm_dir), "name": "pol", "method": "top_p", "num_candidates": 3,
         "temperature": 1.0, "top_p": 0.9},
        {"model": str(tiny_lm_dir), "name": "pol", "method": "beam", "num_candidates": 2},
        {"model": str(tiny_lm_dir), "name": "pol", "method": "greedy", "num_candidates": 1},
    ]
    out = tmp_path / "cands.jsonl"
    rows = sample_candidates(PROMPTS, generators=generators, max_new_tokens=5, batch_size=2,
                             output_path=out, progress=False)
    assert read_jsonl(out) == rows
    assert [r["prompt"] for r in rows] == ["copy abc=", "add 12+7=", "sort 3142="]
    expected_answers = [["abc", "abd"], [], ["1234", "4321"]]
    for row, answers in zip(rows, expected_answers, strict=True):
        k = len(row["responses"])
        assert len(row["sources"]) == k == len(row["counts"])
        assert len(set(row["responses"])) == k  # deduplicated
        assert all(r.strip() for r in row["responses"])
        # 4 + 3 + 2 + 1 generated, plus the data set's answers, before dedupe
        assert sum(row["counts"]) == 10 + len(answers)
        generated = [s for s in row["sources"] if not s.startswith("dataset:")]
        assert set(generated) <= {"pol:diverse_beam", "pol:top_p", "pol:beam", "pol:greedy"}
        assert "pol:diverse_beam" in generated and "pol:top_p" in generated
        dataset = [r for r, s in zip(row["responses"], row["sources"], strict=True)
                   if s.startswith("dataset:")]
        assert dataset == answers
    assert rows[0]["sources"][-2:] == ["dataset:chosen", "dataset:rejected"]
    assert rows[2]["sources"][-2:] == ["dataset:responses", "dataset:responses"]


def test_diverse_beam_candidates_are_the_searchs_output(tiny_lm):
    model, tokenizer = tiny_lm
    spec = {"model": "policy", "method": "diverse_beam", "num_candidates": 4,
            "num_beam_groups": 2, "diversity_penalty": 1.5}
    rows = sample_candidates([{"prompt": "reverse kqz="}], generators=[spec], max_new_tokens=6,
                             include_dataset_responses=False, models={"policy": tiny_lm},
                             progress=False)
    batch = encode_prompts(tokenizer, ["reverse kqz="])
    hyps = diverse_beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=4,
                               num_beam_groups=2, diversity_penalty=1.5, max_new_tokens=6,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)[0]
    texts = [tokenizer.decode(h.tokens, skip_special_tokens=True) for h in hyps]
    kept = []
    for text in texts:
        if text.strip() and text not in kept:
            kept.append(text)
    assert rows[0]["responses"] == kept
    assert rows[0]["sources"] == ["policy:diverse_beam"] * len(kept)


def test_seeded_and_reproducible(tiny_lm):
    spec = {"model": "policy", "method": "top_p", "num_candidates": 4, "temperature": 1.0}
    prompts = [{"prompt": "copy xyz="}, {"prompt": "count a abca="}]

    def run(seed):
        return sample_candidates(prompts, generators=[spec], max_new_tokens=8, seed=seed,
                                 models={"policy": tiny_lm}, progress=False)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_dedupe_counts_and_left_truncation(tiny_lm):
    rows = sample_candidates([{"prompt": "copy q=", "chosen": "same", "rejected": "same",
                               "responses": ["  ", "other"]}],
                             generators=[], progress=False)
    assert rows[0]["responses"] == ["same", "other"]
    assert rows[0]["counts"] == [2, 1]
    assert rows[0]["sources"] == ["dataset:chosen", "dataset:responses"]

    greedy = {"model": "policy", "method": "greedy"}
    cut = sample_candidates([{"prompt": "hello world"}], generators=[greedy], max_prompt_length=3,
                            max_new_tokens=6, include_dataset_responses=False,
                            models={"policy": tiny_lm}, progress=False)
    tail = sample_candidates([{"prompt": "rld"}], generators=[greedy], max_new_tokens=6,
                             include_dataset_responses=False, models={"policy": tiny_lm},
                             progress=False)
    full = sample_candidates([{"prompt": "hello world"}], generators=[greedy], max_new_tokens=6,
                             include_dataset_responses=False, models={"policy": tiny_lm},
                             progress=False)
    assert cut[0]["responses"] == tail[0]["responses"]
    assert cut[0]["responses"] != full[0]["responses"]


def test_chat_prompts(tiny_chat_lm_dir, tiny_lm):
    messages = [{"role": "user", "content": "copy ab="}]
    rows = sample_candidates([{"prompt": messages}],
                             generators=[{"model": str(tiny_chat_lm_dir), "method": "beam",
                                          "num_candidates": 2}],
                             max_new_tokens=4, include_dataset_responses=False, progress=False)
    assert rows[0]["prompt"] == messages and 1 <= len(rows[0]["responses"]) <= 2
    with pytest.raises(UserInputError, match="chat template"):
        sample_candidates([{"prompt": messages}], generators=[{"model": "policy"}],
                          models={"policy": tiny_lm}, progress=False)


def test_bad_generator_specs(tiny_lm):
    prompts = [{"prompt": "a="}]
    with pytest.raises(UserInputError, match=r"generators\[0\].*unknown key"):
        sample_candidates(prompts, generators=[{"model": "policy", "beams": 4}], progress=False)
    with pytest.raises(UserInputError, match=r"generators\[1\]\.num_beam_groups"):
        sample_candidates(prompts, generators=[{"model": "policy"},
                                               {"model": "policy", "num_candidates": 4,
                                                "num_beam_groups": 3}], progress=False)
    with pytest.raises(UserInputError, match="method"):
        sample_candidates(prompts, generators=[{"model": "policy", "method": "nucleus"}],
                          progress=False)
    with pytest.raises(UserInputError, match="not found"):
        sample_candidates(prompts, generators=[{"model": "./no/such/model/dir"}], progress=False)


def test_prompts_left_without_a_candidate_are_counted_once_and_in_the_k_line(caplog):
    from rrhf_lite.data.candidate_stats import describe, k_stats

    prompts = [{"prompt": p, "chosen": " ", "rejected": ""} for p in "abc"]  # all empty
    prompts.append({"prompt": "d", "chosen": "yes", "rejected": "no"})
    with caplog.at_level("WARNING", logger="rrhf_lite.stages.sample"):
        rows = sample_candidates(prompts, generators=[], progress=False)
    assert len(rows) == 1
    warned = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("3 of 4 prompts skipped"), warned
    line = describe(k_stats(rows, planned=2, dropped=len(prompts) - len(rows)))
    assert line.startswith("k < 2 on 3 of 4 prompts (75.0 %); mean k 0.50, min 0")
    assert line.endswith("3 prompts dropped, every candidate empty")


def test_how_often_k_falls_below_the_plan_is_counted(caplog):
    from types import SimpleNamespace

    from rrhf_lite.data.candidate_stats import describe, k_stats, planned_k

    prompts = [{"prompt": "a", "chosen": "same", "rejected": "same"},  # a duplicate: k 1 of 2
               {"prompt": "b", "chosen": "yes", "rejected": "no"},
               {"prompt": "c", "chosen": "x", "rejected": " "}]  # an empty answer: k 1 of 2
    with caplog.at_level("INFO", logger="rrhf_lite.stages.sample"):
        rows = sample_candidates(prompts, generators=[], progress=False)
    assert "2 prompts have fewer candidates than planned" in caplog.text
    stats = k_stats(rows, planned=2)
    assert stats == {"prompts": 3, "planned_k": 2, "mean_k": pytest.approx(4 / 3), "min_k": 1,
                     "rows_below_planned": 2, "fraction_below_planned": pytest.approx(2 / 3),
                     "duplicates_removed": 1, "prompts_dropped": 0}
    assert describe(stats).startswith("k < 2 on 2 of 3 prompts (66.7 %); mean k 1.33, min 1")
    # without a plan, each row's own count before de-duplication is the bar
    assert k_stats(rows)["rows_below_planned"] == 1
    beams = SimpleNamespace(method="diverse_beam", num_candidates=4)
    greedy = SimpleNamespace(method="greedy", num_candidates=4)
    section = SimpleNamespace(generators=[beams, greedy], include_dataset_responses=True)
    assert planned_k(section) == 4 + 1 + 2
