"""The script a deployed plugin's process runs: a tiny Lambda runtime for the emulator.

Run as ``<python> -I -S lambda_bootstrap.py <code dir> <handler>`` by
:mod:`worker.testing.emulator.lambda_host`. It uses the standard library only: the code folder
(the unpacked zip) and the interpreter's standard library are all this process can import.

Protocol on the process's original stdin/stdout, one frame at a time: a 4-byte big-endian length,
then that many bytes of UTF-8 JSON.

- after the cold start (the handler's module imported once): ``{"ready": true}``, or
  ``{"initError": {"errorType", "errorMessage"}}`` and the process exits with status 1;
- then, per event received as ``{"event", "requestId", "remainingMs"}``: ``{"result": ...}`` or
  ``{"error": {"errorType", "errorMessage"}}`` when the handler raised or its result is not JSON.

File descriptors 0 and 1 are moved out of the handler's reach first: fd 1 (and ``sys.stdout``)
then point at stderr and fd 0 at ``/dev/null``, so a stray ``print`` or read cannot corrupt the
protocol. stderr is the function's log.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

_HEADER = 4


class Context:
    """What Lambda's Python runtime passes as ``context`` (the parts a plugin uses)."""

    def __init__(self, request_id: str, remaining_ms: int) -> None:
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        arn = "arn:aws:lambda:us-east-1:000000000000:function:"
        self.invoked_function_arn = arn + self.function_name
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = "emulator"
        self.aws_request_id = request_id
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def read_frame(stream: BinaryIO) -> Any:
    """The next message, or ``None`` at end of input (the host closed the pipe)."""
    header = stream.read(_HEADER)
    if len(header) < _HEADER:
        return None
    size = int.from_bytes(header, "big")
    return json.loads(stream.read(size))


def write_frame(stream: BinaryIO, message: Any) -> None:
    data = json.dumps(message, allow_nan=False).encode()
    stream.write(len(data).to_bytes(_HEADER, "big") + data)
    stream.flush()


def error_of(exc: BaseException, error_type: str | None = None) -> dict[str, str]:
    return {"errorType": error_type or type(exc).__name__, "errorMessage": str(exc)}


def load_handler(code_dir: str, handler: str) -> Callable[[Any, Context], Any]:
    """Import the handler's module from ``code_dir`` (``index.handler``: module ``index``)."""
    sys.path.insert(0, code_dir)
    module_name, _, function_name = handler.rpartition(".")
    module_name = module_name.replace("/", ".")
    if not module_name or not function_name:
        raise ValueError(f"bad handler {handler!r}: want MODULE.FUNCTION")
    # The deployment's own module, named by its configuration: never one of this project.
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {module_name!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"handler {function_name!r} missing on module {module_name!r}")
    return function  # type: ignore[no-any-return]


def answer(function: Callable[[Any, Context], Any], message: dict[str, Any]) -> dict[str, Any]:
    context = Context(str(message.get("requestId", "")), int(message.get("remainingMs", 0)))
    try:
        result = function(message.get("event"), context)
    except Exception as exc:
        traceback.print_exc()
        return {"error": error_of(exc)}
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return {"error": error_of(exc, "Runtime.MarshalError")}
    return {"result": result}


def private_pipes() -> tuple[BinaryIO, BinaryIO]:
    """The protocol's pipes, taken off fds 0 and 1 (which now lead to /dev/null and stderr)."""
    inbox = os.fdopen(os.dup(0), "rb")
    outbox = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return inbox, outbox


def main(argv: list[str]) -> int:
    code_dir, handler = argv[1], argv[2]
    inbox, outbox = private_pipes()
    try:
        function = load_handler(code_dir, handler)
    except Exception as exc:
        traceback.print_exc()
        error_type = "Runtime.ImportModuleError" if isinstance(exc, ImportError) else None
        write_frame(outbox, {"initError": error_of(exc, error_type)})
        return 1
    write_frame(outbox, {"ready": True})
    while (message := read_frame(inbox)) is not None:
        reply = answer(function, message)
        sys.stderr.flush()
        write_frame(outbox, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
