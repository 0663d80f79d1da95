"""BioT in a box: an aiohttp application that plays the parts of BioT a plugin touches.

Identity (service-user login, public key with rotation, health check), in-memory entity APIs
(patients, caregivers, generic entities) with BioT's search, the dispatcher (subscriptions, the
PRE -> ADAPT_ENTITY -> POST interception chain, notifications), HTTPS with a self-signed CA,
and faults on request. It talks to plugins over HTTP only, exactly as BioT does.

>>> emulator = Emulator(EmulatorConfig())
>>> async with EmulatorServer(emulator) as server:   # doctest: +SKIP
...     print(server.url, emulator.service_user_id)
"""

from worker.emulator.app import Emulator
from worker.emulator.calllog import CallRecord
from worker.emulator.cli import add_cli_arguments, config_from_args
from worker.emulator.config import EmulatorConfig, ErrorRule
from worker.emulator.server import EmulatorServer, serve_forever
from worker.emulator.wire import ApiFailure

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
