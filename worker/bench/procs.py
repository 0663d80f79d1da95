"""The processes of a run: emulators (BioT in a box) and the targets under test.

Each is its own OS process started with ``asyncio`` subprocesses (the loop never blocks), on a
port chosen here, ready once the port accepts connections, its log lines (stdout) in a file of
the run directory and its stderr in another. :func:`stop` sends SIGTERM and waits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


@dataclass(slots=True)
class Proc:
    name: str
    process: asyncio.subprocess.Process
    port: int
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without BioT/worker/OpenTelemetry settings, plus ``extra`` and the repo
    on the path (an ``OTEL_*`` variable of the caller's would make every worker row export)."""
    own = ("BIOT_", "WORKER_", "BENCH_", "OTEL_", "PEER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.pop("REQUESTS_CA_BUNDLE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _open_logs(run_dir: Path, name: str) -> tuple[IO[bytes], IO[bytes], Path]:
    safe = name.replace("@", "-")
    out = (run_dir / f"{safe}.log").open("wb")
    err_path = run_dir / f"{safe}.stderr"
    return out, err_path.open("wb"), err_path


async def spawn(name: str, args: list[str], env: dict[str, str], port: int, run_dir: Path) -> Proc:
    """Start ``python -m <args>`` and wait until it listens on ``port``."""
    proc = await launch(name, args, env, port, run_dir)
    await wait_listening(proc)
    return proc


async def launch(name: str, args: list[str], env: dict[str, str], port: int, run_dir: Path) -> Proc:
    """Start ``python -m <args>`` without waiting for anything."""
    out, err, err_path = await asyncio.to_thread(_open_logs, run_dir, name)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args,
            env=child_env(env), cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
        )  # fmt: skip
    finally:
        out.close()
        err.close()
    return Proc(name, process, port, err_path)


async def wait_listening(proc: Proc, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109
    """Poll until the port accepts a connection; ``RuntimeError`` if the process dies first."""
    async with asyncio.timeout(timeout):
        while True:
            if proc.process.returncode is not None:
                raise RuntimeError(f"{proc.name} exited at start: {await tail(proc)}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def tail(proc: Proc, size: int = 2000) -> str:
    text = await asyncio.to_thread(proc.stderr_path.read_text, "utf-8", "replace")
    return text[-size:]


async def stop(proc: Proc, timeout: float = 15.0) -> int:  # noqa: ASYNC109
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if proc.process.returncode is None:
        proc.process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            return await proc.process.wait()
    except TimeoutError:
        proc.process.kill()
        return await proc.process.wait()


def emulator_args(port: int, latency: float, tls_dir: Path | None) -> list[str]:
    args = ["worker", "emulator", "--port", str(port), "--latency", f"{latency:g}"]
    args += ["--seed-patients", "50"]
    if tls_dir is not None:
        args += ["--tls", "--tls-dir", str(tls_dir)]
    return args


def target_args(
    variant_kind: str, variant: str, port: int, base_url: str, source: str | None = None
) -> list[str]:
    """The command line of a target (the ``-m`` module and its flags); ``source`` is the queue
    URL a ``queue`` target consumes instead of listening on ``port``."""
    if variant_kind == "floor":
        return ["worker.bench.floor", "--port", str(port), "--base-url", base_url]
    if variant_kind == "lambda":
        return ["worker.bench.lambda_style", "--style", variant, "--port", str(port),
                "--base-url", base_url]  # fmt: skip
    if variant_kind == "queue":
        assert source is not None, "a queue target needs its source URL"
        return ["worker", "run", "--source", source]
    if variant_kind == "fastapi":  # uvicorn's defaults, but no access log (the worker has none)
        return ["uvicorn", "worker.bench.peers.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--no-access-log"]  # fmt: skip
    if variant_kind == "faststream":  # its stream and group come in its environment
        return ["worker.bench.peers.faststream_app"]
    # The observability variants differ from the worker row by their environment alone, so
    # they start as it does (worker_proc is for the variants that need its bench-only switches).
    same = variant in ("worker", "worker-nometrics", "worker-otel")
    return ["worker" if same else "worker.bench.worker_proc", "run"]


def target_env(
    variant: str,
    port: int,
    base_url: str,
    identity: dict[str, Any],
    ca: str | None,
    candidate: str | None = None,
    otlp_endpoint: str | None = None,
) -> dict[str, str]:
    """The environment of a target: the worker's settings for ``variant``. ``otlp_endpoint``
    is the run's stand-in collector, which the ``worker-otel`` variant exports its spans to
    (OpenTelemetry's default batch settings); every other row exports nothing."""
    env = {
        "BIOT_BASE_URL": base_url,
        "BIOT_SERVICE_USER_ID": str(identity["serviceUserId"]),
        "BIOT_SERVICE_USER_SECRET_KEY": str(identity["serviceUserSecretKey"]),
        "BIOT_APP_NAME": "biot-bench",
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": str(port),
        "WORKER_ROUTES": "worker.bench.scenarios:build_routes",
        "WORKER_MAX_IN_FLIGHT": "4096",  # the bench measures latency, not load shedding
        "WORKER_LOG_BACKEND": "aiologger" if variant == "worker-aiolog" else "stdlib",
    }
    if variant == "worker-quiet":
        env["WORKER_LOG_LEVEL"] = "WARNING"  # the per-event "event handled" line is INFO
    if variant == "worker-candidate" and candidate:
        env["BENCH_PRELOAD"] = candidate
    if variant == "worker-uvloop":
        env["BENCH_UVLOOP"] = "1"
    if variant == "worker-nometrics":
        env["WORKER_METRICS"] = "false"
    if variant == "worker-otel":
        if otlp_endpoint is None:
            raise ValueError("the worker-otel variant needs the stand-in collector's endpoint")
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
        env["OTEL_SERVICE_NAME"] = "biot-bench"
    if ca is not None:
        env["WORKER_CA_BUNDLE"] = ca
    return env


def peer_env(identity: dict[str, Any], base_url: str, ca: str | None) -> dict[str, str]:
    """The environment of a peer (:mod:`worker.bench.peers`): the platform's variables, and
    the emulator's CA in ``SSL_CERT_FILE`` (which httpx reads) when its API is on HTTPS."""
    env = {
        "BIOT_BASE_URL": base_url,
        "BIOT_SERVICE_USER_ID": str(identity["serviceUserId"]),
        "BIOT_SERVICE_USER_SECRET_KEY": str(identity["serviceUserSecretKey"]),
        "BIOT_APP_NAME": "biot-bench",
    }
    if ca is not None:
        env["SSL_CERT_FILE"] = ca
    return env
