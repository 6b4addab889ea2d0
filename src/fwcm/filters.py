"""Device filter language: a small boolean query over device attributes and tags (sans-IO).

A campaign names its devices with a filter; parsing happens at campaign creation so a typo is
refused before anything is stored, and the storage layer compiles the resulting AST to SQL.

Grammar (keywords are case-insensitive)::

    filter     := ε | expr
    expr       := and_expr ("or" and_expr)*
    and_expr   := unary ("and" unary)*
    unary      := "not" unary | "(" expr ")" | "exists" field | comparison
    comparison := field op literal
                | field ["not"] "in" "[" [literal ("," literal)*] "]"
    op         := "==" | "!=" | "<" | "<=" | ">" | ">="
    field      := "vendor" | "class" | "name" | "version" | "transport" | "hardware_id"
                | "sequence" | "tag." KEY
    literal    := STRING | INTEGER        STRING: "..." or '...' with \\ \" \' \n \t escapes

``sequence`` is an integer; every other field is text and takes a quoted string (``vendor`` and
``class`` values are UUIDs, compared in canonical lower-case form).  Tag values are text, so a
tag compared with an integer literal matches its decimal spelling and ordering a tag against an
integer is refused.  ``version`` orderings (``<``, ``<=``, ``>``, ``>=``) compare semantic
versions (``version >= "1.0.10"`` does not match 1.0.4; see ``fwcm.versions``) and take only a
version literal; a device whose version is not a semantic version matches no ordering, as if it
had none (``==``, ``!=`` and ``in`` compare the text as it is).  A missing tag or unset attribute
equals no value: ``==``, ``in`` and orderings are false for it, ``!=`` and ``not in`` are true.
The empty filter selects every device.

Example: ``class == "7c0e…" and tag.region == "eu" and sequence < 8``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Union

from fwcm.versions import is_version

MAX_FILTER_CHARS = 4096
MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

TEXT_FIELDS = ("vendor", "class", "name", "version", "transport", "hardware_id")
INT_FIELDS = ("sequence",)
FIELDS = TEXT_FIELDS + INT_FIELDS
UUID_FIELDS = ("vendor", "class")
VERSION_FIELD = "version"
"""Ordered by semantic version precedence (``fwcm.versions``), not as text."""
TAG_PREFIX = "tag."
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
KEYWORDS = ("and", "or", "not", "in", "exists")

Literal = str | int


class FilterError(ValueError):
    """A filter that cannot be parsed; ``position`` is the 0-based offset of the problem."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"invalid filter at column {position + 1}: {message}")
        self.position = position
        self.reason = message


# -- AST --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class All:
    """The empty filter: every device."""


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Literal


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Literal, ...]
    negated: bool = False


@dataclass(frozen=True)
class Exists:
    field: str


@dataclass(frozen=True)
class Not:
    item: Node


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


Node = Union[All, Compare, In, Exists, Not, And, Or]  # noqa: UP007 - a runtime alias used before 3.12


def is_tag(field: str) -> bool:
    return field.startswith(TAG_PREFIX)


def tag_key(field: str) -> str:
    return field[len(TAG_PREFIX) :]


def tag_keys(node: Node) -> set[str]:
    """The tag keys a filter names (``tag.region == "eu"`` names ``region``)."""
    if isinstance(node, Not):
        return tag_keys(node.item)
    if isinstance(node, And | Or):
        return set().union(*(tag_keys(i) for i in node.items))
    if isinstance(node, Compare | In | Exists) and is_tag(node.field):
        return {tag_key(node.field)}
    return set()


# -- lexer ------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
  | (?P<int>-?[0-9]+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)?)
  | (?P<quote>["'])
    """,
    re.VERBOSE,
)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # op punct int ident str kw end
    value: str | int
    pos: int


def _lex(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        m = _TOKEN_RE.match(text, i)
        if m is None:
            if text[i] == "=":
                raise FilterError("use '==' to compare", i)
            raise FilterError(f"unexpected character {text[i]!r}", i)
        kind = m.lastgroup
        assert kind is not None
        if kind == "ws":
            i = m.end()
            continue
        if kind == "quote":
            value, i2 = _lex_string(text, i)
            toks.append(_Tok("str", value, i))
            i = i2
            continue
        raw = m.group()
        if kind == "int":
            value_i = int(raw)
            if not INT_MIN <= value_i <= INT_MAX:
                raise FilterError(f"integer {raw} out of range", i)
            toks.append(_Tok("int", value_i, i))
        elif kind == "ident" and raw.lower() in KEYWORDS:
            toks.append(_Tok("kw", raw.lower(), i))
        else:
            toks.append(_Tok(kind, raw, i))
        i = m.end()
    toks.append(_Tok("end", "", n))
    return toks


def _lex_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= len(text):
                break
            esc = text[i + 1]
            if esc not in _ESCAPES:
                raise FilterError(f"unknown escape '\\{esc}' in string", i)
            out.append(_ESCAPES[esc])
            i += 2
            continue
        out.append(c)
        i += 1
    raise FilterError("unterminated string", start)


# -- parser -----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _lex(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def _is_kw(self, word: str) -> bool:
        return self.tok.kind == "kw" and self.tok.value == word

    def _is_punct(self, p: str) -> bool:
        return self.tok.kind == "punct" and self.tok.value == p

    def _describe(self, t: _Tok) -> str:
        if t.kind == "end":
            return "end of filter"
        if t.kind == "str":
            return f"string {t.value!r}"
        return repr(str(t.value))

    def _expect_punct(self, p: str, what: str) -> None:
        if not self._is_punct(p):
            raise FilterError(f"expected {what}, found {self._describe(self.tok)}", self.tok.pos)
        self.i += 1

    def parse(self) -> Node:
        if self.tok.kind == "end":
            return All()
        node = self.expr()
        if self.tok.kind != "end":
            raise FilterError(
                f"expected 'and', 'or' or end of filter, found {self._describe(self.tok)}", self.tok.pos
            )
        return node

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"nested deeper than {MAX_DEPTH} levels", self.tok.pos)

    def expr(self) -> Node:
        self._enter()
        items = [self.and_expr()]
        while self._is_kw("or"):
            self.i += 1
            items.append(self.and_expr())
        self.depth -= 1
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.unary()]
        while self._is_kw("and"):
            self.i += 1
            items.append(self.unary())
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self) -> Node:
        if self._is_kw("not"):
            self._enter()
            self.i += 1
            negation = Not(self.unary())
            self.depth -= 1
            return negation
        if self._is_punct("("):
            self.i += 1
            node = self.expr()
            self._expect_punct(")", "')'")
            return node
        if self._is_kw("exists"):
            self.i += 1
            field, _pos = self.field()
            return Exists(field)
        return self.comparison()

    def field(self) -> tuple[str, int]:
        t = self.tok
        if t.kind != "ident":
            raise FilterError(f"expected a field name, found {self._describe(t)}", t.pos)
        name = str(t.value)
        if name.startswith(TAG_PREFIX):
            if not TAG_KEY_RE.match(tag_key(name)):
                raise FilterError(f"invalid tag key in {name!r}", t.pos)
        elif name not in FIELDS:
            raise FilterError(
                f"unknown field {name!r} (known: {', '.join(FIELDS)}, tag.<key>)",
                t.pos,
            )
        self.i += 1
        return name, t.pos

    def literal(self, field: str, *, ordering: bool = False) -> Literal:
        t = self.tok
        if t.kind not in ("str", "int"):
            raise FilterError(f"expected a quoted string or an integer, found {self._describe(t)}", t.pos)
        self.i += 1
        return _check_literal(field, t.value, t.pos, ordering=ordering)

    def comparison(self) -> Node:
        field, _fpos = self.field()
        negated = False
        if self._is_kw("not"):
            self.i += 1
            negated = True
            if not self._is_kw("in"):
                raise FilterError(
                    f"expected 'in' after 'not', found {self._describe(self.tok)}", self.tok.pos
                )
        if self._is_kw("in"):
            self.i += 1
            self._expect_punct("[", "'[' to start the list")
            values: list[Literal] = []
            if not self._is_punct("]"):
                values.append(self.literal(field))
                while self._is_punct(","):
                    self.i += 1
                    values.append(self.literal(field))
            self._expect_punct("]", "',' or ']'")
            return In(field, tuple(values), negated)
        t = self.tok
        if t.kind != "op":
            raise FilterError(
                f"expected a comparison operator (== != < <= > >= in) after {field!r}, "
                f"found {self._describe(t)}",
                t.pos,
            )
        self.i += 1
        op = str(t.value)
        value = self.literal(field, ordering=op not in ("==", "!="))
        return Compare(field, op, value)


def _check_literal(field: str, value: str | int, pos: int, *, ordering: bool = False) -> Literal:
    if field in INT_FIELDS:
        if not isinstance(value, int):
            raise FilterError(f"{field} is an integer; got string {value!r}", pos)
        return value
    if is_tag(field):
        if isinstance(value, int):
            if ordering:
                raise FilterError(f"tag values are text; quote the value to order {field} by text", pos)
            return str(value)
        return value
    if not isinstance(value, str):
        raise FilterError(f'{field} is text; quote the value: "{value}"', pos)
    if field == VERSION_FIELD and ordering and not is_version(value):
        raise FilterError(
            f"version orderings compare semantic versions (1.4.2, 2.0.0-rc.1); got {value!r}", pos
        )
    if field in UUID_FIELDS and not ordering:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise FilterError(f"{field} must be a UUID, got {value!r}", pos) from None
    return value


def parse(text: str | None) -> Node:
    """Parse a filter; raise FilterError naming the problem and its column."""
    if text is None:
        return All()
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter longer than {MAX_FILTER_CHARS} characters", MAX_FILTER_CHARS)
    return _Parser(text).parse()


def validate(text: str | None) -> str:
    """Parse ``text`` and return its canonical spelling (what campaigns store)."""
    return to_text(parse(text))


# -- printer ----------------------------------------------------------------------------------


def _lit(v: Literal) -> str:
    if isinstance(v, int):
        return str(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_text(node: Node) -> str:
    """Canonical text of an AST; ``parse(to_text(n)) == n`` for every AST ``parse`` can produce."""
    if isinstance(node, All):
        return ""
    if isinstance(node, Compare):
        return f"{node.field} {node.op} {_lit(node.value)}"
    if isinstance(node, In):
        kw = "not in" if node.negated else "in"
        return f"{node.field} {kw} [{', '.join(_lit(v) for v in node.values)}]"
    if isinstance(node, Exists):
        return f"exists {node.field}"
    if isinstance(node, Not):
        inner = to_text(node.item)
        if isinstance(node.item, (And, Or)):
            inner = f"({inner})"
        return f"not {inner}"
    if isinstance(node, And):
        return " and ".join(f"({to_text(i)})" if isinstance(i, (And, Or)) else to_text(i) for i in node.items)
    if isinstance(node, Or):
        return " or ".join(f"({to_text(i)})" if isinstance(i, Or) else to_text(i) for i in node.items)
    raise TypeError(f"not a filter node: {node!r}")
