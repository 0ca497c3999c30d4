"""Property tests: whatever a user feeds the loaders ends in success or a UserInputError with a
message, never another exception (which the CLI would report as an internal error, exit 1)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrhf_lite.config.recipe import Recipe, apply_overrides, load_recipe, parse_recipe
from rrhf_lite.data.listwise import load_listwise
from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import read_jsonl, read_jsonl_numbered, write_jsonl

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=_HEALTH)
# generating nested rows costs more than checking them: fewer examples keeps these few seconds
ROW_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=_HEALTH)

_json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["prompt", "query", "responses", "scores", "chosen", "rejected", "role",
                         "content", "x"])
_responses = st.lists(st.text(max_size=6) | st.builds(
    lambda c: {"role": "assistant", "content": c}, st.text(max_size=6)) | _json_scalars,
    max_size=4)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                            "content": st.text(max_size=6)}), max_size=3)
# rows close to the real formats, so the checks past "missing field" get exercised too
_rowish = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=8) | _messages | _json_scalars,
        "query": st.text(max_size=8),
        "responses": _responses | _json,
        "scores": st.lists(_json_scalars, max_size=4) | _json,
        "chosen": st.text(max_size=8) | _messages | _json_scalars,
        "rejected": st.text(max_size=8) | _messages | _json_scalars,
    },
) | st.dictionaries(_keys, _json, max_size=5)


def _user_error_has_message(err: UserInputError) -> None:
    assert str(err).strip()
    assert err.message.strip()


def _check_examples(examples) -> None:
    """What a successful load promises the trainer."""
    assert examples
    for ex in examples:
        assert isinstance(ex["prompt"], str | list)
        assert ex["responses"] and all(isinstance(r, str | dict) for r in ex["responses"])
        assert len(ex["scores"]) == len(ex["responses"])
        assert all(isinstance(s, float) and math.isfinite(s) for s in ex["scores"])


# ------------------------------------------------------------------------------ data loaders


@ROW_SETTINGS
@given(rows=st.lists(_rowish, max_size=4))
def test_load_listwise_rows_in_memory(rows):
    try:
        examples = load_listwise(rows)
    except UserInputError as err:
        _user_error_has_message(err)
    else:
        _check_examples(examples)


@ROW_SETTINGS
@given(rows=st.lists(_rowish, min_size=1, max_size=4))
def test_load_listwise_jsonl_roundtrip(tmp_path_factory, rows):
    """Rows written as JSON lines load the same as the rows themselves (or fail the same way)."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    write_jsonl(path, rows)
    assert json.dumps(read_jsonl(path)) == json.dumps(rows)  # text compare: NaN != NaN
    try:
        from_file = load_listwise(str(path))
    except UserInputError as err:
        _user_error_has_message(err)
        assert str(path) in str(err)
        with pytest.raises(UserInputError):
            load_listwise(json.loads(json.dumps(rows)))
    else:
        _check_examples(from_file)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_load_listwise_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("data") / "bytes.jsonl"
    path.write_bytes(data)
    try:
        examples = load_listwise(str(path))
    except UserInputError as err:
        _user_error_has_message(err)
        assert str(path) in str(err)
    else:
        _check_examples(examples)


@SETTINGS
@given(lines=st.lists(st.one_of(
    st.builds(json.dumps, _json), st.builds(json.dumps, _rowish), st.text(max_size=20),
    st.just(""), st.just("["), st.just("{}"), st.just("\ufeff{}"),
), max_size=6))
def test_read_jsonl_numbers_lines(tmp_path_factory, lines):
    """read_jsonl succeeds exactly on files of objects, and a failure names the bad line."""
    path = tmp_path_factory.mktemp("data") / "lines.jsonl"
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    try:
        rows = read_jsonl_numbered(path)
    except UserInputError as err:
        _user_error_has_message(err)
        assert err.where and err.where.startswith(f"{path} line ")
        number = int(err.where.rsplit(" ", 1)[1])
        bad = text.removeprefix("\ufeff").split("\n")[number - 1] if text else ""
        assert bad.strip()  # the named line is a real, non-blank line
    else:
        for number, row in rows:
            assert isinstance(row, dict)
            line = text.removeprefix("\ufeff").split("\n")[number - 1]
            assert json.dumps(json.loads(line)) == json.dumps(row)


def test_read_jsonl_keeps_unicode_line_separators(tmp_path):
    """U+2028 and friends are legal inside JSON strings; they are not line breaks."""
    rows = [{"prompt": "a\u2028b\x1cc\x85d", "responses": ["x\u2029"], "scores": [1.0]}]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    assert read_jsonl(path) == rows
    assert load_listwise(str(path))[0]["prompt"] == rows[0]["prompt"]


# ----------------------------------------------------------------------------- recipe loader

_section_names = st.sampled_from(list(Recipe.model_fields) + ["modle", "trian"])
_yaml_values = st.recursive(
    _json_scalars.filter(lambda v: not (isinstance(v, float) and math.isnan(v))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name_or_path", "max_steps", "learning_rate", "r", "lerning_rate",
                         "candidates", "given", "enabled", "x"]), inner, max_size=3),
    max_leaves=8,
)
_recipes = st.dictionaries(_section_names, _yaml_values, max_size=6)


@SETTINGS
@given(raw=_recipes)
def test_parse_recipe_any_mapping(raw):
    try:
        recipe = parse_recipe(raw, "r.yaml")
    except UserInputError as err:
        _user_error_has_message(err)
    else:
        assert isinstance(recipe, Recipe)


@SETTINGS
@given(raw=_recipes | _json)
def test_load_recipe_any_yaml_document(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    try:
        load_recipe(path)
    except UserInputError as err:
        _user_error_has_message(err)
        assert str(path) in str(err)


@SETTINGS
@given(text=st.text(max_size=200) | st.sampled_from([
    "!!python/object/apply:os.system ['true']", "a: &x [*x]", "a: !!binary AAAA", "---\n---\n",
    "? [a, b]\n: c", "model: {name_or_path: x}\n" + "a:\n " * 50, "{[}", "\t- x",
]))
def test_load_recipe_any_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except UserInputError as err:
        _user_error_has_message(err)


@SETTINGS
@given(raw=st.dictionaries(st.text(max_size=5), _yaml_values, max_size=3),
       overrides=st.lists(st.text(max_size=20), max_size=3))
def test_apply_overrides_any_input(raw, overrides):
    """--set KEY=VALUE on any recipe mapping (a non-mapping recipe: see test_bad_input)."""
    try:
        parse_recipe(apply_overrides(raw, overrides), "r.yaml")
    except UserInputError as err:
        _user_error_has_message(err)
