"""The Redis source's own connections (the hot path: XREADGROUP and the settle script): RESP2
replies parsed whole or in any chunks, pipelined calls answered in order, every call bounded (a
server that never answers, one that hangs up), a new connection after a broken one, AUTH
(password, user and password) and SELECT as the URL says, and a script cache flushed under the
source (NOSCRIPT: the script is sent whole). Settles asked for while a settle call is under
way go together in the next (at most 128 entries a call), each entry settled or failed on its
own. Servers that misbehave are
the test's own loopback listeners; AUTH and command counts run on a redis-server of the test's
own (tests.redis_server)."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.queue_helpers import (
    REDIS,
    FakeLog,
    eventually,
    message,
    queue_settings,
    require_broker,
)
from tests.redis_server import RedisServer
from worker.adapters.queue import Decision, SourceUnavailable, Verdict
from worker.adapters.redis_streams import _SETTLE as SETTLE_SCRIPT
from worker.adapters.redis_streams import (
    _SETTLE_BATCH,
    Address,
    Link,
    LuaScript,
    Part,
    RedisStreamSource,
    ReplyReader,
    RespError,
    RespReader,
    Settler,
    bulk,
    pack,
    reply_reader,
)

REPLIES = (
    b"+OK\r\n-ERR wrong\r\n:42\r\n:-7\r\n$-1\r\n$0\r\n\r\n$7\r\nhe\r\nllo\r\n*-1\r\n*0\r\n"
    b"*2\r\n*2\r\n$1\r\na\r\n*-1\r\n*3\r\n:1\r\n$2\r\nbc\r\n-NOGROUP gone\r\n"
)
PARSED: list[Any] = [
    b"OK", RespError("ERR wrong"), 42, -7, None, b"", b"he\r\nllo", None, [],
    [[b"a", None], [1, b"bc", RespError("NOGROUP gone")]],
]  # fmt: skip


# The Python reader, and hiredis's when it is installed (reply_reader() prefers it).
READERS: list[Callable[[], ReplyReader]] = [RespReader]
if importlib.util.find_spec("hiredis") is not None:
    READERS.append(reply_reader)


@pytest.mark.parametrize("reader", READERS)
def test_replies_parse_the_same_whole_and_in_any_chunks(reader: Callable[[], ReplyReader]) -> None:
    assert reader().feed(REPLIES) == PARSED
    one_by_one, parsed = reader(), []
    for n in range(len(REPLIES)):
        parsed += one_by_one.feed(REPLIES[n : n + 1])
    assert parsed == PARSED
    assert all(type(a) is type(b) for a, b in zip(parsed, PARSED, strict=True))
    for cut in range(len(REPLIES)):  # two chunks, then the replies again whole
        two = reader()
        assert two.feed(REPLIES[:cut]) + two.feed(REPLIES[cut:]) + two.feed(REPLIES) == (
            PARSED + PARSED
        )


@pytest.mark.parametrize("reader", READERS)
def test_a_reply_split_mid_bulk_waits_for_the_rest(reader: Callable[[], ReplyReader]) -> None:
    split = reader()
    assert split.feed(b"*2\r\n$5\r\nab") == []
    assert split.feed(b"cde\r") == []
    assert split.feed(b"\n:3\r\n+next") == [[b"abcde", 3]]
    assert split.feed(b"\r\n") == [b"next"]


@pytest.mark.parametrize("reader", READERS)
def test_bytes_that_are_not_resp_are_refused(reader: Callable[[], ReplyReader]) -> None:
    with pytest.raises(ValueError, match="not a RESP2 reply"):
        reader().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ValueError, match="not a RESP2 reply"):
        reader().feed(b":1\r\n*1\r\n?what\r\n")


def test_commands_are_packed_as_arrays_of_bulk_strings() -> None:
    assert pack(b"GET", b"k\r\n") == b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n"


# ---------------------------------------------------------------- against servers


class Listener:
    """A loopback server that reads and, per ``mode``, never answers (``silent``), hangs up at
    once (``hang up``), or answers its first read with ``+OK`` and then nothing (``once``);
    counts connections and sees each close."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.closed = 0
        self.received: list[bytearray] = []  # what each connection sent
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def address(self) -> Address:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return Address(f"127.0.0.1:{port}", "127.0.0.1", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        received = bytearray()
        self.received.append(received)
        try:
            if self.mode == "hang up":
                received += await reader.read(100)
            else:
                if self.mode == "once":
                    received += await reader.read(100)
                    writer.write(b"+OK\r\n")
                while chunk := await reader.read(100):
                    received += chunk  # never answers; returns when the client closes
        finally:
            self.closed += 1
            writer.close()


async def test_a_call_nobody_answers_is_bounded_and_its_connection_dropped() -> None:
    async with Listener("silent") as silent:
        link = Link(silent.address, timeout=0.2)
        try:
            for expected in (1, 2):
                with pytest.raises(TimeoutError):
                    await link.call(pack(b"PING"))
                assert silent.connections == expected  # a new connection for each call

                async def dropped(count: int = expected) -> bool:
                    return silent.closed == count

                await eventually(dropped, "the client closing the connection it gave up on")
        finally:
            link.close()


async def test_a_connection_the_server_drops_fails_its_call_and_the_next_reconnects() -> None:
    async with Listener("hang up") as rude:
        link = Link(rude.address, timeout=5.0)
        try:
            with pytest.raises(RedisConnectionError, match="lost"):
                await link.call(pack(b"PING"))
            with pytest.raises(RedisConnectionError, match="lost"):
                await link.call(pack(b"PING"))
            assert rude.connections == 2
        finally:
            link.close()


async def test_a_settle_call_nobody_answers_fails_each_of_its_settles_in_time() -> None:
    async with Listener("once") as once:
        link = Link(once.address, timeout=0.2)
        try:
            assert await link.call(pack(b"PING")) == [b"OK"]  # connected: no task to connect
            settler = Settler(link, ["s", "s:retry", "s:dead"], ["g", "1", "1", "1"])
            part = (bulk(b""), b"".join(bulk(arg) for arg in (b"1-1", b"", b"", b"0", b"")))
            # The first goes at once and gets no reply; the two others wait for that call, then
            # go together on a new connection, whose +OK is no answer to the script.
            results = await asyncio.gather(*(settler.add(part) for _ in range(3)),
                                           return_exceptions=True)  # fmt: skip
            assert [type(result) for result in results] == [TimeoutError, ResponseError,
                                                            ResponseError]  # fmt: skip
            assert "unexpected reply to the settle script: b'OK'" in str(results[1])
            assert results[1] is results[2]  # one call, one failure for both
            assert once.connections == 2

            async def dropped() -> bool:
                return once.closed == 1

            await eventually(dropped, "the connection whose reply never came closed")
        finally:
            link.close()


async def test_a_settle_given_up_on_before_it_went_is_never_sent() -> None:
    """The pump stops waiting for a settle (its bound passed) while it waits behind another
    call: it is not sent later, when the entry may already be delivered again; the entry stays
    pending and comes back. The others queued with it still go."""
    async with Listener("once") as once:
        link = Link(once.address, timeout=0.2)
        try:
            assert await link.call(pack(b"PING")) == [b"OK"]
            settler = Settler(link, ["s", "s:retry", "s:dead"], ["g", "1", "1", "1"])

            def part(entry: bytes) -> Part:
                return bulk(b""), b"".join(bulk(a) for a in (entry, b"", b"", b"0", b""))

            first = settler.add(part(b"1-1"))  # goes at once, gets no reply
            waiting = [settler.add(part(b"1-%d" % n)) for n in (2, 3, 4)]
            waiting[0].cancel()  # given up on while the first call is under way
            waiting[1].cancel()
            results = await asyncio.gather(first, waiting[2], return_exceptions=True)
            assert [type(r) for r in results] == [TimeoutError, ResponseError]

            async def sent() -> bool:
                return once.connections == 2 and b"1-4" in once.received[1]

            await eventually(sent, "the settle still wanted sent on a new connection")
            assert b"1-2" not in once.received[1] and b"1-3" not in once.received[1]
        finally:
            link.close()


async def test_settles_held_past_one_call_go_as_several_calls_each_answered() -> None:
    """More settles than one script call carries (``_SETTLE_BATCH``), released together: they
    go as that many calls, in order, and every entry gets its own XACK result."""
    require_broker("Redis", REDIS)
    link = Link(Address("redis", REDIS[0], REDIS[1]), timeout=5.0)
    stream = f"test-settle-batches-{uuid.uuid4().hex}"
    sent: list[bytes] = []

    class Counting:
        def start(self, payload: bytes, answer: Any) -> None:
            sent.append(payload)
            link.start(payload, answer)

    try:
        settler = Settler(cast(Link, Counting()), [stream, f"{stream}:retry", f"{stream}:dead"],
                          ["g", "1", "1", "1"])  # fmt: skip
        settler.holding = True
        count = 2 * _SETTLE_BATCH + 5
        futures = [settler.add((bulk(b""), b"".join(bulk(a) for a in (
            b"1-%d" % n, b"", b"", b"0", b"")))) for n in range(1, count + 1)]  # fmt: skip
        assert sent == []  # held
        settler.unhold()
        async with asyncio.timeout(10):  # a settle never sent is never answered
            results = await asyncio.gather(*futures)
        assert results == [0] * count  # none was pending: XACK 0 each
        assert len(sent) == 3
        assert [b"1-1\r\n" in sent[0], b"1-%d\r\n" % (_SETTLE_BATCH + 1) in sent[1],
                b"1-%d\r\n" % count in sent[2]] == [True, True, True]  # fmt: skip
    finally:
        link.close()
        client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
        try:  # nothing should be there; whatever is goes
            keys = [key async for key in client.scan_iter(match=f"{stream}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def test_a_server_that_is_not_there_is_a_connection_error() -> None:
    async with Listener("silent") as gone:
        address = gone.address
    link = Link(address, timeout=5.0)
    with pytest.raises(RedisConnectionError, match=f"Error connecting to {address.name}"):
        await link.call(pack(b"PING"))


async def test_a_closed_link_fails_calls_and_settles_at_once() -> None:
    require_broker("Redis", REDIS)
    link = Link(Address("redis", REDIS[0], REDIS[1]), timeout=5.0)
    assert await link.call(pack(b"PING")) == [b"PONG"]
    link.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await link.call(pack(b"PING"))  # no new connection after close
    settler = Settler(link, ["s", "s:retry", "s:dead"], ["g", "1", "1", "1"])
    part = (bulk(b""), b"".join(bulk(arg) for arg in (b"1-1", b"", b"", b"0", b"")))
    with pytest.raises(RedisConnectionError, match="closed"):
        await settler.add(part)


async def test_pipelined_calls_each_get_their_own_replies() -> None:
    require_broker("Redis", REDIS)
    link = Link(Address("redis", REDIS[0], REDIS[1]), timeout=5.0)
    try:
        replies = await asyncio.gather(
            *(link.call(pack(b"ECHO", b"%d" % n) * 2, 2) for n in range(200))
        )
    finally:
        link.close()
    assert replies == [[b"%d" % n, b"%d" % n] for n in range(200)]


async def test_a_script_runs_again_after_the_script_cache_was_flushed() -> None:
    require_broker("Redis", REDIS)
    async with RedisServer() as server:  # SCRIPT FLUSH on a server of the test's own
        link = Link(Address("own", "127.0.0.1", server.port), timeout=5.0)
        client = server.client()
        script = LuaScript("return {KEYS[1], ARGV[1]}")
        try:
            assert await script.run(link, [b"k"], [7]) == [b"k", b"7"]
            await client.script_flush()
            assert await script.run(link, [b"k"], [8]) == [b"k", b"8"]
            with pytest.raises(ResponseError, match="boom"):
                await LuaScript("return redis.error_reply('boom')").run(link, [], [])
        finally:
            link.close()
            await client.aclose()


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest.mark.parametrize("user", ["", "worker"])
async def test_credentials_and_database_of_the_url_are_used(
    own_redis: RedisServer, user: str
) -> None:
    admin = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    secret = "w0rker" if user else "s3cret"  # the user's, not the default user's
    if user:
        await admin.acl_setuser(user, enabled=True, passwords=[f"+{secret}"], keys=["*"],
                                channels=["*"], commands=["+@all"])  # fmt: skip
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    db3 = aioredis.Redis(host="127.0.0.1", port=own_redis.port, db=3, password="s3cret",
                         socket_timeout=5.0)  # fmt: skip
    db0 = aioredis.Redis(host="127.0.0.1", port=own_redis.port, password="s3cret",
                         socket_timeout=5.0)  # fmt: skip
    try:
        base = f"redis://{user}:{secret}@127.0.0.1:{own_redis.port}/3?stream={stream}"
        await db3.xadd(stream, {"envelope": message("k"), "reply_to": f"{stream}:box"})
        source = RedisStreamSource(base, settings=queue_settings(), log=FakeLog())
        async with source:
            [delivery] = await _receive(source, 1)
            await source.settle(delivery, Decision(Verdict.ACK, reply=b"{}"))
        assert await db3.xlen(stream) == 0  # acknowledged and deleted, in database 3
        replies: Any = await db3.xrange(f"{stream}:box")
        assert [fields for _, fields in replies] == [{b"response": b"{}"}]
        assert await db0.keys("wire-*") == []
        refused = RedisStreamSource(base.replace(secret, "wrong"), settings=queue_settings(),
                                    log=FakeLog())  # fmt: skip
        with pytest.raises(SourceUnavailable):
            await refused.__aenter__()
    finally:
        await db3.aclose()
        await db0.aclose()


async def test_settles_go_together_each_with_its_own_result(
    own_redis: RedisServer,
) -> None:
    client = own_redis.client()
    stream, count = f"wire-{uuid.uuid4().hex}", 300
    try:
        await client.set(f"{stream}:bad", "not a stream")
        for n in range(count):
            box = f"{stream}:bad" if n == 7 else f"{stream}:box"
            await client.xadd(stream, {"envelope": message(f"m{n}"), "reply_to": box,
                                       "correlation_id": str(n)})  # fmt: skip
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}"
        async with RedisStreamSource(url, settings=queue_settings(), log=FakeLog()) as source:
            got = await _receive(source, count)
            await client.config_resetstat()
            await client.script_flush()
            results = await asyncio.gather(
                *(source.settle(d, Decision(Verdict.ACK, reply=b"r%d" % n))
                  for n, d in enumerate(got)),
                return_exceptions=True,
            )  # fmt: skip
            stats: Any = await client.info("commandstats")
        [refused] = [(n, r) for n, r in enumerate(results) if r is not None]
        assert refused[0] == 7 and isinstance(refused[1], ResponseError)
        assert "WRONGTYPE" in str(refused[1])
        # the first settle at once (NOSCRIPT: sent again whole), the other 299 once it is
        # answered, in calls of 128 + 128 + 43 entries
        assert stats["cmdstat_evalsha"]["calls"] == 4
        assert stats["cmdstat_eval"]["calls"] == 1
        replies: Any = await client.xrange(f"{stream}:box")
        assert len(replies) == count - 1
        assert {fields[b"correlation_id"] for _, fields in replies} == {
            b"%d" % n for n in range(count) if n != 7
        }
        pending: Any = await client.xpending_range(stream, "biot-worker", "-", "+", 10)
        assert [row["message_id"] for row in pending] == [got[7].message.id]
        assert await client.xlen(stream) == 1
    finally:
        await client.aclose()


async def test_settle_soon_tells_each_entry_how_its_settle_went(own_redis: RedisServer) -> None:
    """The pump's path (settle by callback): each entry's ``done`` gets ``None`` once it is
    acknowledged and its reply written, or the error that left it pending; a settle given up
    on while it waited behind another call is never sent, and its ``done`` never called."""
    client = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    try:
        await client.set(f"{stream}:bad", "not a stream")
        for box in ("box", "bad", "box", "box"):
            await client.xadd(stream, {"envelope": message(box), "reply_to": f"{stream}:{box}"})
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}"
        async with RedisStreamSource(url, settings=queue_settings(), log=FakeLog()) as source:
            got = await _receive(source, 4)
            told: dict[int, BaseException | None] = {}

            def done(n: int) -> Callable[[BaseException | None], None]:
                return lambda error: told.__setitem__(n, error)

            settling = [source.settle_soon(d, Decision(Verdict.ACK, reply=b"r%d" % n), done(n))
                        for n, d in enumerate(got)]  # fmt: skip
            settling[3].give_up()  # still waiting for the first call's reply: never sent

            async def told_three() -> bool:
                return len(told) == 3

            await eventually(told_three, "the settles of the first three entries")
            assert told[0] is None and told[2] is None
            assert isinstance(told[1], ResponseError) and "WRONGTYPE" in str(told[1])
            again = await _receive(source, 2)  # the refused one and the given-up one: pending
            assert {d.message.id for d in again} == {got[1].message.id, got[3].message.id}
            assert 3 not in told
        replies: Any = await client.xrange(f"{stream}:box")
        assert [fields[b"response"] for _, fields in replies] == [b"r0", b"r2"]
        pending: Any = await client.xpending_range(stream, "biot-worker", "-", "+", 10)
        assert [row["message_id"] for row in pending] == [got[1].message.id, got[3].message.id]
    finally:
        await client.delete(stream, f"{stream}:bad", f"{stream}:box", f"{stream}:retry")
        await client.aclose()


async def test_settles_asked_for_as_a_batch_starts_go_ahead_of_the_next_read(
    own_redis: RedisServer,
) -> None:
    """As the pump does: a batch read by callback starts its tasks, and the next read goes one
    turn of the loop later; the settles asked for meanwhile go in that read's write, ahead of
    it on its connection, and are answered while the read blocks (not behind it)."""
    client = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    try:
        await client.script_load(SETTLE_SCRIPT)  # else NOSCRIPT: sent again whole, on its own
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}"
        async with RedisStreamSource(url, settings=queue_settings(), log=FakeLog()) as source:
            for _ in range(2):  # connects, then its start-up pass over its own pending entries
                assert await source.receive(10) == []  # (nothing there yet)
            for n in range(2):
                await client.xadd(stream, {"envelope": message(f"m{n}"),
                                           "reply_to": f"{stream}:box"})  # fmt: skip
            batches: list[Any] = []
            told: list[BaseException | None] = []
            reads: list[Any] = []

            def started(batch: Any) -> None:  # the batch's tasks, then the next read
                batches.append(batch)
                for n, delivery in enumerate(batch):
                    source.settle_soon(delivery, Decision(Verdict.ACK, reply=b"r%d" % n),
                                       told.append)  # fmt: skip
                asyncio.get_running_loop().call_soon(
                    lambda: reads.append(source.receive_soon(10, batches.append)))  # fmt: skip

            assert source.receive_soon(10, started) is not None

            async def answered() -> bool:
                return len(told) == 2

            await eventually(answered, "both settles, answered while the read blocks")
            assert told == [None, None] and len(batches) == 1 and len(batches[0]) == 2
            assert reads[0] is not None and len(batches) == 1  # the next read still blocks
            assert source._settles._wire is None  # the settles' own connection never opened
            await client.xadd(stream, {"envelope": message("m2")})

            async def third() -> bool:
                return len(batches) == 2

            await eventually(third, "the next read answered")
            await source.settle(batches[1][0], Decision(Verdict.ACK))
        replies: Any = await client.xrange(f"{stream}:box")
        assert [fields[b"response"] for _, fields in replies] == [b"r0", b"r1"]
        assert await client.xlen(stream) == 0
    finally:
        await client.delete(stream, f"{stream}:box", f"{stream}:retry")
        await client.aclose()


async def test_receive_soon_reads_by_callback_when_it_is_a_plain_read(
    own_redis: RedisServer,
) -> None:
    """The pump's path (receive by callback): ``None`` while the read needs ``receive()`` (to
    connect first); then the entries go to ``then`` as they are parsed; a group Redis lost is
    an empty batch, and the next ``receive()`` makes it again."""
    client = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    try:
        await client.xadd(stream, {"envelope": message("m0")})
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}"
        async with RedisStreamSource(url, settings=queue_settings(), log=FakeLog()) as source:
            got: list[Any] = []
            assert source.receive_soon(10, got.append) is None  # not connected yet
            await _receive(source, 1)  # connects
            assert source.receive_soon(10, got.append) is not None
            await client.xadd(stream, {"envelope": message("m1")})

            async def handed() -> bool:
                return len(got) == 1

            await eventually(handed, "the entry handed to then")
            assert [d.body for d in got[0]] == [message("m1")]
            await client.xgroup_destroy(stream, "biot-worker")
            assert source.receive_soon(10, got.append) is not None

            async def lost() -> bool:
                return len(got) == 2

            await eventually(lost, "the read of a group Redis lost answered")
            assert got[1] == []
            assert await source.receive(10) == []  # makes the group again
            groups: Any = await client.xinfo_groups(stream)
            assert [g["name"] for g in groups] == [b"biot-worker"]
    finally:
        await client.delete(stream, f"{stream}:retry")
        await client.aclose()


async def test_a_reply_to_naming_the_sources_own_keys_writes_no_reply_there(
    own_redis: RedisServer,
) -> None:
    """A publisher's reply_to naming the stream itself or its dead letters: the settle would
    write the reply there and set the key to expire with it, taking the stream's pending
    entries or the dead letters along an hour later. The message is settled without a reply,
    and the worker says why."""
    client = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    try:
        for box in (stream, f"{stream}:dead", f"{stream}:box"):
            await client.xadd(stream, {"envelope": message(box), "reply_to": box})
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}"
        log = FakeLog()
        async with RedisStreamSource(url, settings=queue_settings(), log=log) as source:
            got = await _receive(source, 3)
            for delivery in got:
                await source.settle(delivery, Decision(Verdict.ACK, reply=b"r"))
        assert await client.ttl(stream) == -1  # no expiry set on the stream
        assert await client.exists(f"{stream}:dead") == 0
        assert await client.xlen(f"{stream}:box") == 1  # a genuine reply stream still gets it
        warned = log.find(
            "a message's reply_to names the source's own stream, retries or dead letters: "
            "no reply written"
        )
        assert sorted(w["reply_to"] for w in warned) == sorted([stream, f"{stream}:dead"])
        assert await client.xlen(stream) == 0  # all three acknowledged
    finally:
        await client.delete(stream, f"{stream}:dead", f"{stream}:box", f"{stream}:retry")
        await client.aclose()


async def test_retries_move_back_after_redis_lost_the_mover_script(
    own_redis: RedisServer,
) -> None:
    client = own_redis.client()
    stream = f"wire-{uuid.uuid4().hex}"
    try:
        await client.xadd(stream, {"envelope": message("k")})
        url = f"redis://127.0.0.1:{own_redis.port}/0?stream={stream}&retry_delay=0.01"
        async with RedisStreamSource(url, settings=queue_settings(), log=FakeLog()) as source:
            [first] = await _receive(source, 1)
            await source.settle(first, Decision(Verdict.RETRY, reason="again", delay=0.01))
            await client.script_flush()  # the mover, sent with a read, answers NOSCRIPT
            [again] = await _receive(source, 1)
            await source.settle(again, Decision(Verdict.ACK))
            stats: Any = await client.info("commandstats")
        # moved by the mover sent whole on its own, not by the one that goes with XAUTOCLAIM
        # (the first at start, the next 5 s later)
        assert stats["cmdstat_xautoclaim"]["calls"] == 1
        assert (first.attempt, again.attempt) == (1, 2)
        assert again.body == first.body
        assert await client.xlen(stream) == 0
        assert await client.zcard(f"{stream}:retry") == 0
    finally:
        await client.aclose()


async def _receive(source: RedisStreamSource, count: int) -> list[Any]:
    got: list[Any] = []
    async with asyncio.timeout(10.0):
        while len(got) < count:
            got += await source.receive(count - len(got))
    return got
