"""Semantic version keys: comparing keys as bytes orders versions as Semantic Versioning does."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from packaging.version import Version

from fwcm import filters
from fwcm.versions import KEY_CHARS, MAX_VERSION_CHARS, version_key

_numbers = st.integers(0, 10**12)
_ident = st.one_of(
    st.integers(0, 10**6).map(str),
    st.text("abcxyzABZ-019", min_size=1, max_size=6).filter(lambda s: not s.isdigit()),
)


@st.composite
def semvers(draw: st.DrawFn) -> str:
    core = ".".join(str(draw(_numbers)) for _ in range(3))
    pre = draw(st.lists(_ident, max_size=4))
    build = draw(st.sampled_from(["", "+build.7", "+0a"]))
    return core + ("-" + ".".join(pre) if pre else "") + build


def precedence(text: str) -> tuple[Any, ...]:
    """Semver 2.0.0 §11 as a Python tuple, written apart from the key encoding."""
    text = text.split("+", 1)[0]
    core, _, pre = text.partition("-")
    numbers = tuple(int(n) for n in core.split("."))
    if not pre:
        return (*numbers, (1,))
    ids = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in pre.split("."))
    return (*numbers, (0, ids))


def _key(v: str) -> str:
    key = version_key(v)
    assert key is not None, v
    return key


_keyable = semvers().filter(lambda v: len(v) <= MAX_VERSION_CHARS)  # longer ones have no key, by design


@given(_keyable, _keyable)
def test_key_order_is_semver_precedence(a: str, b: str) -> None:
    ka, kb = _key(a), _key(b)
    assert (ka < kb) == (precedence(a) < precedence(b))
    assert (ka == kb) == (precedence(a) == precedence(b))


@given(
    st.lists(st.integers(0, 10**9), min_size=1, max_size=3),
    st.lists(st.integers(0, 10**9), min_size=1, max_size=3),
)
def test_release_order_agrees_with_packaging(a: list[int], b: list[int]) -> None:
    va, vb = ".".join(map(str, a)), ".".join(map(str, b))
    assert (_key(va) < _key(vb)) == (Version(va) < Version(vb))
    assert (_key(va) == _key(vb)) == (Version(va) == Version(vb))


def test_semver_spec_example_chain() -> None:
    chain = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.4",
        "1.0.10",
        "v2.0",
        "10.0.0",
    ]
    keys = [_key(v) for v in chain]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@pytest.mark.parametrize("text", ["", "1.0.0.0", "01.2.3", "1.2.3-", "1.2.3-a..b", "abc", "1.2.3-é", "1.x"])
def test_non_versions_have_no_key(text: str) -> None:
    assert version_key(text) is None


@given(st.text(st.sampled_from("0123456789.-+abAZ"), max_size=MAX_VERSION_CHARS))
def test_any_key_fits_its_column(text: str) -> None:
    key = version_key(text)
    assert key is None or len(key) <= KEY_CHARS


def test_worst_case_key_fits_its_column() -> None:
    longest = "1.1.1-" + ".".join(["1"] * ((MAX_VERSION_CHARS - 5) // 2))
    assert len(longest) <= MAX_VERSION_CHARS and len(_key(longest)) <= KEY_CHARS


def test_filter_orders_versions_only_against_a_version() -> None:
    assert filters.parse('version >= "1.0.10"') == filters.Compare("version", ">=", "1.0.10")
    with pytest.raises(filters.FilterError, match="semantic versions"):
        filters.parse('version > "latest"')
    # equality still compares the text as it is
    assert filters.parse('version == "latest"') == filters.Compare("version", "==", "latest")
