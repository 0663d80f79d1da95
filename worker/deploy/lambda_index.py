"""The ``index.py`` of a packaged plugin: BioT's default handler, ``index.handler``.

:func:`worker.deploy.package.build_package` copies this file to the root of the ZIP as
``index.py``, with :data:`ROUTES` set to the packaged plugin's ``WORKER_ROUTES``
(``module:function``). BioT's Lambda runtime imports it with the ZIP's folder as its code, so
everything it imports (the ``worker`` runtime, ``config``, the plugin, the dependencies) sits
beside it.

``handler(event, context)`` serves ``ROUTES`` unless the function's environment sets
``WORKER_ROUTES`` (an ``environmentVariables`` entry of the plugin), then hands the event to
:func:`worker.adapters.lambda_.handler`, which keeps one runtime warm across invocations.
Nothing happens at import time beyond importing the runtime, so a cold start pays for imports
only once.
"""

from __future__ import annotations

import os
from typing import Any

from worker.adapters import lambda_

#: The plugin's routes; ``build_package`` rewrites this line for the plugin it packs.
ROUTES = "handlers:build_routes"


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """BioT's entry point: the Function URL response of ``event``."""
    if not os.environ.get("WORKER_ROUTES"):
        os.environ["WORKER_ROUTES"] = ROUTES
    return lambda_.handler(event, context)
