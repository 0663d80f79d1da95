"""Print the README's performance section from a `biot-worker bench` JSON and text output.

Usage: python scripts/bench_readme.py bench-results/bench-full.json "biot-worker bench --uvloop"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

VARIANTS = ("floor", "worker", "fastapi", "docs", "sample")
NAMES = {
    "floor": "(i) floor",
    "worker": "biot-worker",
    "fastapi": "(f) FastAPI",
    "docs": "(ii) docs",
    "sample": "(iii) sample",
}
TITLES = {
    "a": "(a) PRE rewrite, no API call",
    "b": "(b) PRE + 1 API GET",
    "c": "(c) NOTIFICATION, 3 API GETs",
    "d": "(d) ADAPT_ENTITY, 50 entities",
}


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def compact(rows: list[dict[str, Any]], scenario: str, tls: bool, level: str) -> str:
    cells = []
    for variant in VARIANTS:
        row = next(
            (
                r
                for r in rows
                if r["scenario"] == scenario
                and r["tls"] == tls
                and r["level"] == level
                and r["variant"] == variant
            ),
            None,
        )
        if row is None:
            cells.append("—")
            continue
        lat = row["latency_ms"]
        cells.append(
            f"{_num(lat.get('p50'), '.2f')} / {_num(lat.get('p99'), '.2f')} ms, "
            f"{_num(row['cpu_us_per_event'], '.0f')} µs, {_num(row['throughput'], '.0f')}/s"
        )
    title = TITLES[scenario] + (" HTTPS" if tls else "")
    return f"| {title} | {level} | " + " | ".join(cells) + " |"


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    command = sys.argv[2]
    text = Path(sys.argv[1]).with_suffix(".txt").read_text()
    memory = re.search(r"^memory, .*$", text, flags=re.M)
    meta = data["meta"]
    out = []
    out.append(
        f"Command: `{command}` ({meta['mode']} run, finished {meta['finished']}, "
        f"{meta['elapsed_s'] / 60:.0f} min; API latency {meta['api_latency_ms']} ms; "
        f"{meta['pinning']})."
    )
    out.append("")
    out.append(
        "Targets of the benchmark issues, measured in that run (medians over its repetitions):"
    )
    out.append("")
    out.append("| target | wanted | measured | met |")
    out.append("|---|---|---|---|")
    for t in data["targets"]:
        measured = t["measured"]
        shown = f"{measured:.2f}" if isinstance(measured, float) else str(measured)
        out.append(
            f"| {t['target']} | {t['wanted']} | {shown} | "
            f"{'yes' if t['met'] else ('n/a' if t['met'] is None else '**no**')} |"
        )
    out.append("")
    out.append(
        "Per scenario: p50 / p99 latency, CPU per event of the target process (its CPU-time "
        "clock), events/s."
    )
    out.append("")
    out.append("| scenario | load | " + " | ".join(NAMES[v] for v in VARIANTS) + " |")
    out.append("|---|---|" + "---|" * len(VARIANTS))
    rows = data["rows"]
    for scenario, tls in (
        ("a", False),
        ("b", False),
        ("b", True),
        ("c", False),
        ("c", True),
        ("d", False),
    ):
        for level in ("c=1", "c=32"):
            out.append(compact(rows, scenario, tls, level))
    out.append("")
    queue = re.search(r"^\(e\) .*?(?=\n\n)", text, flags=re.S | re.M)
    if queue:
        out.append("Scenario (e), the same worker over Redis Streams and over HTTP in one run:")
        out.append("")
        out.append("```")
        out.append(queue.group(0))
        out.append("```")
    out.append("")
    out.append("The worker on uvloop against asyncio, same run (CPU µs/event, events/s):")
    out.append("")
    for scenario in ("a", "b"):
        for level in ("c=1", "c=32"):
            pick = {
                r["variant"]: r
                for r in rows
                if r["scenario"] == scenario and not r["tls"] and r["level"] == level
            }
            if "worker" in pick and "worker-uvloop" in pick:
                w, u = pick["worker"], pick["worker-uvloop"]
                out.append(
                    f"- ({scenario}) {level}: asyncio {_num(w['cpu_us_per_event'], '.0f')} µs, "
                    f"{_num(w['throughput'], '.0f')}/s; uvloop "
                    f"{_num(u['cpu_us_per_event'], '.0f')} µs, {_num(u['throughput'], '.0f')}/s"
                )
    out.append("")
    found = memory.group(0).removeprefix("memory, ") if memory else "not measured in this run"
    out.append(f"Memory: {found}.")
    out.append("")
    for head in ("log backends", "observability", "profile (a)", "profile (b)"):
        block = re.search(rf"^{re.escape(head)}.*?(?=\n\n)", text, flags=re.S | re.M)
        if block:
            out += ["```", block.group(0), "```"]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
