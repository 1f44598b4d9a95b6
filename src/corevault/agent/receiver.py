"""The agent's end of corevault-forward: crashes handed over a Unix socket, captured warm.

On nodes without a Python for the kernel's pipe handler, the kernel runs the static
``corevault-forward`` (capture/forward.c), which passes the core's pipe, the crashed task's
pidfd and the kernel's arguments here. The capture itself is the pipe handler's own code
(:func:`corevault.capture.handler.capture`): one implementation, two ways in. Crashes are
handled in parallel, at most ``parallel`` at once. The forwarder exits once it has sent the
message: the core's pipe received here is the only reader left, so the kernel keeps /proc/%P
until the capture lets the process go (:func:`corevault.capture.stream.let_go`) and no longer.

The receiving process never dumps its own core (:func:`never_dump_into_self`): it would be
handed to itself, with no thread left to read it.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from corevault import atomic, config, hostsetup
from corevault.capture import handler
from corevault.pattern import SPECIFIERS

log = logging.getLogger("corevault.agent")
MAX_MESSAGE = 65536
#: The forwarded core's pipe keeps the kernel's default size. This thread shares the agent's
#: CPU with the dumping task: with a small pipe the task writes a little, wakes this thread and
#: waits, so the CPU it gives up goes to reading its core (as with the coredump socket, which
#: wakes the reader at every packet). With 1 MiB or more the task writes far ahead, sleeps on a
#: full pipe, and on a busy node this thread waits for a CPU alone. Measured with bench.socketmode
#: (a 256 MiB process, 2 cores): on a loaded machine 1.25-1.69x socket mode's time with 1 MiB (no
#: better with 4 or 16 MiB), 0.73-1.06x with 64 KiB; on a quiet one about 1.0x with either; the
#: CPU time 0.93-0.98x socket mode's with either (docs/capture.md).
FORWARDED_PIPE = 64 << 10


PR_SET_DUMPABLE = 4


def never_dump_into_self() -> None:
    """Make a crash of this process dump nothing, and print its Python stacks instead.

    The kernel dumps a crashing process through core_pattern, which here leads to this very
    process's socket: the coredump socket's, or this receiver's, to which the forwarder hands
    the core. By then every other thread of the process is gone (the kernel stops them before
    it dumps), so nobody accepts: measured on Linux 6.18, the dying process then waits in the
    kernel for ever (for our ``coredump_ack`` with ``@@``, for room in the socket with ``@``,
    for room in the forwarded pipe, which no thread reads) and only SIGKILL ends it, so a
    DaemonSet's restart never comes. A process that is not dumpable is skipped before the
    kernel connects anywhere (``suid_dumpable`` does not apply to ``PR_SET_DUMPABLE`` 0), and
    ends at once. Programs it starts are dumpable again (the kernel resets the flag at exec).
    What the core would have said of the agent, a Python program, its stacks say better:
    faulthandler writes them to stderr, the pod's log.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot make the crash listener non-dumpable: {os.strerror(err)}")
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def listen_root_only(path: str, backlog: int = 64) -> socket.socket:
    """A Unix stream socket at ``path`` that only root can connect to (a stale one is replaced)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by an agent that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # root only: whoever can connect can make the agent write files
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def accept_until(
    sock: socket.socket, stop: threading.Event, dispatch: Callable[[socket.socket], None]
) -> None:
    """Hand each connection to ``dispatch`` until ``stop`` is set or the socket is closed."""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        conn.settimeout(None)
        dispatch(conn)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The PID, UID and GID of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


#: the crashed processes (global PIDs) whose capture goes on in this process: how many each
_capturing: dict[int, int] = {}
_capturing_lock = threading.Lock()


@contextmanager
def capturing(pid: int | None) -> Iterator[None]:
    """Count ``pid``'s crash as being captured here until the block ends.

    The kernel lets a crashed process go once its core is read, and a forwarded crash's
    ``corevault-forward`` has exited by then, so nothing in ``/proc`` says its capture goes on (the
    binaries, the spool entry): the process-events watch asks :func:`captured_now` before it takes
    a death nobody journaled for a dump nobody captured.
    """
    if pid is None:
        yield
        return
    with _capturing_lock:
        _capturing[pid] = _capturing.get(pid, 0) + 1
    try:
        yield
    finally:
        with _capturing_lock:
            left = _capturing.pop(pid) - 1
            if left:
                _capturing[pid] = left


def captured_now(pids: set[int]) -> set[int]:
    """Which of ``pids`` this process is capturing the crash of now."""
    with _capturing_lock:
        return pids & _capturing.keys()


#: where the crashed process's PID in the initial namespace (%P) stands among the arguments
_GLOBAL_PID = SPECIFIERS.index("P")


class InFlight:
    """The connections accepted whose thread has not ended, and a wait until there are none.

    The kernel lets a crashed process go once its core is read; its capture goes on after
    (the binaries, the spool entry), so whoever looks at the spool right after a crash (tests,
    benches) waits here first.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def started(self) -> None:
        with self._idle:
            self._count += 1

    def ended(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every connection started so far has ended; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class Receiver:
    def __init__(
        self, settings: config.Settings, path: str, parallel: int = 8, pipe_size: int = FORWARDED_PIPE
    ) -> None:
        self.settings = settings
        self.path = path
        #: the buffer a forwarded core's pipe is given at least (bench.socketmode compares sizes)
        self.pipe_size = pipe_size
        self.slots = threading.BoundedSemaphore(parallel)
        self.stop = threading.Event()
        self.sock: socket.socket | None = None
        self.in_flight = InFlight()

    def listen(self) -> None:
        never_dump_into_self()
        self.sock = listen_root_only(self.path)

    def serve(self) -> None:
        """Accept crashes until stopped (call :meth:`listen` first)."""
        assert self.sock is not None
        accept_until(self.sock, self.stop, self._dispatch)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every crash handed over so far is captured to its end; False on timeout."""
        return self.in_flight.wait_idle(timeout)

    def _dispatch(self, conn: socket.socket) -> None:
        self.in_flight.started()
        self.slots.acquire()
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        if self.sock is not None:
            self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(10)
            pid, uid, _ = peer_credentials(conn)
            if uid != 0:  # only the kernel's handler, which runs as root, hands over crashes
                log.warning("refused a crash handed over by pid %d, uid %d: not root", pid, uid)
                return
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE + 4, 2)
            if len(data) < 4 or not fds:
                return
            (length,) = struct.unpack("=I", data[:4])
            while len(data) < 4 + length:
                more = conn.recv(4 + length - len(data))
                if not more:
                    return
                data += more
            args = [a.decode(errors="replace") for a in data[4 : 4 + length].split(b"\0")[:-1]]
            if len(args) != len(SPECIFIERS):
                log.warning("forwarded crash with %d arguments, not %d; ignored", len(args), len(SPECIFIERS))
                return
            args[-1] = str(fds[1]) if len(fds) > 1 else ""  # %F: the pidfd as it is numbered here
            crashed = args[_GLOBAL_PID]
            with capturing(int(crashed) if crashed.isdigit() else None):
                handler.capture(self.settings, args, fds[0], [], pipe_size=self.pipe_size)
        except Exception:
            log.exception("capturing a forwarded crash failed")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()
            self.slots.release()
            self.in_flight.ended()


def install_forwarder(settings: config.Settings, config_path: str | None, binary: str) -> Receiver:
    """Copy the forwarder into the agent's state (a hostPath), listen, point the kernel at it.

    Installing over an installation left by an agent that died keeps the host's original
    settings, so the next start repairs the host.
    """
    target, socket_path = hostsetup.forwarder_paths(settings.state_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(binary, "rb") as src, atomic.replacing(target, 0o700) as dst:  # the kernel runs it as root
        shutil.copyfileobj(src, dst)
    receiver = Receiver(settings, socket_path)
    receiver.listen()
    threading.Thread(target=receiver.serve, daemon=True, name="capture-receiver").start()
    return take_over(receiver, target, config_path, forward_to=receiver.path)


def take_over(server, handler: str | None, config_path: str | None, **where: object):  # -> server
    """Point core_pattern at a listening ``server`` (its ``path``); stop it if that fails."""
    try:
        state = hostsetup.install(handler, config_path=config_path, force=True, **where)  # type: ignore[arg-type]
    except BaseException:
        server.close()
        raise
    log.info("installed: core_pattern = %s", state["installed"]["core_pattern"])
    return server


def give_back(server) -> None:
    """Give the host its saved settings back, then stop listening."""
    hostsetup.uninstall(hostsetup.state_path(server.settings))
    server.close()
