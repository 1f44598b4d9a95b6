"""Files sent by the kernel (``sendfile``), not copied through Python: the ASGI zero-copy send.

ASGI's ``http.response.zerocopysend`` extension lets an application hand the server an open
file, an offset and a count instead of bytes. uvicorn (the server ``corevault serve`` runs)
does not offer it, so :func:`install` adds it to both of uvicorn's HTTP protocols: httptools
(what uvicorn takes when it is installed, as ``corevault serve`` does) and h11 (the pure-Python
fallback). The request cycle announces the extension in the scope of a plain TCP connection
(under TLS the kernel cannot send the file: the response is streamed through Python instead)
and answers the message with :func:`send_file`:

- on asyncio's own loop, ``loop.sendfile``, which is ``sendfile(2)``;
- on uvloop (what uvicorn takes when it is installed), which has no ``loop.sendfile``,
  ``os.sendfile`` on a duplicate of the connection's descriptor, waiting for room in the
  socket's buffer on that duplicate: libuv watches the original for the transport (and one
  descriptor may be watched only once), and the duplicate names this connection's socket even
  if the transport closes its own descriptor meanwhile.

The protocol frames the body as for any other: h11 is told of the bytes without seeing them
(``send_with_data_passthrough``), httptools' cycle counts them against the Content-Length.

Measured on this kind of machine (bench/server.py): see docs/server.md. uvicorn is pinned to one
version (pyproject.toml); the tests of downloads run through both protocols, so a uvicorn that
changes the cycles this subclasses fails there first.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, BinaryIO

EXTENSION = "http.response.zerocopysend"


def sent(file: BinaryIO, offset: int) -> int:
    """How many bytes of ``file`` from ``offset`` a zero-copy send put on the wire: the send
    leaves the file's position after the last byte sent, also when the reader left midway (and
    a send that never started leaves it where it was)."""
    return max(0, os.lseek(file.fileno(), 0, os.SEEK_CUR) - offset)


async def send_file(transport: asyncio.Transport, file: BinaryIO, offset: int, count: int) -> int:
    """``count`` bytes of ``file`` from ``offset`` sent by the kernel on ``transport`` (plain TCP,
    its write buffer flushed or flushing); how many went out. Raises ConnectionError when the
    reader went away."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.BaseEventLoop):
        return await loop.sendfile(transport, file, offset, count)
    return await _send_by_descriptor(loop, transport, file, offset, count)


async def _send_by_descriptor(
    loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, file: BinaryIO, offset: int, count: int
) -> int:
    """``os.sendfile`` on the transport's own (non-blocking) socket, for loops without
    ``loop.sendfile`` (uvloop); the file's position is left after the last byte sent."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():  # as asyncio's loop.sendfile answers then
        raise ConnectionError("the connection was closed")
    watched = os.dup(sock.fileno())  # see the module's docstring
    reading = transport.is_reading()
    transport.pause_reading()
    total = 0
    try:
        while transport.get_write_buffer_size():  # the headers, when the socket was full
            await _writable(loop, watched)
        while total < count:
            # on the duplicate: it names this connection's socket even if the transport closed
            # its own descriptor meanwhile (whose number another connection may then hold)
            if transport.is_closing():
                raise ConnectionError("the connection was closed")
            try:
                n = os.sendfile(watched, file.fileno(), offset + total, count - total)
            except BlockingIOError:
                await _writable(loop, watched)
                continue
            if n == 0:  # the file is shorter than it was said to be
                break
            total += n
        return total
    finally:
        os.close(watched)
        os.lseek(file.fileno(), offset + total, os.SEEK_SET)
        if reading and not transport.is_closing():
            transport.resume_reading()


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until the socket of ``fd`` has room (or an error to report on the next send)."""
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)


class _Unseen:
    """The body's length for h11's framing, in place of its bytes (which the kernel sends)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def install() -> None:
    """Offer the zero-copy send in uvicorn's HTTP protocols of this process (idempotent)."""
    from uvicorn.protocols.http import h11_impl

    h11_impl.RequestResponseCycle = _with_zerocopy(h11_impl.RequestResponseCycle, _h11_frame)  # type: ignore[misc]
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # httptools is not installed: uvicorn runs h11
        return
    httptools_impl.RequestResponseCycle = _with_zerocopy(  # type: ignore[misc]
        httptools_impl.RequestResponseCycle, _httptools_frame
    )


def _with_zerocopy(base: Any, frame: Any) -> Any:
    """uvicorn's request cycle ``base`` answering the zero-copy send; ``frame(cycle, count)``
    gives what goes on the wire before and after ``count`` bytes of body (a chunk's header and
    end when chunked, else nothing) and counts them against the response's length."""
    from uvicorn.protocols.utils import is_ssl

    if getattr(base, "zerocopy", False):
        return base

    class Cycle(base):  # type: ignore[misc, valid-type]
        zerocopy = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not is_ssl(self.transport):
                self.scope.setdefault("extensions", {})[EXTENSION] = {}

        async def send(self, message: Any) -> None:
            if message["type"] != EXTENSION:
                await super().send(message)
                return
            if not self.response_started or self.response_complete:
                raise RuntimeError(f"unexpected ASGI message {EXTENSION!r} outside a response body")
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            count, offset = message["count"], message.get("offset") or 0
            if self.scope["method"] != "HEAD" and count:
                before, after = frame(self, count)
                if before:
                    self.transport.write(before)
                try:
                    done = await send_file(self.transport, message["file"], offset, count)
                except ConnectionError:
                    # the client went away meanwhile: nothing more to send, as uvicorn's own
                    # send has it (not an error of the application)
                    done = -1
                if done < count:  # or the file is shorter than its record: a short body
                    self.transport.close()
                    self.disconnected = True
                    return
                if after:
                    self.transport.write(after)
            if not message.get("more_body", False):
                await super().send({"type": "http.response.body", "body": b"", "more_body": False})

    return Cycle


def _h11_frame(cycle: Any, count: int) -> tuple[bytes, bytes]:
    """h11's framing of ``count`` bytes that it is told of without seeing them."""
    import h11

    pieces = list(cycle.conn.send_with_data_passthrough(h11.Data(data=_Unseen(count))))
    at = next(i for i, piece in enumerate(pieces) if isinstance(piece, _Unseen))
    return b"".join(pieces[:at]), b"".join(pieces[at + 1 :])


def _httptools_frame(cycle: Any, count: int) -> tuple[bytes, bytes]:
    """The framing of ``count`` bytes as uvicorn's httptools cycle frames a body it is given."""
    if cycle.chunked_encoding:
        return b"%x\r\n" % count, b"\r\n"
    if count > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    cycle.expected_content_length -= count
    return b"", b""
