"""The coredump socket transport: the kernel connects to us instead of starting a handler.

With ``core_pattern = @@/path`` (Linux 6.17+) the kernel connects to a listening AF_UNIX
socket from the crashing task, sends a ``coredump_req`` and waits for our
``coredump_ack``; only if we ask it to (``COREDUMP_KERNEL``) does it write the core to the
socket. So every decision that needs no byte of the core (the pod did not opt in, a crash
storm, no room in the spool, too many dumps at once) becomes a ``COREDUMP_REJECT``, and
the kernel dumps nothing: a rejected crash costs the node nothing and the process dies at
once. ``COREDUMP_WAIT`` keeps the task (and /proc/PID) until we close the connection, as
``core_pipe_limit`` does for pipes. With ``@/path`` (6.16) there is no request: the kernel
writes at once, and refusing means closing the connection.

A connection is proven to be the kernel's: its peer pidfd (``SO_PEERPIDFD``) must belong
to a task the kernel is dumping (``PIDFD_COREDUMPED``). Then the same code as the pipe
handler decides and writes (:mod:`.admission`, :mod:`.delivery`): one implementation of
facts, policy, sinks and safety, two transports. The kernel passes no specifier values; they are read from the
task and /proc, and the signal and crashing thread from the core's notes
(:mod:`.corehead`) before any target is named.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from corevault import config
from corevault.capture import admission, calloff, corehead, delivery, process, stream

SO_PEERPIDFD = 77
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20
COREDUMP_KERNEL, COREDUMP_USERSPACE, COREDUMP_REJECT, COREDUMP_WAIT = 1, 2, 4, 8
COREDUMP_MARK_REQACK = 0
MAX_REQUEST = 4096
#: seconds without a byte of the core after which a dump no longer holds the node-wide slots (a
#: pod may ask its file mappings into its core, with ``/proc/self/coredump_filter``, and serve the
#: file itself, then stop answering); the same rule gives a pod's volume up (:mod:`.volumecopy`)
STALL = stream.STALL


#: called when a read of the connection waited STALL seconds for nothing
Stalled = Callable[[], object] | None


class ProtocolError(Exception):
    pass


def _recv_exactly(conn: socket.socket, n: int, stalled: Stalled = None) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = conn.recv(n - len(data))
        except BlockingIOError:  # the receive timeout (STALL)
            if stalled is None:
                raise
            stalled()
            continue
        if not chunk:
            raise ProtocolError(f"the kernel closed the connection after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_request(conn: socket.socket, stalled: Stalled = None) -> int:
    """The kernel's ``coredump_req``; returns the features it offers (its mask)."""
    head = _recv_exactly(conn, 16, stalled)
    size, _size_ack, mask = struct.unpack("=IIQ", head)
    if not 16 <= size <= MAX_REQUEST:
        raise ProtocolError(f"coredump_req of {size} bytes")
    if size > 16:
        _recv_exactly(conn, size - 16, stalled)  # fields of newer kernels that we do not use
    return mask


def answer(conn: socket.socket, offered: int, accept: bool, stalled: Stalled = None) -> None:
    """Send ``coredump_ack`` and check the kernel's mark."""
    mask = COREDUMP_REJECT
    if accept:
        mask = COREDUMP_KERNEL | (COREDUMP_WAIT & offered)
    conn.sendall(struct.pack("=IIQ", 16, 0, mask))
    mark = struct.unpack("=I", _recv_exactly(conn, 4, stalled))[0]
    if mark != COREDUMP_MARK_REQACK:
        raise ProtocolError(f"the kernel refused our coredump_ack (mark {mark})")


def reject(conn: socket.socket, request_mode: bool) -> None:
    """Refuse a dump without looking at it (used when no worker is free)."""
    if request_mode:
        answer(conn, read_request(conn), accept=False)


class Gate(Protocol):
    """The listener's bound on dumps read at once (a semaphore)."""

    def acquire(self, blocking: bool = ...) -> bool: ...
    def release(self) -> None: ...


def serve(
    settings: config.Settings,
    conn: socket.socket,
    request_mode: bool,
    gate: Gate | None = None,
    call: calloff.Call | None = None,
) -> str:
    """Handle one kernel connection; returns what happened, for logs and tests.

    ``gate`` bounds the dumps read at once across tenants; it is asked only once the crash
    is admitted (its pod's and namespace's own shares are taken in :func:`.admission.admit`), so
    the cheap decisions of a flood never crowd out another tenant's crash. With ``call`` the
    dump may be called off from another thread (its deadline, :mod:`.calloff`), and the gate is
    given back through it as soon as the process is let go, or once the core stopped coming for
    ``STALL`` seconds; the pod's and namespace's slots
    stay held until this returns, so one pod never has more dumps at work than its share.
    """
    started, when = time.monotonic(), time.time()
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        admission.journal(
            settings, {"event": "error", "reason": f"coredump socket: no peer pidfd ({e.strerror})"}
        )
        return "error"
    try:
        return _serve(settings, conn, request_mode, pidfd, (started, when), gate=gate, call=call)
    finally:
        os.close(pidfd)


def _serve(
    settings: config.Settings,
    conn: socket.socket,
    request_mode: bool,
    pidfd: int,
    clock: tuple[float, float],
    *,
    gate: Gate | None,
    call: calloff.Call | None,
) -> str:
    started, when = clock
    record: dict = {"node": settings.node_name, "crash_time": int(when), "transport": "socket"}
    try:
        info = process.pidfd_info(pidfd)
    except process.ProcessGone as e:
        admission.journal(settings, {**record, "event": "refused", "reason": str(e)})
        return "refused"
    if not info.dumping:  # a process that connected by itself, not the kernel dumping one
        admission.journal(
            settings,
            {**record, "pid": info.pid, "event": "refused", "reason": "not a kernel coredump connection"},
        )
        return "refused"
    # With a deadline (``call``) a read waits STALL at most: the dump then gives the node-wide
    # slots back and reads on until its deadline; without one, the timeout set below ends it.
    stalled = call.give_back if call is not None else None
    if call is not None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", STALL, 0))
    offered = read_request(conn, stalled) if request_mode else 0
    crash = process.Crash(process.values_from_pidfd(pidfd, info, when))
    record.update(admission.new_record(settings, crash), transport="socket")
    try:
        process.open_process(crash, pidfd)
    except process.ProcessGone as e:
        admission.journal(settings, {**record, "event": "refused", "reason": str(e), "exe": crash.exe})
        if request_mode:
            answer(conn, offered, accept=False, stalled=stalled)
        return "refused"
    admitted = None
    gated = False
    try:
        process.read_facts(crash)
        admitted = admission.admit(settings, crash, record, [])
        if admitted is not None and admitted.plan.vault and admitted.plan.volume_path is None:
            full = admission.spool_full(settings, admitted.tenants)
            if full:
                admission.journal(settings, {**record, "event": "dropped", "reason": full})
                admitted.release()
                admitted = None
        if admitted is not None and gate is not None:
            gated = gate.acquire(False)
            if gated and call is not None:
                call.on_give_back(gate.release)
                gated = False  # given back through the call, at the let-go at the latest
            elif not gated:
                reason = (
                    "the node reads as many dumps as it may at once already; refused before it was written"
                )
                admission.journal(settings, {**record, "event": "dropped", "reason": reason})
                admitted.release()
                admitted = None
        if request_mode:
            answer(conn, offered, accept=admitted is not None, stalled=stalled)
        if admitted is None:
            return "rejected"
        if call is not None:
            call.record, call.stage = record, "read"
        with suppress(OSError):  # a bigger receive buffer: the kernel hands over more per wake-up
            conn.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        try:
            head = corehead.read_head(conn.fileno(), stalled)
        except Exception:
            if call is not None and call.reason is not None:
                return "called off"  # the deadline shut the connection, and journaled it
            raise
        _learn(crash, head)
        admitted.replan()
        if call is None:
            timeout = struct.pack("ll", int(settings.timeout), 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        try:
            delivery.deliver(admitted, conn.fileno(), started, head, call)
        except OSError as e:  # the receive timeout, or the kernel gave up
            if call is not None and call.reason is not None:
                return "called off"  # the deadline shut the connection, and journaled it
            admission.journal(
                settings, {**record, "event": "dropped", "reason": f"coredump socket: {e.strerror}"}
            )
            return "dropped"
        if call is not None and call.reason is not None:
            return "called off"
        return "captured"
    finally:
        if admitted is not None:
            admitted.release()
        if gated and gate is not None:
            gate.release()
        if call is not None:
            call.give_back()
        crash.close()


def _learn(crash: process.Crash, head: corehead.Head) -> None:
    """Fill in what only the core tells: the signal and the crashing thread."""
    if head.signal is not None:
        crash.signal = head.signal
        crash.values["s"] = str(head.signal)
    tid = head.tid if head.tid is not None else crash.pid
    crash.tid = tid
    crash.values["i"] = str(tid)
    crash.global_tid = _global_tid(crash, tid)
    crash.values["I"] = str(crash.global_tid)


def _global_tid(crash: process.Crash, ns_tid: int) -> int:
    """The host's id of the thread whose id in the task's namespace is ``ns_tid``."""
    if crash.pid == crash.global_pid:
        return ns_tid
    try:
        for entry in os.listdir(f"/proc/{crash.global_pid}/task"):
            with open(f"/proc/{crash.global_pid}/task/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:") and int(line.split()[-1]) == ns_tid:
                        return int(entry)
    except (OSError, ValueError):
        pass
    return crash.global_pid
