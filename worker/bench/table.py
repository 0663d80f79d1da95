"""The terminal report: one block per scenario and transport, ratio lines, targets, extras."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.bench.plan import VARIANTS, heading
from worker.bench.report import spans_text

_REF_NAMES = {
    "floor": "floor",
    "docs": "(ii)",
    "sample": "(iii)",
    "worker": "HTTP",
    "fastapi": "(f)",
    "faststream": "(g)",
}
_TITLE = 30  # the widest variant title, "(g) FastStream, Redis Streams", and a space
_HEAD = (
    f"{'level':<11}{'variant':<{_TITLE}}{'n':>7}{'err':>5}{'ev/s':>8}"
    f"{'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>8}{'cpu µs/ev':>10}  cpu T/E/L"
)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _util(row: Mapping[str, Any]) -> str:
    u = row["cpu_util"]
    mark = {"target": " T", "load side": " L"}.get(row.get("bound") or "", "")
    text = "/".join(_num(u.get(k), 2) for k in ("target", "emulator", "loadgen")) + mark
    if "redis" in u:
        text += f" R {_num(u['redis'], 2)} ({_num(row.get('redis_cpu_us_per_event'))} µs/ev)"
    return text


def format_row(row: Mapping[str, Any]) -> str:
    lat = row["latency_ms"]
    title = VARIANTS[row["variant"]].title
    errors = row["errors"] + row["incomplete"]
    few = "~" if row.get("few_events") else ""
    return (
        f"{row['level']:<11}{title:<{_TITLE}}{row['n']:>7}{errors:>5}"
        f"{few + _num(row['throughput']):>8}"
        + "".join(f"{_ms(lat.get(p)):>8}" for p in ("p50", "p90", "p99", "p99.9", "max"))
        + f"{few + _num(row['cpu_us_per_event']):>10}  {_util(row)}"
    )


def format_ratios(row: Mapping[str, Any]) -> str:
    parts = []
    for ref, values in row.get("ratios", {}).items():
        shown = " ".join(
            f"{label} {_num(values[key], 2)}"
            for key, label in (
                ("p50", "p50"),
                ("p99", "p99"),
                ("cpu", "cpu"),
                ("throughput", "ev/s"),
            )
        )
        parts.append(f"÷{_REF_NAMES[ref]}: {shown}")
    return f"{'':<11}  {row['variant']} " + " | ".join(parts)


def render(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"biot-worker bench ({meta['mode']}): API latency {meta['api_latency_ms']:g} ms, "
        f"pinning {meta['pinning']}.",
        "Latencies in ms. err = errors + events cut off. cpu T/E/L = CPU per wall second of "
        "target / emulator / load generator (1.00 = one core); T or L: that side was saturated "
        "(L: the figure is bounded by the emulator, not the target). ~: under 2c events "
        "answered in the window, throughput and CPU are rough. R (scenario (e)): redis-server's "
        "CPU per wall second and per event, not pinned and not in the worker's cpu µs/ev; "
        "÷HTTP: the worker over Redis divided by the same worker answering over HTTP. "
        "÷(f), ÷(g): the worker divided by the peer a team would build instead, (f) FastAPI on "
        "uvicorn, (g) FastStream over Redis Streams (worker/bench/peers).",
    ]
    rows = result["rows"]
    groups = list(dict.fromkeys((r["scenario"], r["tls"]) for r in rows))
    for scenario, tls in groups:
        lines += ["", heading(scenario, tls), _HEAD]
        for row in (r for r in rows if (r["scenario"], r["tls"]) == (scenario, tls)):
            lines.append(format_row(row))
            if row.get("ratios"):
                lines.append(format_ratios(row))
            if "otel_spans" in row:
                lines.append(f"{'':<11}  {row['variant']} {spans_text(row)}")
    lines += _targets(result.get("targets") or [])
    lines += _log_backends(result.get("log_backends"))
    lines += _observability(result.get("observability"))
    lines += _memory(result.get("memory"))
    lines += _profiles(result.get("profiles") or {})
    lines += ["", f"uvloop: {meta.get('uvloop', '-')}"]
    lines += _queue(result.get("queue"))
    lines += [f"skipped {s['why']}" for s in result.get("skipped") or []]
    return "\n".join(lines)


def _queue(section: Mapping[str, Any] | None) -> list[str]:
    if not section:
        return []
    return [
        f"(e) Redis {section['redis']}, stream {section['stream']} (deleted after the run); "
        f"redis-server CPU: {section['redis_cpu']}; load client: {section['load_client']}"
    ]


def _targets(targets: list[Mapping[str, Any]]) -> list[str]:
    lines = ["", "targets (issues 5, 11 and 12):"]
    for t in targets:
        state = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        at = f" (highest at {t['at']}, of {t['points']})" if "at" in t else ""
        lines.append(
            f"  [{state}] {t['target']}: {t['wanted']}; measured {_num(t['measured'], 2)}{at}"
        )
    return lines


def _log_backends(section: Mapping[str, Any] | None) -> list[str]:
    if not section:
        return []
    lines = ["", "log backends, scenario (a): aiologger / stdlib"]
    for level, values in section["levels"].items():
        shown = "  ".join(f"{k.split()[-1]} {_num(v, 2)}" for k, v in values.items())
        lines.append(f"  {level:<10} {shown}")
    lines.append(f"  verdict: {section['verdict']}")
    return lines


def _observability(section: Mapping[str, Any] | None) -> list[str]:
    if not section:
        return []
    lines = [
        "",
        "observability, CPU per event: metrics = worker (metrics on) ÷ worker-nometrics, "
        "otel = worker-otel ÷ worker (+ the µs/event each adds)",
    ]
    for scenario, levels in section["scenarios"].items():
        for level, c in levels.items():
            spans = ""
            if c["otel spans"] is not None:
                spans = f"  spans {c['otel spans']}/{c['otel spans expected']}" + (
                    f" ({c['otel spans dropped']} DROPPED)" if c["otel spans dropped"] else ""
                )
            lines.append(
                f"  ({scenario}) {level:<11} metrics {_num(c['metrics cpu ratio'], 2)} "
                f"({_signed(c['metrics cpu µs/event'])} µs)  otel {_num(c['otel cpu ratio'], 2)} "
                f"({_signed(c['otel cpu µs/event'])} µs){spans}"
            )
    for scenario, s in section["summary"].items():
        lines.append(
            f"  ({scenario}) median over closed-loop levels: metrics "
            f"{_num(s['metrics cpu ratio'], 2)}, otel {_num(s['otel cpu ratio'], 2)}"
        )
    processes = section.get("processes_per_variant")
    if processes is not None:
        metrics = section.get("metrics_processes", processes)
        lines.append(
            f"  the metrics ratio of (a) from {metrics} process(es) each of worker and "
            f"worker-nometrics, the rest from {processes} per variant: two processes of the same "
            "code were measured 10-20 % apart here, so one process's ratio within ±0.2 of 1 is "
            "noise (--fresh-processes --reps 10 for a small difference)"
        )
    for scenario, p in (section.get("profiled") or {}).items():
        lines.append(
            f"  profile ({scenario}), worker with metrics on and OpenTelemetry off: metrics "
            f"{_num(p['metrics'], 1)} µs/event, OpenTelemetry {_num(p['opentelemetry'], 1)} µs of "
            f"{_num(p['profiled'])} (under cProfile)"
        )
    return lines


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}"


def _memory(section: Mapping[str, Any] | None) -> list[str]:
    if not section:
        return []
    rss = section.get("rss_mb") or {}
    return [
        "",
        f"memory, scenario (b) c=128 for {section['seconds']:g} s: RSS {_num(rss.get('first'), 1)}"
        f" -> {_num(rss.get('last'), 1)} MB (max {_num(rss.get('max'), 1)}), slope "
        f"{_num(section['growth_mb_per_min'], 2)} MB/min: {'flat' if section['flat'] else 'GROWS'}",
    ]


def _profiles(profiles: Mapping[str, Any]) -> list[str]:
    lines = []
    for scenario, p in profiles.items():
        lines += [
            "",
            f"profile ({scenario}): {_num(p['profiled_us_per_event'])} µs of main-thread CPU per "
            f"event under cProfile ({p['events']} events, c={p.get('concurrency', 8)})",
        ]
        lines += [
            f"  {c['share']:>5.0%} {_num(c['us_per_event']):>6} µs  {c['component']}"
            for c in p["components"][:8]
        ]
        lines += [
            f"    {_num(f['own_us_per_event'], 1):>6} µs  {f['function']}" for f in p["top"][:6]
        ]
    return lines
