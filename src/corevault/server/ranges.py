"""Streaming a stored object over HTTP, whole or one byte range of it (RFC 9110, section 14).

The caller opens the object at the range's start: a plain file seeks there, a core in the
zstd seekable format decompresses only the frames that hold the range, each in a worker thread
ahead of the send (:func:`corevault.vault.crashes.plain_frames`, :mod:`.ahead`), and an older
single-frame core is decompressed from its start and the bytes before the range discarded
(:func:`corevault.vault.crashes.plain_range`). One range per
request; a request for several gets the whole object (which RFC 9110 allows). A plain file
is sent by the kernel where the server can (:mod:`.zerocopy`), and counted for what was sent.
:func:`accepts` reads ``Accept-Encoding``, for objects that can go out as they are stored.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import BinaryIO

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from corevault.server import ahead, zerocopy

CHUNK = 4 << 20


class Unsatisfiable(Exception):
    """The range starts at or after the end (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single ``bytes=`` range, or None to send everything."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[len("bytes=") :].strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # the last N bytes
            n = int(last)
            if n <= 0:
                raise Unsatisfiable
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise Unsatisfiable
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def accepts(header: str | None, coding: str) -> bool:
    """Whether an ``Accept-Encoding`` header takes ``coding`` (named, with a weight above 0)."""
    for item in (header or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() != coding:
            continue
        weight = params.strip().lower()
        if not weight.startswith("q="):
            return True
        try:
            return float(weight[2:]) > 0
        except ValueError:
            return False
    return False


def serve(
    request: Request,
    opener: Callable[[int, int], BinaryIO],
    size: int,
    *,
    filename: str,
    etag: str | None = None,
    media_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
    counted: Callable[[int], None] | None = None,
    local: str | None = None,
    frames: Callable[[int, int], list[ahead.Job] | None] | None = None,
) -> Response:
    """The object of ``size`` bytes as a 200, or a 206 for a Range request; ``opener(start, end)``
    opens it at ``start`` for the bytes up to ``end`` (inclusive). ``local``: the object is
    this plain file, which the kernel sends where the server can (:mod:`.zerocopy`).
    ``frames(start, end)``: the same bytes as jobs, one per frame, that run ahead of the sending
    (:mod:`.ahead`); where it gives None, the object is read from ``opener``."""
    base = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
        **(headers or {}),
    }
    if etag:
        base["ETag"] = f'"{etag}"'
    span = None
    if_range = request.headers.get("if-range")
    if not if_range or (etag and if_range.strip('"') == etag):
        try:
            span = parse_range(request.headers.get("range"), size)
        except Unsatisfiable:
            return Response(status_code=416, headers={**base, "Content-Range": f"bytes */{size}"})
    start, end = span if span else (0, size - 1)
    length = end - start + 1
    base["Content-Length"] = str(length)
    status = 200
    if span:
        status = 206
        base["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=base, media_type=media_type)

    jobs = frames(start, end) if frames is not None else None
    if jobs is not None:
        return StreamingResponse(
            _counted(ahead.results(jobs), counted), status_code=status, headers=base, media_type=media_type
        )

    def body() -> Iterator[bytes]:
        with opener(start, end) as f:
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    return  # the object is shorter than its record: the client sees a short body
                left -= len(chunk)
                yield chunk
                # counted once sent: a reader that leaves stops the stream, and what it never
                # got is not counted as served
                if counted is not None:
                    counted(len(chunk))

    streamed = StreamingResponse(body(), status_code=status, headers=base, media_type=media_type)
    if local is None:
        return streamed
    # opened here, where the handler runs, not by another hop from the event loop
    return _Sendfile(open(local, "rb"), start, length, streamed, counted)


async def _counted(
    chunks: AsyncGenerator[memoryview, None], counted: Callable[[int], None] | None
) -> AsyncIterator[memoryview]:
    """``chunks``, each counted once sent (as the streamed body counts them); closing this closes
    ``chunks`` at once, so that a reader that leaves stops the work behind them."""
    try:
        async for chunk in chunks:
            yield chunk
            if counted is not None:
                counted(len(chunk))
    finally:
        await chunks.aclose()


class _Sendfile(Response):
    """``file``'s bytes ``start``.. (``length`` of them) sent by the kernel when the server offers
    the zero-copy send; otherwise the ``streamed`` response. Either way ``file`` is closed."""

    def __init__(
        self,
        file: BinaryIO,
        start: int,
        length: int,
        streamed: StreamingResponse,
        counted: Callable[[int], None] | None,
    ) -> None:
        self.file, self.start, self.length = file, start, length
        self.streamed, self.counted = streamed, counted
        self.status_code, self.raw_headers = streamed.status_code, streamed.raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        f = self.file
        try:
            if zerocopy.EXTENSION not in scope.get("extensions", {}):
                await self.streamed(scope, receive, send)
                return
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            await send({"type": zerocopy.EXTENSION, "file": f, "offset": self.start, "count": self.length})
            if self.counted is not None:
                self.counted(zerocopy.sent(f, self.start))
        finally:
            f.close()
