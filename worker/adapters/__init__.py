"""Adapters: thin shells that turn a carrier's input into an event for the dispatcher, and its
response back into the carrier's answer.

HTTP (:mod:`.http`) and Lambda (:mod:`.lambda_`) answer one call each. Queues share one seam,
:mod:`.queue` (the ``Source`` Protocol, the intake loop, ``consume``); the brokers behind it,
:mod:`.redis_streams`, :mod:`.rabbitmq` and :mod:`.memory`, each import the seam, and
:func:`open_source`, here, imports the one a URL names, only when a queue is used. It lives here,
not in the seam, so that no broker imports the module that imports the brokers (a cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from config.settings import Settings
    from worker.adapters.queue import Source
    from worker.logs import Log

__all__ = ["open_source"]

_SCHEMES = ("redis", "rediss", "amqp", "amqps", "memory")
_CLIENTS = ("redis", "aio_pika", "aiormq", "pamqp")  # the queues extra's packages


def open_source(url: str, settings: Settings, log: Log) -> Source:
    """The (not yet entered) source for ``url``: ``redis://``/``rediss://`` (Redis Streams),
    ``amqp://``/``amqps://`` (RabbitMQ) or ``memory://`` (in-process).

    ``ValueError`` for an unknown scheme or a bad parameter; :class:`SettingsError` when the
    broker's client library (the ``queues`` extra) is not installed. The broker's module is
    imported here, on first use, so a worker that serves HTTP never loads a broker client.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown queue URL scheme {scheme!r} (redis://, amqp:// or memory://)")
    try:
        if scheme in ("redis", "rediss"):
            from worker.adapters import redis_streams

            return redis_streams.source_from_url(url, settings=settings, log=log)
        if scheme in ("amqp", "amqps"):
            from worker.adapters import rabbitmq

            return rabbitmq.source_from_url(url, settings=settings, log=log)
        from worker.adapters import memory

        return memory.source_from_url(url, settings=settings, log=log)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _CLIENTS:
            raise
        from config.settings import SettingsError

        extra = "pip install 'biot-worker[queues]'"
        raise SettingsError([f"--source: {scheme}:// needs the queues extra: {extra}"]) from None
