"""Work run ahead of the response that sends it: a seekable core's frames decompressed in worker
threads while the frames before them go out, in order, a few at a time.

A plain core is the stored one decompressed as it is sent. Done in turn (read a chunk in a worker
thread, hop back to the event loop, send it, wait for the socket to drain, hop again), the
download took the time of decompressing plus the time of sending. A seekable core's frames are
independent (:mod:`corevault.seekable`), so :func:`results` keeps the next :data:`DEPTH` frames
decompressing in a small pool of threads (zstandard lets go of the GIL while it works) while the
event loop sends the one before them: the download takes about the longer of the two, and on two
cores or more the frames themselves are decompressed two at once.

Bounds:

- memory: per download at most :data:`DEPTH` frames in work, the one being sent and :data:`DEPTH`
  buffers sent or still being written (a frame is 4 MiB of plain bytes), whatever the core's
  size; between downloads :data:`SPARE` buffers are kept;
- CPU: one pool of as many threads as the host has CPUs serves every download; its queue is
  first come, first served, and a download never queues more than :data:`DEPTH` frames, so one
  reader's download cannot hold back another's by more than that;
- a reader that goes away: the generator is closed (or cancelled), every frame not yet started
  is dropped, and only those already in a thread finish (one frame each, a few milliseconds).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import os
from collections.abc import AsyncGenerator, Callable, Iterable

#: frames in work per download beyond the one being sent
DEPTH = 2


@functools.cache
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The pool, made on the first download (not at import)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="corevault-frames"
    )


#: buffers kept between downloads (each a frame, 4 MiB): their pages are faulted in once
SPARE = 4
_SPARE: list[bytearray] = []


def _spare() -> bytearray:
    """A buffer kept from an earlier download, or a new one (which its job sizes)."""
    try:
        return _SPARE.pop()
    except IndexError:  # none (checked in one step: servers of other threads share the list)
        return bytearray()


#: a job: fills the buffer it is given (or a larger one of its own) and returns the view of it
#: to send
Job = Callable[[bytearray], memoryview]


def _unshared(buf: bytearray) -> bool:
    """Whether no view of ``buf`` is alive any more: the server's transport holds one of what it
    has not yet written to the socket, and a buffer is refilled only once that is gone. Python
    refuses to resize a buffer that something still views."""
    try:
        buf.append(0)
    except BufferError:
        return False
    buf.pop()
    return True


async def results(jobs: Iterable[Job], depth: int = DEPTH) -> AsyncGenerator[memoryview, None]:
    """Each job's result, in order, the jobs run in worker threads up to ``depth`` ahead of the one
    whose result the caller holds. A job's exception is raised where its result would be.

    The buffers go round: the one whose view the caller held is given to a later job once nothing
    views it any more (the transport has written it all: the next send waits for that), else a
    new one is made, and no more than ``depth`` buffers wait so.
    Allocating a fresh 4 MiB per frame cost more than decompressing it: with two threads at
    work, glibc gave most of that memory back to the kernel and took it again, 50,000 page faults
    per 256 MiB core (docs/server.md)."""
    pool, waiting = _executor(), iter(jobs)
    running: collections.deque[concurrent.futures.Future[memoryview]] = collections.deque()
    lent: list[bytearray] = []  # buffers of results given out, perhaps still being written

    def fill() -> None:
        while len(running) < depth and (job := next(waiting, None)) is not None:
            free = next((i for i, buf in enumerate(lent) if _unshared(buf)), None)
            running.append(pool.submit(job, lent.pop(free) if free is not None else _spare()))
        del lent[: max(0, len(lent) - depth)]  # the oldest still viewed are left to the collector

    try:
        fill()
        while running:
            # a cancelled wait cancels the job it waits for too (asyncio chains the two)
            chunk = await asyncio.wrap_future(running.popleft())
            fill()  # before the chunk goes out, so that the next ones decompress meanwhile
            held = chunk.obj
            yield chunk
            # the caller is done with the view it was given (it asked for the next one), though
            # its variables may still name it: released, it no longer holds the buffer
            try:
                chunk.release()
            except BufferError:  # something took a buffer of the view itself: leave both be
                continue
            if isinstance(held, bytearray):
                lent.append(held)
    finally:
        for future in running:
            future.cancel()
        # kept for the next download, up to a few
        for buf in lent:
            if len(_SPARE) < SPARE and _unshared(buf):
                _SPARE.append(buf)
