"""BioT's ``searchRequest``: filter, sort, page and free text over a list of JSON objects.

``filter`` maps an attribute path (``_name.firstName``, ``_ownerOrganization.id``; the virtual
``_templateId``/``_templateName`` read ``_template``) to conditions that must all hold:
``eq not in notIn like gt gte lt lte from to isNull isNotNull``. The logical keys ``$AND``,
``$OR`` and ``$NOT`` take ``{"filter": {...}}`` and combine its fields. Sort defaults to
``_creationTime`` DESC; ``order`` defaults to DESC; ``page`` from 0, ``limit`` 100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from worker.testing.emulator.wire import ApiFailure, dumps, loads

Item = dict[str, Any]
_ALIASES: Final = {"_templateId": "_template.id", "_templateName": "_template.name"}
_LOGICAL: Final = ("$AND", "$OR", "$NOT")
DEFAULT_LIMIT: Final = 100


@dataclass(frozen=True, slots=True)
class SearchRequest:
    filter: dict[str, Any] = field(default_factory=dict)
    sort: list[dict[str, str]] = field(default_factory=list)
    page: int = 0
    limit: int = DEFAULT_LIMIT
    free_text: str | None = None


def bad_search(message: str) -> ApiFailure:
    return ApiFailure(400, "INVALID_SEARCH_REQUEST", message)


def parse_search_request(raw: str | None) -> SearchRequest:
    """Parse and validate the ``searchRequest`` query value; 400 ``ApiFailure`` when bad."""
    if raw is None or not raw.strip():
        return SearchRequest()
    try:
        body = loads(raw)
    except ValueError as exc:
        raise bad_search(f"searchRequest is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_search("searchRequest must be a JSON object")
    filt = body.get("filter") or {}
    _validate_filter(filt)
    return SearchRequest(
        filter=filt,
        sort=_parse_sort(body.get("sort")),
        page=_int(body, "page", 0, minimum=0),
        limit=_int(body, "limit", DEFAULT_LIMIT, minimum=1),
        free_text=_free_text(body.get("freeTextSearch")),
    )


def search(
    items: list[Item], request: SearchRequest, default_sort: str = "_creationTime"
) -> tuple[list[Item], int]:
    """The requested page of matching ``items`` and the total number that matched."""
    matched = [i for i in items if _matches(i, request.filter) and _has_text(i, request.free_text)]
    orders = request.sort or [{"prop": default_sort, "order": "DESC"}]
    ordered = _sorted(matched, orders)
    start = request.page * request.limit
    return ordered[start : start + request.limit], len(matched)


def search_response(data: list[Item], total: int, request: SearchRequest) -> dict[str, Any]:
    """BioT's answer: ``{data, metadata: {page: {totalResults, page, limit}, sort, filter}}``."""
    return {
        "data": data,
        "metadata": {
            "page": {"totalResults": total, "page": request.page, "limit": request.limit},
            "sort": request.sort,
            "filter": request.filter,
            "freeTextSearch": request.free_text,
        },
    }


# ---------------------------------------------------------------- parsing


def _int(body: dict[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_search(f"{key} must be an integer of at least {minimum}")
    return value


def _free_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_search("freeTextSearch must be a string")
    return value


def _parse_sort(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_search("sort must be a list of {prop, order}")
    orders: list[dict[str, str]] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("prop"), str):
            raise bad_search("each sort item needs a prop")
        order = str(item.get("order") or "DESC").upper()
        if order not in ("ASC", "DESC"):
            raise bad_search(f"sort order must be ASC or DESC, got {item.get('order')!r}")
        orders.append({"prop": item["prop"], "order": order})
    return orders


def _validate_filter(filt: Any) -> None:
    if not isinstance(filt, dict):
        raise bad_search("filter must be an object of attribute -> conditions")
    for key, conditions in filt.items():
        if key in _LOGICAL:
            nested = conditions.get("filter") if isinstance(conditions, dict) else None
            if nested is None:
                raise bad_search(f'{key} takes {{"filter": {{...}}}}')
            _validate_filter(nested)
            continue
        if not isinstance(conditions, dict) or not conditions:
            raise bad_search(f"conditions for {key!r} must be a non-empty object")
        unknown = set(conditions) - set(_OPERATORS)
        if unknown:
            raise bad_search(f"unknown filter operator(s) for {key!r}: {sorted(unknown)}")
        for op in ("in", "notIn"):
            if op in conditions and not isinstance(conditions[op], list):
                raise bad_search(f"{op} for {key!r} takes a list")


# ---------------------------------------------------------------- matching


def value_at(item: Item, path: str) -> Any:
    """The value at a dotted attribute path, or ``None`` when any step is missing."""
    current: Any = item
    for step in _ALIASES.get(path, path).split("."):
        if not isinstance(current, dict):
            return None
        current = current.get(step)
    return current


def _comparable(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (
        isinstance(a, str) and isinstance(b, str)
    )


def _like(value: Any, needle: Any) -> bool:
    return isinstance(value, str) and str(needle).lower().strip("%") in value.lower()


def _in(value: Any, options: Any) -> bool:
    return value in options or (value is not None and str(value) in options)


_OPERATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "eq": lambda v, x: v == x,
    "not": lambda v, x: v != x,
    "in": _in,
    "notIn": lambda v, x: not _in(v, x),
    "like": _like,
    "gt": lambda v, x: _comparable(v, x) and v > x,
    "gte": lambda v, x: _comparable(v, x) and v >= x,
    "lt": lambda v, x: _comparable(v, x) and v < x,
    "lte": lambda v, x: _comparable(v, x) and v <= x,
    "from": lambda v, x: _comparable(v, x) and v >= x,
    "to": lambda v, x: _comparable(v, x) and v <= x,
    "isNull": lambda v, x: (v is None) == bool(x),
    "isNotNull": lambda v, x: (v is not None) == bool(x),
}


def _matches(item: Item, filt: dict[str, Any]) -> bool:
    return all(_clause(item, key, conditions) for key, conditions in filt.items())


def _clause(item: Item, key: str, conditions: Any) -> bool:
    if key == "$AND":
        return _matches(item, conditions["filter"])
    if key == "$OR":
        nested = conditions["filter"]
        return any(_clause(item, k, c) for k, c in nested.items())
    if key == "$NOT":
        return not _matches(item, conditions["filter"])
    value = value_at(item, key)
    return all(_OPERATORS[op](value, operand) for op, operand in conditions.items())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _has_text(item: Item, free_text: str | None) -> bool:
    """Any of the space-separated terms appears in any string attribute (case-insensitive)."""
    if not free_text:
        return True
    haystack = [s.lower() for s in _strings(item)]
    return any(term.lower() in s for term in free_text.split() for s in haystack)


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool):
        return (0, int(value))
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return (2, dumps(value))


def _sorted(items: list[Item], orders: list[dict[str, str]]) -> list[Item]:
    """Multi-key stable sort; items without the attribute come last in either direction."""
    result = list(items)
    for order in reversed(orders):
        prop = order["prop"]
        present = [i for i in result if value_at(i, prop) is not None]
        missing = [i for i in result if value_at(i, prop) is None]
        present.sort(key=lambda i: _sort_key(value_at(i, prop)), reverse=order["order"] == "DESC")
        result = present + missing
    return result
