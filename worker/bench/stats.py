"""Statistics of a benchmark point: percentiles from every sample, ratios, a trend slope.

Pure functions on plain lists, so they are unit-tested without any timing. Percentiles use
linear interpolation between the two nearest ranks (NumPy's default ``linear`` method): with
``n`` sorted samples, the q-th percentile sits at position ``q/100 * (n - 1)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Final

PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted ``ordered``; ``ValueError`` when empty."""
    if not ordered:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def summarize(samples: Iterable[float]) -> dict[str, float | int | None]:
    """``n``, ``mean``, p50/p90/p99/p99.9 and ``max`` of every sample (``None`` when empty)."""
    ordered = sorted(samples)
    summary: dict[str, float | int | None] = {"n": len(ordered)}
    if not ordered:
        summary.update({name: None for name, _ in PERCENTILES})
        summary.update(mean=None, max=None)
        return summary
    for name, q in PERCENTILES:
        summary[name] = percentile(ordered, q)
    summary["mean"] = statistics.fmean(ordered)
    summary["max"] = ordered[-1]
    return summary


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing or the reference is not > 0."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are present, ``None`` when none is."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``y`` over ``x`` (``None`` with fewer than two distinct ``x``)."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def per_event(total: float, events: int) -> float | None:
    """``total / events``, ``None`` when no event completed."""
    return total / events if events > 0 else None
