"""The benchmark's stand-in OpenTelemetry collector: a real ``worker.testing.otlp`` process the
run starts, reads span counts from and stops; and the CLI leaving the OpenTelemetry rows out
when the extra is missing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from worker.bench import cli, procs
from worker.bench.collector import Collector
from worker.cli import build_parser


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[Collector]:
    started = await Collector.start(tmp_path)
    try:
        yield started
    finally:
        await started.aclose()


def export_request(spans: int) -> bytes:
    made = [Span(trace_id=bytes([1]) * 16, span_id=bytes([n + 1]) * 8, name=f"s{n}")
            for n in range(spans)]  # fmt: skip
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=made)])]
    )
    return bytes(request.SerializeToString())


async def test_the_stand_in_collector_counts_the_spans_exported_to_it(
    collector: Collector,
) -> None:
    assert collector.endpoint == f"http://127.0.0.1:{collector.proc.port}"
    assert await collector.count() == 0
    async with aiohttp.ClientSession() as http:
        for spans in (3, 2):
            async with http.post(
                f"{collector.endpoint}/v1/traces",
                data=export_request(spans),
                headers={"content-type": "application/x-protobuf"},
            ) as response:
                assert response.status == 200
    assert await collector.wait_count(5) == 5
    assert await collector.wait_count(6, seconds=0.0) == 5  # not reached: what there is


async def test_the_collector_stops_with_the_run_and_a_dead_one_is_an_error(
    collector: Collector,
) -> None:
    process = collector.proc.process
    await procs.stop(collector.proc)
    assert process.returncode == 0  # SIGTERM: it stops as asked
    with pytest.raises(RuntimeError, match="collector did not answer"):
        await collector.count()
    await collector.aclose()
    await collector.aclose()  # closing twice is harmless


def test_the_opentelemetry_rows_are_left_out_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["bench", "--quick"])
    assert {"worker-nometrics", "worker-otel"} <= set(cli.plan_from(args).variants)
    monkeypatch.setattr(cli, "_otel_installed", lambda: False)
    variants = cli.plan_from(args).variants
    assert "worker-otel" not in variants and "worker-nometrics" in variants
    assert "OpenTelemetry is not installed" in capsys.readouterr().err
