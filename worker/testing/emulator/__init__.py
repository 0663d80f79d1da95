"""BioT in a box: an aiohttp application that plays the parts of BioT a plugin touches.

Identity (service-user login, public key with rotation, health check), in-memory entity APIs
(patients, caregivers, generic entities) with BioT's search, the dispatcher (subscriptions, the
PRE -> ADAPT_ENTITY -> POST interception chain, notifications), HTTPS with a self-signed CA,
and faults on request. It talks to plugins over HTTP only, exactly as BioT does.

>>> emulator = Emulator(EmulatorConfig())
>>> async with EmulatorServer(emulator) as server:   # doctest: +SKIP
...     print(server.url, emulator.service_user_id)
"""

from worker.testing.emulator.app import Emulator
from worker.testing.emulator.calllog import CallRecord
from worker.testing.emulator.cli import add_cli_arguments, config_from_args
from worker.testing.emulator.config import EmulatorConfig, ErrorRule
from worker.testing.emulator.server import EmulatorServer, serve_forever
from worker.testing.emulator.wire import ApiFailure

__all__ = [
    "ApiFailure",
    "CallRecord",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "ErrorRule",
    "add_cli_arguments",
    "config_from_args",
    "serve_forever",
]
