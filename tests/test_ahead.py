"""Frames decompressed ahead of the send: in order, a bounded few at once, buffers reused only when
nothing views them any more, and a reader that leaves stops the work.

The jobs here stand for a seekable core's frames (:func:`corevault.vault.crashes.plain_frames`,
tested on a real core in ``test_seekable.py``): each fills the buffer it is given. The server's
side of it (a real uvicorn, a reader that hangs up midway) is at the end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corevault import config, seekable
from corevault.server import ahead
from corevault.server.access import Open
from corevault.server.app import create_app
from corevault.vault import blobs, catalog, stores
from testbed import servers


class Jobs:
    """``n`` jobs, the i-th filling its buffer with the byte i: which started, and when."""

    def __init__(self, n: int, size: int = 1 << 16, delay: float = 0.0) -> None:
        self.n, self.size, self.delay = n, size, delay
        self.started: list[int] = []
        self.done: list[int] = []
        self.lock = threading.Lock()

    def job(self, i: int) -> Callable[[bytearray], memoryview]:
        def run(buf: bytearray) -> memoryview:
            with self.lock:
                self.started.append(i)
            if len(buf) < self.size:
                buf = bytearray(self.size)
            time.sleep(self.delay)
            buf[: self.size] = bytes([i % 256]) * self.size
            with self.lock:
                self.done.append(i)
            return memoryview(buf)[: self.size]

        return run

    def all(self) -> list[Callable[[bytearray], memoryview]]:
        return [self.job(i) for i in range(self.n)]


def test_results_come_in_order_with_a_bounded_few_jobs_ahead() -> None:
    jobs = Jobs(40, delay=0.001)

    async def consume() -> list[int]:
        seen, ahead_of = [], []
        async for chunk in ahead.results(jobs.all(), depth=2):
            seen.append(chunk[0])
            ahead_of.append(len(jobs.started) - len(seen))  # started and not yet handed over
            await asyncio.sleep(0.002)  # a reader slower than the jobs
        return seen if max(ahead_of) <= 2 else []

    assert asyncio.run(consume()) == list(range(40))


def test_a_buffer_still_viewed_is_never_refilled() -> None:
    """What the transport has not yet written it holds as a view of the buffer: those bytes stay
    as they were while later frames are decompressed, and free buffers are reused."""
    jobs = Jobs(30)

    async def consume() -> tuple[int, set[int]]:
        held: list[tuple[int, memoryview]] = []
        buffers = set()
        async for chunk in ahead.results(jobs.all(), depth=2):
            buffers.add(id(chunk.obj))
            held.append((chunk[0], memoryview(chunk).cast("b")))  # as uvloop keeps unwritten bytes
            if len(held) > 3:
                held.pop(0)[1].release()  # written: let go
            for value, view in held:
                assert bytes(view) == bytes([value]) * len(view)
        return len(held), buffers

    held, buffers = asyncio.run(consume())
    assert held == 3 and len(buffers) < 30  # buffers went round


def test_a_failing_job_raises_where_its_result_would_be() -> None:
    def broken(buf: bytearray) -> memoryview:
        raise ValueError("a damaged frame")

    jobs = Jobs(5)

    async def consume() -> list[int]:
        seen = []
        with pytest.raises(ValueError, match="damaged"):
            async for chunk in ahead.results([jobs.job(0), jobs.job(1), broken, jobs.job(3)]):
                seen.append(chunk[0])
        return seen

    assert asyncio.run(consume()) == [0, 1]


def test_a_reader_that_leaves_stops_the_jobs_behind_it() -> None:
    """Closed after the first result: no job starts after that, and those in a thread finish."""
    jobs = Jobs(100, delay=0.01)

    async def leave() -> int:
        results = ahead.results(jobs.all(), depth=2)
        await anext(results)
        await results.aclose()
        return len(jobs.started)

    started = asyncio.run(leave())
    time.sleep(0.2)  # room for any job that should not run to start
    assert started <= 4 and len(jobs.started) == started
    deadline = time.monotonic() + 5
    while len(jobs.done) < len(jobs.started) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(jobs.done) == sorted(jobs.started)


def test_a_reader_that_hangs_up_mid_plain_core_stops_the_decompression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real server sends a 256 MiB plain core (64 frames) to a reader that takes a MiB and hangs
    up: the frames decompressed stop at what the socket's buffers held and a few ahead."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    size = 256 << 20
    packed = tmp_path / "core.zst"
    frames = []
    with open(packed, "wb") as f:
        import zstandard

        text = b"#1 handler(Request const&) at handler.cc:42\n" * 1000
        chunk = (text + bytes(seekable.FRAME_SIZE))[: seekable.FRAME_SIZE]
        one = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(chunk)
        for _ in range(size // seekable.FRAME_SIZE):
            f.write(one)
            frames.append((len(one), len(chunk)))
        f.write(seekable.seek_table(frames))
    stores.vault_store(settings).put_file(blobs.core_key("c1"), str(packed))
    engine = catalog.connect(settings.catalog_url)
    meta = {"id": "c1", "time": int(time.time()),
            "core": {"size": size, "stored_size": packed.stat().st_size, "sha256": "0" * 64}}  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "off")
    engine.dispose()
    unpacked: list[int] = []
    real = seekable.unpack_into

    def counted(frame: bytes, out: memoryview, decompressor: object = None) -> None:
        real(frame, out, decompressor)
        unpacked.append(len(out))

    monkeypatch.setattr(seekable, "unpack_into", counted)
    with servers.asgi(create_app(settings, Open())) as url, socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(b"GET /api/v1/crashes/c1/core HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while len(got) < 1 << 20:
            more = s.recv(1 << 16)
            assert more
            got += more
        assert b"200 OK" in got.split(b"\r\n", 1)[0] and got.partition(b"\r\n\r\n")[2].startswith(text)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
    left = -1
    for _ in range(40):  # until no frame more is decompressed for half a second (a loaded host)
        if len(unpacked) == left:
            break
        left = len(unpacked)
        time.sleep(0.5)
    assert len(unpacked) == left and 1 <= left <= 8, left  # of 64, and none more once it hung up
    assert os.path.exists(packed)
