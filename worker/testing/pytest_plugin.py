"""The test kit as a pytest plugin: ``pytest_plugins = ["worker.testing.pytest_plugin"]``.

Needs pytest and pytest-asyncio (the ``dev`` extra); the async tests using ``biot`` run under
pytest-asyncio (``asyncio_mode = auto``, or ``@pytest.mark.asyncio`` on each).

Fixtures:

- ``biot_routes``: the :class:`~worker.Router` the ``biot`` fixture serves; by default the
  plugin ``WORKER_ROUTES`` names (``handlers:build_routes`` when unset). Override it in a
  ``conftest.py`` or a test module to serve other routes.
- ``biot``: a running :class:`~worker.testing.EmulatedBiot` (emulator + worker on loopback,
  subscribed to ``biot_routes``), stopped after the test whether it passed or not.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from config.settings import WorkerSettings
from worker.routing import Router, load_routes
from worker.testing.biot import EmulatedBiot, emulated_biot


@pytest.fixture
def biot_routes() -> Router:
    """The routes of the plugin ``WORKER_ROUTES`` names (default ``handlers:build_routes``)."""
    return load_routes(os.environ.get("WORKER_ROUTES") or WorkerSettings().routes)


@pytest_asyncio.fixture
async def biot(biot_routes: Router) -> AsyncIterator[EmulatedBiot]:
    """BioT in a box and a worker serving ``biot_routes``; both stopped after the test."""
    async with emulated_biot(biot_routes) as running:
        yield running
