"""The PNG chart: latency percentiles per scenario and load level, one panel per scenario.

matplotlib is an optional extra (``biot-worker[bench]``), imported only here and only when a
chart is asked for; without it the run still prints the table and writes the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.bench.plan import VARIANTS, heading

PERCENTILES = ("p50", "p90", "p99", "p99.9")
# One colour per variant in every panel: matplotlib's ten, then four more (there are 14).
COLORS = (*(f"C{i}" for i in range(10)), "#00ced1", "#b8860b", "#8b008b", "#2f4f4f")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """One panel per (scenario, transport): grouped bars of p50 with p90/p99/p99.9 markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["scenario"], r["tls"]) for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for ax, (scenario, tls) in zip(axes[:, 0], groups, strict=True):
        _panel(ax, [r for r in rows if (r["scenario"], r["tls"]) == (scenario, tls)])
        ax.set_title(heading(scenario, tls))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    levels = list(dict.fromkeys(r["level"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / max(len(variants), 1)
    markers = {"p90": "_", "p99": "x", "p99.9": "^"}
    for i, variant in enumerate(variants):
        xs, p50s = [], []
        for j, level in enumerate(levels):
            row = next((r for r in rows if r["level"] == level and r["variant"] == variant), None)
            if row is None or row["latency_ms"]["p50"] is None:
                continue
            x = j + (i - (len(variants) - 1) / 2) * width
            xs.append(x)
            p50s.append(row["latency_ms"]["p50"])
            for name, marker in markers.items():
                value = row["latency_ms"][name]
                if value is not None:
                    ax.plot([x], [value], marker=marker, color="black", markersize=5)
        color = COLORS[list(VARIANTS).index(variant) % len(COLORS)]
        ax.bar(xs, p50s, width=width * 0.95, label=VARIANTS[variant].title, color=color)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (bar p50; - p90, x p99, ^ p99.9)")
    ax.legend(fontsize=7, ncols=3)
