"""Device filter language: parsing, error positions, canonical printing."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm import filters
from fwcm.filters import All, And, Compare, Exists, FilterError, In, Not, Or, parse, to_text

CLASS = "7c0e5b3e-9a31-5d2c-8f43-0a1b2c3d4e5f"


def test_empty_filter_selects_all() -> None:
    assert parse("") == All()
    assert parse("   \n") == All()
    assert parse(None) == All()
    assert to_text(All()) == ""


def test_example_from_docs() -> None:
    node = parse(f'class == "{CLASS}" and tag.region == "eu" and sequence < 8')
    assert node == And(
        (
            Compare("class", "==", CLASS),
            Compare("tag.region", "==", "eu"),
            Compare("sequence", "<", 8),
        )
    )


def test_precedence_and_binds_tighter_than_or() -> None:
    a, b, c = (Compare("name", "==", x) for x in "abc")
    assert parse('name == "a" or name == "b" and name == "c"') == Or((a, And((b, c))))
    assert parse('(name == "a" or name == "b") and name == "c"') == And((Or((a, b)), c))
    assert parse('not name == "a" and name == "b"') == And((Not(a), b))


def test_in_lists_exists_and_keywords_case_insensitive() -> None:
    assert parse('tag.site IN ["a", "b"]') == In("tag.site", ("a", "b"))
    assert parse("sequence not in [1, 2,3]") == In("sequence", (1, 2, 3), negated=True)
    assert parse("transport in []") == In("transport", ())
    assert parse("EXISTS tag.rack") == Exists("tag.rack")
    assert parse("sequence >= -1") == Compare("sequence", ">=", -1)


def test_strings_single_quotes_and_escapes() -> None:
    assert parse(r"name == 'it\'s'") == Compare("name", "==", "it's")
    assert parse(r'version == "a\"b\\c\n"') == Compare("version", "==", 'a"b\\c\n')


def test_uuid_fields_are_canonicalised() -> None:
    upper = CLASS.upper()
    assert parse(f'class == "{upper}"') == Compare("class", "==", CLASS)
    assert parse(f'vendor in ["{{{upper}}}"]') == In("vendor", (CLASS,))


def test_tag_with_integer_literal_compares_as_text() -> None:
    assert parse("tag.rack == 7") == Compare("tag.rack", "==", "7")


@pytest.mark.parametrize(
    ("text", "position", "needle"),
    [
        ("colour == 'red'", 0, "unknown field 'colour'"),
        ('name = "x"', 5, "use '=='"),
        ('name == "x', 8, "unterminated string"),
        ("sequence < '8'", 11, "sequence is an integer"),
        ("version == 3", 11, "version is text"),
        ('class == "not-a-uuid"', 9, "class must be a UUID"),
        ("tag.rack < 3", 11, "tag values are text"),
        ('name == "a" and', 15, "expected a field name, found end of filter"),
        ('name == "a" name == "b"', 12, "expected 'and', 'or' or end of filter"),
        ('(name == "a"', 12, "expected ')'"),
        ("name in ['a' 'b']", 13, "expected ',' or ']'"),
        ("name not == 'a'", 9, "expected 'in' after 'not'"),
        ("name", 4, "expected a comparison operator"),
        ("sequence == 99999999999999999999", 12, "out of range"),
        ("name == 'a' $", 12, "unexpected character '$'"),
        ("tag. == 'a'", 3, "unexpected character '.'"),
        (r"name == 'a\q'", 10, "unknown escape"),
        ("(" * 40 + "name == 'a'" + ")" * 40, 32, "nested deeper"),
    ],
)
def test_errors_name_problem_and_position(text: str, position: int, needle: str) -> None:
    with pytest.raises(FilterError) as info:
        parse(text)
    assert needle in str(info.value)
    assert info.value.position == position
    assert f"column {position + 1}" in str(info.value)


def test_overlong_filter_refused() -> None:
    with pytest.raises(FilterError, match="longer than"):
        parse("name == 'a' or " * 400 + "name == 'b'")


@settings(max_examples=500)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_filter_error(text: str) -> None:
    try:
        node = parse(text)
    except FilterError as exc:
        assert 0 <= exc.position <= len(text)
        return
    assert parse(to_text(node)) == node


_TOKENS = st.sampled_from(
    [
        "name",
        "sequence",
        "tag.a",
        "class",
        "==",
        "!=",
        "<",
        ">=",
        "and",
        "or",
        "not",
        "in",
        "exists",
        "(",
        ")",
        "[",
        "]",
        ",",
        '"x"',
        "'y'",
        "3",
        "-4",
        f'"{CLASS}"',
    ]
)


@settings(max_examples=500)
@given(st.lists(_TOKENS, max_size=15))
def test_token_soup_raises_only_filter_error(tokens: list[str]) -> None:
    text = " ".join(tokens)
    try:
        node = parse(text)
    except FilterError:
        return
    assert parse(to_text(node)) == node


# -- AST generation for the print/parse round trip ----------------------------------------------

_text_values = st.text(max_size=12)
_tag_fields = st.from_regex(filters.TAG_KEY_RE, fullmatch=True).map(lambda k: "tag." + k)


def _field_value(field: str, ordering: bool) -> st.SearchStrategy[filters.Literal]:
    if field == "sequence":
        return st.integers(min_value=filters.INT_MIN, max_value=filters.INT_MAX)
    if field in filters.UUID_FIELDS and not ordering:
        return st.uuids().map(str)
    if field == filters.VERSION_FIELD and ordering:  # orderings take a semantic version
        return st.tuples(st.integers(0, 10**6), st.integers(0, 99)).map(lambda v: f"{v[0]}.{v[1]}.0-rc.1")
    return _text_values


@st.composite
def _leaf(draw: st.DrawFn) -> filters.Node:
    field = draw(st.one_of(st.sampled_from(filters.FIELDS), _tag_fields))
    kind = draw(st.sampled_from(["cmp", "in", "exists"]))
    if kind == "exists":
        return Exists(field)
    if kind == "in":
        values = draw(st.lists(_field_value(field, False), max_size=4))
        return In(field, tuple(values), draw(st.booleans()))
    op = draw(st.sampled_from(filters.COMPARE_OPS))
    ordering = op not in ("==", "!=")
    if filters.is_tag(field) or field in filters.TEXT_FIELDS:
        return Compare(field, op, draw(_field_value(field, ordering)))
    return Compare(field, op, draw(_field_value(field, ordering)))


def _extend(children: st.SearchStrategy[filters.Node]) -> st.SearchStrategy[filters.Node]:
    # Parsing flattens a chain of ``and`` into one node, so a generated And never holds an
    # And directly (that would print with parentheses and still round-trip, see below).
    return st.one_of(
        children.map(Not),
        st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
        st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
    )


_asts = st.recursive(_leaf(), _extend, max_leaves=12)


def _depth(node: filters.Node) -> int:
    if isinstance(node, Not):
        return 1 + _depth(node.item)
    if isinstance(node, (And, Or)):
        return 1 + max(_depth(i) for i in node.items)
    return 0


@settings(max_examples=500)
@given(_asts)
def test_print_parse_round_trip(node: filters.Node) -> None:
    if _depth(node) >= filters.MAX_DEPTH // 2:
        return
    text = to_text(node)
    assert parse(text) == node
    assert filters.validate(text) == text


def test_round_trip_keeps_nested_and_or_grouping() -> None:
    a, b, c = (Compare("name", "==", x) for x in "abc")
    for node in [And((a, And((b, c)))), Or((a, Or((b, c)))), Not(And((a, b))), Not(Not(a))]:
        assert parse(to_text(node)) == node


def test_uuid_values_round_trip_canonical() -> None:
    u = uuid.uuid4()
    assert to_text(parse(f"vendor != '{str(u).upper()}'")) == f'vendor != "{u}"'
