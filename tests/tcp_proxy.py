"""A small asyncio TCP proxy a test owns, to cut a client's connections to a broker.

:class:`TcpProxy` listens on a free loopback port and forwards each connection to ``target``.
:meth:`~TcpProxy.cut` resets every open connection at once (both sides, as a dropped network
would), :meth:`~TcpProxy.refuse` stops listening (new connections are refused, the broker looks
unreachable) and :meth:`~TcpProxy.accept` listens again on the same port;
:meth:`~TcpProxy.freeze` stops forwarding bytes while keeping every connection open (a peer
that went silent) until :meth:`~TcpProxy.thaw`. Leaving the context closes the listener and
every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

_CHUNK = 65_536


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def __aenter__(self) -> TcpProxy:
        await self.accept()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.refuse()
        self.thaw()
        await self.cut()

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def accept(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones stay."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def freeze(self) -> None:
        """Stop forwarding (connections stay open; bytes wait)."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def cut(self) -> None:
        """Reset every open connection, both sides, and wait for their forwarders to end."""
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        forwards = [
            asyncio.create_task(_forward(reader, up_writer, self._flowing)),
            asyncio.create_task(_forward(up_reader, writer, self._flowing)),
        ]
        self._tasks.update(forwards)
        try:
            # One direction ending (EOF, reset) ends the connection: close both sides.
            await asyncio.wait(forwards, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in forwards:
                task.cancel()
            await asyncio.gather(*forwards, return_exceptions=True)
            self._tasks.difference_update(forwards)
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
