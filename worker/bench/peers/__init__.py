"""The benchmark's peers: the same plugin written the way a Python team would build it today
instead of using biot-worker, measured in the same run, scenarios, emulator and load generator.

- (f) ``fastapi`` (:mod:`.fastapi_app`): a FastAPI app on uvicorn (``fastapi[standard]``, so
  uvloop and httptools), serving every HTTP scenario (a)-(d) at one URL, ``POST /``.
- (g) ``faststream`` (:mod:`.faststream_app`): a FastStream Redis Streams subscriber serving
  scenario (e), the (a) event through a stream with a reply on the entry's ``reply_to`` stream,
  beside the worker's own Redis Streams path (``worker-queue``).

Both share :mod:`.plugin`, the code such a team writes once: Pydantic models of BioT's payloads,
PyJWT (RS512) with BioT's public key fetched at start and loaded once, the scope check, the
service token cached in an ``httpx2.Auth`` (a login at start, again before it expires, again on
a 401 with one retry), one pooled ``httpx2.AsyncClient``, the event's ``traceparent`` on every
BioT call (the same trace id, a new span id per call, as the worker does), one JSON log line per
event (stdlib ``logging``, a JSON formatter, BioT's fields plus the worker's ``hook``,
``status``, ``duration_ms``), and the scenario handlers of :mod:`worker.bench.logic` routed by
hook type and ``apiId`` / entity. They answer as the worker does: the same status and body for
every scenario, BioT's error body (400 ``JWT_ERROR``, 403 for a missing scope), the
``traceparent`` back (tests/test_bench_peers.py checks all of it against the worker).

What they do differently, and what they do not do, against the worker:

- **The JWT is verified on every event**, as FastAPI's docs verify a token in a dependency: PyJWT's
  ``decode`` costs about 190 µs per event on these machines (the RSA check about 50, PyJWT's
  per-character check of each base64url segment about 100). The worker keeps the claims of a
  verified token until it expires, and BioT reuses its tokens, so in steady state the worker
  pays a dictionary lookup; its ``worker-fresh-jwt`` row shows it paying for a new token per
  event. BioT's key is fetched once at start and never again (no TTL, no ``previousPublicKey``,
  no refetch when a signature fails: a rotated key means a restart); the worker refetches
  (single flight, with a cooldown).
- **The token refresh is inline**: the first call past the refresh point logs in while events
  wait for it; the worker refreshes in the background, so no event waits in steady state.
- **No deadlines, retries, limits or overload answer**: no per-hook deadline (an interceptor
  may run past BioT's timeout), no retry of a failed BioT call (the worker retries idempotent
  calls on timeouts, connection errors and 429/502/503/504, within the deadline), no bound on
  events in flight and no 503 when overloaded, no body-size limit (FastAPI's ``max_body_size``
  is off by default), no header or body read timeouts beyond uvicorn's defaults.
- **No observability beyond the log line**: no Prometheus metrics, no OpenTelemetry spans, no
  health or readiness endpoints, no redaction (they log fixed fields only, never a token), no
  ``x-b3-traceid`` / ``trace-id`` fallback (without a ``traceparent`` a new trace begins), log
  lines written on the event loop by a ``StreamHandler`` (the worker hands them to a thread).
- **Another event loop**: (f) runs on uvloop with httptools, uvicorn's standard install; (g) on
  uvloop, as ``faststream run`` does when uvloop is installed. The worker's rows run on
  asyncio's own loop (``worker-uvloop`` is the worker on uvloop).
- **httpx2, not httpx**: the BioT client is httpx2, httpx's maintained successor (the one
  ``fastapi[standard]`` installs and Starlette's test client asks for; the same API). httpx 0.28
  over httpcore 1.0.9 with today's anyio, which no longer brings ``sniffio``, tries ``import
  sniffio`` from disk for every request (at c=8 it answered a third as many (b) events).
  httpx2 still costs about twice aiohttp's client per call here (h11 and anyio streams in pure
  Python).
- **(f)** takes the payload through Pydantic (validated per hook; the worker builds its views
  without validating nested types) and answers through a response model, which FastAPI
  serialises with Pydantic straight to JSON bytes. Its dependencies are ``async def``: FastAPI
  runs a plain ``def`` dependency in a worker thread, which here nearly doubled its CPU per
  event.
- **(g)** acks as FastStream does, ``XACK`` after the handler (its ``REJECT_ON_ERROR`` policy:
  an entry whose handler raised stays pending, and nothing claims it again), and never deletes
  an entry (the bench trims its stream between points; the worker deletes each entry when it
  settles it). The reply (``XADD``) and the ack are two commands (the worker's settle is one
  script: reply, ack and delete, all or nothing). No retries with backoff, no dead letters, no
  reclaim of a crashed consumer's entries (the worker has all three). ``max_workers=128``
  handles that many entries at once (FastStream's default is one at a time). Its handler takes
  its entry as its one parameter, decoded by the custom parser and decoder: FastStream's
  ``Context`` parameters (the message, the broker's Redis client, app state) are each resolved
  in a worker thread by fast_depends 3.0.9, three thread hand-offs per message.

The bench starts them as it starts every target (:mod:`worker.bench.procs`); the bench side of
(g), its own stream and group, is :mod:`.stream`. Nothing else imports FastAPI, uvicorn, httpx2
or FastStream: they are the ``bench`` extra's, and a run without them leaves these rows out.
"""
