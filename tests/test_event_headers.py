"""An HTTP event's headers are read through a lower-case view of the request's multidict: the
same answers as the dict ``lower_headers`` makes (lower-case names, a repeated name's last
value), without copying every header per event."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from worker.events import HookType, NonSpecific, event_from_http, lower_headers, view_for

FIRST = f"00-{'a' * 32}-{'b' * 16}-01"
LAST = f"00-{'c' * 32}-{'d' * 16}-01"


def _headers() -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "x"),
                ("HookType", "NOTIFICATION"),
                ("Authorization", "Bearer first"),
                ("traceparent", FIRST),
                ("hooktype", "NONSPECIFIC"),
                ("AUTHORIZATION", "Bearer last"),
                ("TraceParent", LAST),
                ("X-Odd", "v"),
            ]
        )
    )


def test_the_view_answers_as_the_lower_case_dict() -> None:
    headers = _headers()
    event = event_from_http(headers, b"{}", received_at=0.0)
    copy = lower_headers(headers)
    assert copy["hooktype"] == "NONSPECIFIC" and copy["authorization"] == "Bearer last"
    for name in ("host", "hooktype", "authorization", "traceparent", "x-odd", "missing"):
        assert event.headers.get(name) == copy.get(name)
        assert (name in event.headers) == (name in copy)
    assert dict(event.headers) == copy
    assert list(event.headers) == list(copy)
    assert len(event.headers) == len(copy)
    assert event.headers == copy


def test_headers_of_a_plain_mapping_are_lowered_as_strings() -> None:
    assert lower_headers({"Host": "h", "X-Trace": "t"}) == {"host": "h", "x-trace": "t"}
    assert lower_headers({"A": "first", "a": "last"}) == {"a": "last"}
    assert lower_headers({"N": None, "Count": 3, "S": "s"}) == {"count": "3", "s": "s"}
    odd: dict[Any, str] = {1: "one", "B": "b"}  # a name that is not a string
    assert lower_headers(odd) == {"1": "one", "b": "b"}
    assert lower_headers({}) == {}
    named_in_bytes: dict[Any, str] = {b"X": "v"}  # as str(name).lower() names it
    assert lower_headers(named_in_bytes) == {"b'x'": "v"}


def test_the_event_reads_the_last_of_repeated_headers() -> None:
    event = event_from_http(_headers(), b"{}", received_at=0.0)
    assert event.hook is HookType.NONSPECIFIC and event.hook_known
    assert event.trace.trace_id == "c" * 32
    assert event.trace.span_id == "d" * 16


def test_a_nonspecific_view_never_holds_the_token_whatever_its_case() -> None:
    event = event_from_http(_headers(), b"{}", received_at=0.0)
    view = view_for(event, {})
    assert isinstance(view, NonSpecific)
    assert "authorization" not in {name.lower() for name in view.headers}
    assert view.headers["x-odd"] == "v"


def test_a_plain_mapping_is_copied_lower_case() -> None:
    event = event_from_http({"HookType": "NOTIFICATION", "X-A": "1"}, b"{}", received_at=0.0)
    assert event.headers == {"hooktype": "NOTIFICATION", "x-a": "1"}
    assert event.hook is HookType.NOTIFICATION
