"""The device filter as SQL: a parsed filter (``fwcm.filters``) becomes one boolean expression
over ``devices``, so selecting a campaign's devices is one set-based query."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, false, not_, or_, true

from fwcm import filters
from fwcm.store.models import Device
from fwcm.versions import version_key

_ATTR_COLUMNS: dict[str, Any] = {
    "vendor": Device.vendor_id,
    "class": Device.class_id,
    "name": Device.name,
    "version": Device.version,
    "transport": Device.transport,
    "hardware_id": Device.hardware_id,
    "sequence": Device.sequence,
}


_NULLABLE = {"version", "hardware_id"}


def _column(field: str) -> Any:
    if filters.is_tag(field):
        return Device.tags[filters.tag_key(field)].as_string()
    return _ATTR_COLUMNS[field]


def _nullable(field: str) -> bool:
    return filters.is_tag(field) or field in _NULLABLE


def filter_clause(node: filters.Node) -> ColumnElement[bool]:
    """Compile a filter AST to a boolean SQL expression over ``Device`` (never NULL-valued).

    A missing tag or unset attribute is unequal to everything: positive tests are guarded with
    ``IS NOT NULL`` and negative ones accept NULL, so ``not`` behaves like plain boolean logic.
    """
    if isinstance(node, filters.All):
        return true()
    if isinstance(node, filters.And):
        return and_(*(filter_clause(i) for i in node.items))
    if isinstance(node, filters.Or):
        return or_(*(filter_clause(i) for i in node.items))
    if isinstance(node, filters.Not):
        return not_(filter_clause(node.item))
    col = _column(node.field)
    nullable = _nullable(node.field)
    if isinstance(node, filters.Exists):
        return col.is_not(None) if nullable else true()
    if isinstance(node, filters.In):
        if not node.values:
            return true() if node.negated else false()
        if node.negated:
            expr = col.not_in(list(node.values))
            return or_(col.is_(None), expr) if nullable else expr
        expr = col.in_(list(node.values))
        return and_(col.is_not(None), expr) if nullable else expr
    assert isinstance(node, filters.Compare)
    value: object = node.value
    if node.field == filters.VERSION_FIELD and node.op not in ("==", "!="):
        col, value = Device.version_key, version_key(str(value))  # semantic order (fwcm.versions)
    ops: dict[str, Any] = {
        "==": col.__eq__,
        "!=": col.__ne__,
        "<": col.__lt__,
        "<=": col.__le__,
        ">": col.__gt__,
        ">=": col.__ge__,
    }
    expr = ops[node.op](value)
    if not nullable:
        return expr
    if node.op == "!=":
        return or_(col.is_(None), expr)
    return and_(col.is_not(None), expr)
