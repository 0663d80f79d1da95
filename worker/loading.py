"""Loading the plugin's routing table from a ``module:function`` reference (``WORKER_ROUTES``)."""

from __future__ import annotations

import importlib

from worker.routing import Router


def load_routes(reference: str) -> Router:
    """Import ``module`` and call ``function()``; it must return a :class:`Router`.

    Raises ``ValueError`` with a clear message when the reference cannot be loaded.
    """
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"WORKER_ROUTES: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"WORKER_ROUTES: {module_name} has no function {function_name!r}")
    routes = factory()
    if not isinstance(routes, Router):
        raise ValueError(f"WORKER_ROUTES: {reference}() returned {type(routes).__name__}")
    return routes
