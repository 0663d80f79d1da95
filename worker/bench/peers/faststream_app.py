"""Peer (g): the plugin as a FastStream Redis Streams subscriber, as FastStream's docs build one.

Run: ``python -m worker.bench.peers.faststream_app``, which does what ``faststream run
worker.bench.peers.faststream_app:create_app --factory`` does (``anyio.run(app.run)`` on uvloop
when it is installed), without FastStream's ``cli`` extra, whose typer pin
fights fastapi-cli's. Settings besides the platform's (:mod:`.plugin`): ``PEER_REDIS_URL``,
``PEER_STREAM``, ``PEER_GROUP``, ``PEER_CONSUMER`` and ``PEER_MAX_WORKERS``.

One subscriber, ``StreamSub(stream, group=..., consumer=...)`` in a consumer group, reads the
entries the bench's load generator adds (fields ``envelope``, ``reply_to``, ``correlation_id``:
the worker's queue format, not FastStream's). FastStream's documented hooks for a foreign format
read them: a custom parser wraps FastStream's own (which builds the message that acks through
the group) and makes the envelope the body and the entry's ``reply_to`` and ``correlation_id``
the message's; a custom decoder hands the handler all three, which FastStream validates into a
Pydantic model. The handler checks the JWT and scope, runs the plugin (:mod:`.plugin`), logs its
line and adds the reply to the ``reply_to`` stream as the worker does (``XADD reply_to
correlation_id C response R``, ``R`` the Function URL answer ``{statusCode, headers, body}``)
with a Redis client the app's lifespan opens (FastStream's own replies are pub/sub messages in
its format, hence ``no_reply``). FastStream then acks (``XACK``; its default policy,
``REJECT_ON_ERROR``, leaves an entry whose handler raised pending). ``max_workers`` lets it
handle that many entries at once (FastStream's default is one at a time); its per-message
"Received"/"Processed" log lines are logged at DEBUG (the broker's ``log_level``), below the
plugin logger's INFO, so the plugin's line is the one line per event. What this does not do
that the worker's queue path does: see :mod:`worker.bench.peers`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis.asyncio as aioredis
from faststream import FastStream
from faststream.message import StreamMessage
from faststream.redis import RedisBroker, StreamSub
from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.bench.peers.plugin import (
    Peer,
    PeerSettings,
    PluginError,
    Trace,
    bearer,
    event_token,
    hook_of,
    load_settings,
    open_peer,
    parse_payload,
    plugin_logger,
)

JSON = "application/json"


class StreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PEER_")

    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = "biot-events"
    group: str = "biot-plugin"
    consumer: str = "peer-1"
    # Entries handled at once: the bench's highest concurrency, so that no level waits for it
    # (the worker row runs with WORKER_MAX_IN_FLIGHT=4096 for the same reason).
    max_workers: int = 128


class Envelope(BaseModel):
    """The queue message: the Lambda Function URL event's ``headers`` and JSON ``body``."""

    headers: dict[str, str] = {}
    body: str = ""


class Reply(BaseModel):
    """The Function URL answer the worker replies with."""

    statusCode: int  # the Function URL's field name
    headers: dict[str, str]
    body: str


async def parse_entry(
    msg: Mapping[str, Any],
    original_parser: Callable[[Mapping[str, Any]], Awaitable[StreamMessage[Any]]],
) -> StreamMessage[Any]:
    """FastStream's message for one of the bench's entries: the envelope as the body, the
    entry's ``reply_to`` and ``correlation_id`` as the message's."""
    fields: Mapping[bytes, bytes] = msg["data"]
    # The original parser reads FastStream's own format from the data; these fields are not
    # that, so it gets none (it would serialise the fields to JSON and parse them back twice).
    message = await original_parser({**msg, "data": {}})
    message.body = fields.get(b"envelope", b"")
    message.content_type = JSON
    message.reply_to = fields.get(b"reply_to", b"").decode()
    correlation = fields.get(b"correlation_id")
    if correlation is not None:
        message.correlation_id = correlation.decode()
    return message


async def decode_entry(
    message: StreamMessage[Any],
    original_decoder: Callable[[StreamMessage[Any]], Awaitable[Any]],
) -> dict[str, Any]:
    """The handler's body: the decoded envelope (FastStream's JSON decoder), and where to reply."""
    return {
        "envelope": await original_decoder(message),
        "reply_to": message.reply_to,
        "correlation_id": message.correlation_id,
    }


class Entry(BaseModel):
    envelope: Envelope
    reply_to: str = ""
    correlation_id: str = ""


class Plugin:
    """The subscriber's handler and what it holds for the app's lifetime (opened by
    :meth:`lifespan`): the plugin's resources and a Redis client for the replies.

    The handler takes its entry as its one (body) parameter, not FastStream's ``Context``
    parameters (the message, the broker's Redis client, app state): with fast_depends 3.0.9
    each of those is resolved by a call in a worker thread, three thread hand-offs per message.
    """

    def __init__(self, plugin: PeerSettings, stream: StreamSettings) -> None:
        self._settings, self._redis_url = plugin, stream.redis_url
        self._peer: Peer | None = None
        self._replies: aioredis.Redis | None = None

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with (
            open_peer(self._settings) as peer,
            aioredis.Redis.from_url(self._redis_url) as replies,
        ):
            self._peer, self._replies = peer, replies
            yield

    async def on_event(self, entry: Entry) -> None:
        """One event: answer it, log it, add the reply to its ``reply_to`` stream."""
        assert self._peer is not None and self._replies is not None, "the app has not started"
        reply = await answer(self._peer, entry.envelope)
        if entry.reply_to:
            fields = {"correlation_id": entry.correlation_id, "response": reply.model_dump_json()}
            await self._replies.xadd(entry.reply_to, fields)  # type: ignore[arg-type]


async def answer(peer: Peer, envelope: Envelope) -> Reply:
    """The event's Function URL answer (its log line written)."""
    started = time.perf_counter()
    headers = {name.lower(): value for name, value in envelope.headers.items()}
    hook = hook_of(headers.get("hooktype"))
    trace = Trace.from_traceparent(headers.get("traceparent"))
    reply_headers = {"content-type": JSON, "traceparent": trace.traceparent}
    try:
        payload = parse_payload(hook, envelope.body)
        peer.verify(event_token(payload, bearer(headers.get("authorization"))), hook)
        result = await peer.answer(payload, trace)
    except PluginError as exc:
        peer.log_event(hook, trace, started, exc)
        error = json.dumps(peer.error_body(exc, trace))
        return Reply(statusCode=exc.status, headers=reply_headers, body=error)
    peer.log_event(hook, trace, started)
    if result is None:  # a notification: 200, no body
        return Reply(statusCode=200, headers={"traceparent": trace.traceparent}, body="")
    return Reply(statusCode=200, headers=reply_headers, body=result.model_dump_json(by_alias=True))


def create_app(settings: StreamSettings | None = None) -> FastStream:
    """The FastStream app: a broker, the subscriber, the plugin's resources in its lifespan."""
    stream = settings or StreamSettings()
    peer_settings = load_settings()
    logger = plugin_logger(peer_settings.biot_app_name)
    plugin = Plugin(peer_settings, stream)
    broker = RedisBroker(stream.redis_url, logger=logger, log_level=logging.DEBUG)
    broker.subscriber(
        stream=StreamSub(stream.stream, group=stream.group, consumer=stream.consumer),
        parser=parse_entry,
        decoder=decode_entry,
        no_reply=True,
        max_workers=stream.max_workers,
    )(plugin.on_event)
    return FastStream(broker, lifespan=plugin.lifespan, logger=logger)


def main() -> None:
    options: dict[str, Any] = {}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        options["loop_factory"] = uvloop.new_event_loop
    anyio.run(create_app().run, backend_options=options)


if __name__ == "__main__":
    main()
