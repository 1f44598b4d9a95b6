"""The agent's coredump socket: where the kernel itself connects in socket mode.

Each connection is served on a thread of its own (:func:`corevault.capture.coresocket.serve`),
so a slow or huge dump never holds up another crash. Two bounds, so one tenant's flood never
costs another tenant its crash: deciding about a connection (whose crash, opted in, its
pod's and namespace's shares) is cheap, and up to ``DECIDING`` times ``parallel`` connections
are decided at once; reading a core is not, and at most ``parallel`` cores are read at once,
of which one pod holds at most ``pod_dumps``. A connection beyond either bound is rejected
at once (before the kernel writes anything) and journaled as dropped: under a flood, the
node stays responsive and loses the flood's cores rather than memory, disk or other pods'
cores. The socket is root-only; the kernel connects with its own credentials.

Both bounds are node-wide, and a connection gives its slots back as soon as the crashed process
is let go (its core read), or once its core stopped coming for ``coresocket.STALL`` seconds
(the kernel waits on a page of a file the pod serves itself): the work left (reading, hashing
and storing the binaries it mapped) reads the pod's own files, which the pod may serve itself
and never answer, and is bounded by the pod's and namespace's dump slots alone. Each connection
has a deadline, ``[capture] timeout`` from its start, as the pipe handler has: when it strikes
the dump is called off (:mod:`corevault.capture.calloff`), journaled as dropped under its pod,
its spool entry removed, the connection shut and the node-wide slots given back; a thread
blocked for good in a read keeps only its pod's slots, so a pod never has more such threads
than its share.

While the listener is down, a ``@@`` core_pattern makes the kernel dump nothing (the
connection fails and the process simply dies); docs/capture.md, "Socket mode", says how
the window is kept short.

The listening process never dumps its own core (:func:`never_dump_into_self`): by the time
the kernel connects, every thread of the dying process but the dumping one is gone, so
nothing would ever answer, and the process would wait on itself for ever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import suppress

from corevault import config, hostsetup
from corevault.agent.receiver import (
    InFlight,
    accept_until,
    capturing,
    listen_root_only,
    never_dump_into_self,
    peer_credentials,
    take_over,
)
from corevault.capture import admission, calloff, coresocket
from corevault.errors import UserError

log = logging.getLogger("corevault.agent")
#: connections decided at once, per core read at once
DECIDING = 8


class CoredumpListener:
    def __init__(
        self, settings: config.Settings, path: str, request_mode: bool = True, parallel: int = 8
    ) -> None:
        self.settings = settings
        self.path = path
        self.request_mode = request_mode
        self.parallel = parallel
        #: connections being decided or served
        self.slots = threading.BoundedSemaphore(parallel * DECIDING)
        #: cores being read
        self.dumps = threading.BoundedSemaphore(parallel)
        self.stop = threading.Event()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        #: outcomes by kind ("captured", "rejected", ...), for logs and tests
        self.outcomes: dict[str, int] = {}
        self._lock = threading.Lock()
        #: connections whose thread has not ended (one blocked for good included)
        self.in_flight = InFlight()

    def listen(self) -> CoredumpListener:
        never_dump_into_self()
        self.sock = listen_root_only(self.path, backlog=256)
        return self

    def start(self) -> CoredumpListener:
        self.thread = threading.Thread(target=self.serve, daemon=True, name="coredump-socket")
        self.thread.start()
        return self

    def serve(self) -> None:
        assert self.sock is not None
        accept_until(self.sock, self.stop, self._dispatch)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every connection accepted so far was served to its end; False on timeout."""
        return self.in_flight.wait_idle(timeout)

    def _ended(self) -> None:
        self.in_flight.ended()

    def _dispatch(self, conn: socket.socket) -> None:
        self.in_flight.started()
        if self.slots.acquire(blocking=False):
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name="coredump").start()
        else:
            threading.Thread(target=self._overflow, args=(conn,), daemon=True, name="coredump-full").start()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _handle(self, conn: socket.socket) -> None:
        call = calloff.Call(self.settings)
        call.on_give_back(self.slots.release)
        deadline = threading.Timer(self.settings.timeout, self._call_off, (call, conn))
        deadline.daemon = True
        deadline.start()
        try:
            with capturing(_peer_pid(conn)):
                outcome = coresocket.serve(self.settings, conn, self.request_mode, self.dumps, call)
            if outcome != "called off":  # counted when it was
                self._count(outcome)
        except Exception as e:
            log.exception("serving a kernel coredump connection failed")
            admission.journal(
                self.settings, {"event": "error", "reason": f"coredump socket: {type(e).__name__}: {e}"}
            )
            self._count("error")
        finally:
            deadline.cancel()
            deadline.join()  # a call-off under way shuts the connection: not once it is closed
            conn.close()
            call.give_back()
            self._ended()

    def _call_off(self, call: calloff.Call, conn: socket.socket) -> None:
        """The dump's deadline: call it off, let the process go, give the node-wide slots back.

        The thread serving it may be blocked for good (a read of the pod's file that never
        returns): it keeps only its pod's and namespace's slots, and publishes nothing if it
        ever comes back.
        """
        if call.call_off(self.settings.timeout):
            log.warning("a coredump was called off after [capture] timeout (%gs)", self.settings.timeout)
            self._count("called off")
        with suppress(OSError):  # wakes a read of the core; the kernel lets the process go
            conn.shutdown(socket.SHUT_RDWR)
        call.give_back()

    def _overflow(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            reason = (
                f"{self.parallel * DECIDING} coredump connections are being served already; "
                "refused before it was written"
            )
            admission.journal(self.settings, {"event": "dropped", "reason": reason, "transport": "socket"})
            self._count("overflow")
            coresocket.reject(conn, self.request_mode)
        except (OSError, coresocket.ProtocolError):
            self._count("error")
        finally:
            conn.close()
            self._ended()

    def close(self) -> None:
        """Stop accepting; when this returns, nothing listens on the path any more."""
        self.stop.set()
        if self.sock is not None:
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress
            if self.thread is not None:
                self.thread.join(5)
            self.sock.close()
        with suppress(FileNotFoundError):
            os.unlink(self.path)


def for_this_kernel(settings: config.Settings) -> CoredumpListener:
    """A listener on the state directory's socket, speaking the request protocol where the kernel has it."""
    requests = hostsetup.kernel_socket_mode() == "@@"
    return CoredumpListener(settings, hostsetup.socket_path(settings.state_dir), request_mode=requests)


def install(settings: config.Settings, config_path: str | None) -> CoredumpListener:
    """Listen on the state directory's coredump socket, then point core_pattern at it."""
    listener = for_this_kernel(settings).listen().start()
    return take_over(listener, None, config_path, socket=listener.path, requests=listener.request_mode)


def attend(settings: config.Settings, config_path: str | None) -> CoredumpListener:
    """Listen for a socket mode set by 'corevault install', taking it back from the pipe that stood in."""
    listener = for_this_kernel(settings).listen().start()
    if hostsetup.take_back(settings.state_dir, config_path):
        log.info("socket mode again: core_pattern = %s", hostsetup.read_sysctls()["core_pattern"])
    return listener


def step_aside(listener: CoredumpListener, config_path: str | None, handler: str) -> None:
    """Stop listening, first handing a socket-mode host over to the pipe handler (see :func:`attend`)."""
    try:
        if hostsetup.hand_over(listener.settings.state_dir, config_path, handler):
            log.info("the pipe handler captures until the agent is back")
    except UserError as e:
        log.warning("cannot hand over to the pipe handler (crashes are lost until the agent is back): %s", e)
    listener.close()


def _peer_pid(conn: socket.socket) -> int | None:
    """The crashing process's PID: the kernel connects on its behalf (coresocket checks that by
    its pidfd), so the connection's peer is that process."""
    try:
        pid = peer_credentials(conn)[0]
    except OSError:
        return None
    return pid if pid > 0 else None
