"""A core's chunks handed to threads of their own, in order, in bounded memory.

The reading thread has to keep up with the kernel's pipe: the crashed process waits for it.
What costs more than reading -- compressing (~2 s/GiB at zstd level 3 here) and SHA-256
(~0.6 s/GiB with SHA-NI) -- runs on one thread per step, every step seeing every chunk in
the order read::

    reader ──put──▶ step 1 (thread) ──▶ step 2 (thread) ──▶ the buffer back to the pool

A data chunk is copied into one of :data:`POOL` buffers (a memcpy, ~0.1 s/GiB), and the
reader waits for a free one when all are in flight, so memory stays at ``POOL`` chunks
however large the core. A chunk of zeros travels as its length only: every step reads one
shared zero chunk. An all-zero stretch of a core therefore never waits for a buffer: the
reader drains the pipe at its own speed and the steps catch up after it (SHA-256 has no
shortcut for zeros; compression has, see :class:`corevault.capture.stream.ZstdSink`).

A step that raises is not called again and its error is kept (:attr:`Offload.errors`); the
other steps go on, so a hash still covers every chunk when the compressed copy hit its byte
budget. Built on ``_thread`` and ``_queue`` (C, already loaded): ``threading`` and ``queue``
would import ``functools``, ``collections`` and more on the crash path. A reader blocked in
:meth:`Offload.put` is still interrupted by signals (the handler's timeout).
"""

from __future__ import annotations

import _queue
import _thread

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable

    Step = Callable[[memoryview, bool], None]

#: data chunks in flight at most (each one chunk of the reader's size)
POOL = 4
_END = None


class Offload:
    """Chunks given to :meth:`put` go through ``steps`` (each ``step(view, zero)``), each on a thread."""

    def __init__(self, steps: list[Step], chunk: int, zero_chunk: bytes) -> None:
        self.steps = steps
        self.errors: list[BaseException | None] = [None] * len(steps)
        self.chunk = chunk
        self.zeros = memoryview(zero_chunk)
        self.free: _queue.SimpleQueue = _queue.SimpleQueue()
        self.made = 0  # buffers made so far: made on demand, at most POOL
        self.queues = [_queue.SimpleQueue() for _ in steps]
        self.done: _queue.SimpleQueue = _queue.SimpleQueue()
        self.running = len(steps)
        self.ended = [False] * len(steps)
        self.ending = False  # the end is queued
        self.aborted = False
        for i in range(len(steps)):
            _thread.start_new_thread(self._run, (i,))

    def put(self, view: memoryview, zero: bool) -> None:
        """Queue one chunk (``zero``: it is all zeros; nothing is copied then)."""
        n = len(view)
        if zero:
            self.queues[0].put((self.zeros[:n], True, None))
            return
        if self.made < POOL and self.free.empty():
            self.made += 1
            buf = bytearray(self.chunk)
        else:
            buf = self.free.get()
        buf[:n] = view
        self.queues[0].put((memoryview(buf)[:n], False, buf))

    def close(self, abort: bool = False) -> None:
        """Wait until every step has seen every chunk (``abort``: skip the work left); idempotent.

        Each thread marks itself ended before it says so: the handler's timeout may strike just
        after a ``done`` was taken and before it was counted, and the close that follows (with
        ``abort``) must not wait for a thread that ended already, for ever and with the pod's slots.
        """
        if self.running:
            self.aborted = self.aborted or abort
            if not self.ending:
                self.ending = True
                self.queues[0].put(_END)
            while not all(self.ended):
                self.done.get()
            self.running = 0

    def _run(self, i: int) -> None:
        step, inbox = self.steps[i], self.queues[i]
        after = self.queues[i + 1] if i + 1 < len(self.queues) else None
        try:
            while (item := inbox.get()) is not _END:
                if self.errors[i] is None and not self.aborted:
                    try:
                        step(item[0], item[1])
                    except BaseException as e:  # kept for the reader, which says it
                        self.errors[i] = e
                if after is not None:
                    after.put(item)
                elif item[2] is not None:
                    self.free.put(item[2])
        finally:
            if after is not None:
                after.put(_END)
            self.ended[i] = True
            self.done.put(i)
