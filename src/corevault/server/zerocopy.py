"""Files sent by the kernel (``sendfile``), not copied through Python: the ASGI zero-copy send.

ASGI's ``http.response.zerocopysend`` extension lets an application hand the server an open
file, an offset and a count instead of bytes. uvicorn (the server ``corevault serve`` runs)
does not offer it, so :func:`install` adds it to uvicorn's h11 protocol: the request cycle
announces the extension in the scope and answers the message with ``loop.sendfile``, which
is ``sendfile(2)`` on a plain TCP socket (and a read/write loop under TLS). h11 still frames
the body: it is told of the bytes without seeing them (``send_with_data_passthrough``).

Measured on this kind of machine (bench/server.py, a 256 MiB file from the page cache, curl
into /dev/null): see docs/server.md. What bounds it there is the loopback copy into curl.

uvicorn is pinned to one version (pyproject.toml); the test of downloads runs through this
path, so a uvicorn that changes the cycle it subclasses fails there first.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, BinaryIO

EXTENSION = "http.response.zerocopysend"


def sent(file: BinaryIO, offset: int) -> int:
    """How many bytes of ``file`` from ``offset`` a zero-copy send put on the wire: asyncio's
    sendfile leaves the file's position after the last byte sent, also when the reader left
    midway (and a send that never started leaves it where it was)."""
    return max(0, os.lseek(file.fileno(), 0, os.SEEK_CUR) - offset)


class _Unseen:
    """The body's length for h11's framing, in place of its bytes (which the kernel sends)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def install() -> None:
    """Offer the zero-copy send in uvicorn's h11 protocol of this process (idempotent)."""
    import h11
    from uvicorn.protocols.http import h11_impl

    base = h11_impl.RequestResponseCycle
    if getattr(base, "zerocopy", False):
        return

    class Cycle(base):  # type: ignore[misc, valid-type]
        zerocopy = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
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
                for piece in self.conn.send_with_data_passthrough(h11.Data(data=_Unseen(count))):  # type: ignore[arg-type]
                    if isinstance(piece, _Unseen):
                        try:
                            sent = await asyncio.get_running_loop().sendfile(
                                self.transport, message["file"], offset, count
                            )
                        except ConnectionError:
                            # the client went away meanwhile: nothing more to send, as uvicorn's
                            # own send has it (not an error of the application)
                            sent = -1
                        if sent < count:  # or the file is shorter than its record: a short body
                            self.transport.close()
                            self.disconnected = True
                            return
                    else:
                        self.transport.write(piece)
            if not message.get("more_body", False):
                await super().send({"type": "http.response.body", "body": b"", "more_body": False})

    h11_impl.RequestResponseCycle = Cycle  # type: ignore[misc]
