"""Chunks handed to threads in order: zeros never wait for a buffer, a failing step stops alone."""

from __future__ import annotations

import _thread
import os
import time
from typing import Any

import pytest

from corevault.capture import offload

CHUNK = 64 << 10
ZEROS = bytes(CHUNK)


class Recording:
    """A step that records what it saw (its length, zero flag and first byte), optionally gated."""

    def __init__(self, gate: _thread.LockType | None = None, fail_at: int | None = None) -> None:
        self.seen: list[tuple[int, bool, bytes]] = []
        self.gate = gate
        self.fail_at = fail_at

    def __call__(self, view: memoryview, zero: bool) -> None:
        if self.gate is not None:
            with self.gate:
                pass
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.seen.append((len(view), zero, bytes(view)))


def test_every_step_sees_every_chunk_in_order_and_data_chunks_are_copies() -> None:
    first, second = Recording(), Recording()
    work = offload.Offload([first, second], CHUNK, ZEROS)
    chunks = [os.urandom(CHUNK) if i % 3 else ZEROS for i in range(20)] + [b"tail"]
    buf = bytearray(CHUNK)
    for data in chunks:
        buf[: len(data)] = data
        work.put(memoryview(buf)[: len(data)], data == ZEROS)
        buf[:] = bytes(CHUNK)  # the reader reuses its buffer at once
    work.close()
    want = [(len(d), d == ZEROS, d) for d in chunks]
    assert first.seen == want and second.seen == want
    assert work.errors == [None, None] and work.made <= offload.POOL


def test_zero_chunks_never_wait_for_a_slow_step_and_data_chunks_wait_for_a_buffer() -> None:
    """The reader drains an all-zero stretch at its own speed; data is bounded by the pool."""
    gate = _thread.allocate_lock()
    gate.acquire()  # the step is stuck until released
    step = Recording(gate)
    work = offload.Offload([step], CHUNK, ZEROS)
    zero = memoryview(ZEROS)
    for _ in range(10_000):  # 625 MiB of zeros go past a step that has taken none of them
        work.put(zero, True)
    data = memoryview(os.urandom(CHUNK))
    for _ in range(offload.POOL):
        work.put(data, False)
    assert work.made == offload.POOL and work.free.empty()  # one more data chunk would wait
    assert step.seen == []
    gate.release()
    work.close()
    assert len(step.seen) == 10_000 + offload.POOL
    assert all(z for _, z, _ in step.seen[:10_000]) and step.seen[-1] == (CHUNK, False, bytes(data))


def test_a_failing_step_stops_alone_and_says_why() -> None:
    failing, after = Recording(fail_at=2), Recording()
    work = offload.Offload([failing, after], CHUNK, ZEROS)
    for i in range(6):
        work.put(memoryview(bytes([i + 1]) * CHUNK), False)
    work.close()
    assert isinstance(work.errors[0], OSError) and work.errors[1] is None
    assert len(failing.seen) == 2 and [s[2][0] for s in after.seen] == [1, 2, 3, 4, 5, 6]


def test_closing_with_abort_skips_the_work_left() -> None:
    gate = _thread.allocate_lock()
    gate.acquire()
    step = Recording(gate)
    work = offload.Offload([step], CHUNK, ZEROS)
    for _ in range(3):
        work.put(memoryview(ZEROS), True)
    _thread.start_new_thread(lambda: work.close(abort=True), ())
    while not work.aborted:  # the abort is marked before close waits for the threads
        time.sleep(0.001)
    gate.release()
    while work.running:
        time.sleep(0.001)
    assert len(step.seen) <= 1  # at most the chunk it was in when the abort came


def test_a_timeout_that_strikes_once_a_thread_said_it_ended_leaves_nothing_to_wait_for() -> None:
    """The handler's timer may strike just after close took a thread's word that it ended and
    before it was counted; the close that follows (with abort, as the handler's cleanup does)
    returns instead of waiting for a word that will never come, and the handler with it."""

    class Timeout(Exception):
        pass

    class StruckAfterGet:
        def __init__(self, inner: Any) -> None:
            self.inner, self.struck = inner, False
            self.put = inner.put

        def get(self) -> object:
            item = self.inner.get()
            if not self.struck:
                self.struck = True
                raise Timeout  # as a signal handler raises, between the get and what follows
            return item

    work = offload.Offload([Recording(), Recording()], CHUNK, ZEROS)
    work.put(memoryview(ZEROS), True)
    work.done = StruckAfterGet(work.done)
    with pytest.raises(Timeout):
        work.close()
    closed = _thread.allocate_lock()
    closed.acquire()
    _thread.start_new_thread(lambda: (work.close(abort=True), closed.release()), ())
    assert closed.acquire(timeout=10), "the second close waits for a thread that ended already"
    assert work.running == 0
