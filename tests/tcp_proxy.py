"""A small asyncio TCP proxy a test owns, to cut a client's connections to a broker.

:class:`TcpProxy` listens on a free loopback port and forwards each connection to ``target``.
:meth:`~TcpProxy.cut` resets every open connection at once (both sides, as a dropped network
would), :meth:`~TcpProxy.refuse` stops listening (new connections are refused, the broker looks
unreachable) and :meth:`~TcpProxy.accept` listens again on the same port;
:meth:`~TcpProxy.freeze` stops forwarding bytes while keeping every connection open (a peer
that went silent) until :meth:`~TcpProxy.thaw`. :meth:`~TcpProxy.in_transit` counts the bytes
the proxy holds, so a test can cut only once what a client sent has reached the broker. Leaving
the context closes the listener and every connection.

Bytes are passed on in the callback that receives them (protocols, not streams): nothing waits
inside the proxy but what the kernel holds, which :meth:`~TcpProxy.in_transit` can see.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from types import TracebackType


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it receives is written to its peer at once."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()  # until its peer is connected, and while frozen

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def pause_writing(self) -> None:  # our peer sends faster than we pass on: stop reading it
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.flow(self.proxy.flowing)

    def connection_lost(self, exc: Exception | None) -> None:
        # One direction ending (EOF, reset) ends the connection: close both sides.
        self.proxy._lost(self)

    def flow(self, on: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def unsent(self) -> int:
        """Bytes received and not read yet, plus bytes written and not yet handed to the kernel."""
        if self.transport is None or self.transport.is_closing():
            return 0
        sock = self.transport.get_extra_info("socket")
        unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", unread)[0]) + self.transport.get_write_buffer_size()


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.flowing = True
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[_Side, _Side]] = set()
        self._connecting: dict[_Side, asyncio.Task[None]] = {}

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

    def in_transit(self) -> int:
        """Bytes inside the proxy, either way: received and not read yet (frozen, or not read
        by the loop yet) or read and not yet handed to the kernel. Zero: everything a client
        sent so far is on its way to the broker (on loopback, in the broker's socket)."""
        return sum(side.unsent() for pair in self._pairs for side in pair)

    async def accept(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(self._client, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones stay."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def freeze(self) -> None:
        """Stop forwarding (connections stay open; bytes wait in the kernel)."""
        self._flow(False)

    def thaw(self) -> None:
        self._flow(True)

    async def cut(self) -> None:
        """Reset every open connection, both sides, and those still connecting upstream."""
        for client, upstream in list(self._pairs):
            client.abort()
            upstream.abort()
        self._pairs.clear()
        for client in list(self._connecting):
            client.abort()
        await asyncio.gather(*self._connecting.values(), return_exceptions=True)

    def _flow(self, on: bool) -> None:
        self.flowing = on
        for pair in self._pairs:
            for side in pair:
                side.flow(on)

    def _client(self) -> _Side:
        client = _Side(self)
        self._connecting[client] = asyncio.get_running_loop().create_task(self._connect(client))
        return client

    async def _connect(self, client: _Side) -> None:
        """Open ``client``'s upstream connection and start passing bytes both ways."""
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Side(self), *self.target)
        except OSError:
            client.abort()
            return
        finally:
            self._connecting.pop(client, None)
        if client.transport is None or client.transport.is_closing():  # gone meanwhile
            upstream.abort()
            return
        self.accepted += 1
        client.peer, upstream.peer = upstream, client
        self._pairs.add((client, upstream))
        client.flow(self.flowing)
        upstream.flow(self.flowing)

    def _lost(self, side: _Side) -> None:
        for pair in [pair for pair in self._pairs if side in pair]:
            self._pairs.discard(pair)
            for each in pair:
                each.abort()
        if side in self._connecting:  # the client left before its upstream was connected
            side.abort()
