"""At most one line a second for a fault that repeats: :class:`Throttle`.

A broker that is down fails every receive, a full descriptor table fails every accept: logging
each would bury the one line that matters under thousands of copies. A :class:`Throttle` writes
the first occurrence of a key, then at most one line per ``interval`` seconds for that key, and
that line says how many were held back since the last one (``suppressed``). Keys are the
caller's: the message and the error's text, say, never an id that differs per occurrence.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal

from worker.logs.core import Clock, Log

Level = Literal["debug", "info", "warning", "error"]

_MAX_KEYS: Final = 256  # forget the oldest keys past this many (a fault's text may vary)


class Throttle:
    """Log through ``log`` at most once per ``interval`` seconds per key.

    >>> from worker.logs import CapturingLog
    >>> log = CapturingLog()
    >>> throttle = Throttle(log, interval=60.0)
    >>> for _ in range(3):
    ...     _ = throttle.warning("receiving failed", key="ECONNREFUSED", error="refused")
    >>> [r.get("suppressed") for r in log.records]
    [None]
    """

    def __init__(self, log: Log, *, interval: float = 1.0, clock: Clock = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._state: dict[tuple[str, str], list[float]] = {}  # key: [last written, held back]

    def debug(self, message: str, /, *, key: str = "", **fields: Any) -> bool:
        return self._emit("debug", message, key, fields)

    def info(self, message: str, /, *, key: str = "", **fields: Any) -> bool:
        return self._emit("info", message, key, fields)

    def warning(self, message: str, /, *, key: str = "", **fields: Any) -> bool:
        return self._emit("warning", message, key, fields)

    def error(self, message: str, /, *, key: str = "", **fields: Any) -> bool:
        return self._emit("error", message, key, fields)

    def _emit(self, level: Level, message: str, key: str, fields: dict[str, Any]) -> bool:
        """Write the line unless its key was written less than ``interval`` ago; whether it
        was written."""
        now = self._clock()
        slot = (message, key)
        state = self._state.get(slot)
        if state is not None and now - state[0] < self._interval:
            state[1] += 1
            return False
        if state is None:
            if len(self._state) >= _MAX_KEYS:
                del self._state[next(iter(self._state))]
            state = self._state[slot] = [now, 0]
        if state[1]:
            fields = {**fields, "suppressed": int(state[1])}
        state[0], state[1] = now, 0
        getattr(self._log, level)(message, **fields)
        return True


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc``, at most ``limit`` characters (``repr`` of some clients'
    errors drops the message; a message alone can be empty)."""
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return described if len(described) <= limit else described[: limit - 3] + "..."
