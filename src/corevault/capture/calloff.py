"""A dump that another thread may call off: socket mode's deadline.

The pipe handler's timer interrupts the handler itself (SIGALRM, :mod:`.handler`). The agent
serves each coredump connection on a thread and cannot interrupt one, and a thread blocked in
a read of a tenant's file cannot be interrupted at all: a FUSE server that stopped answering,
or a hard NFS mount whose server is gone, waits until the answer comes or a fatal signal,
which would end the agent. So the dump is called off from outside instead
(:meth:`Call.call_off`): journaled as dropped under its pod with the reason, its spool entry
removed, its node-wide slots given back; the thread, if its read ever returns, finds the call
at its next step and publishes nothing. Until then it holds its pod's and namespace's dump
slots, so one pod never has more such threads than its share.

One lock orders publishing against calling off, and it is never held across a tenant's I/O:
calling off never waits for a tenant.
"""

from __future__ import annotations

import _thread
import os

from corevault import config
from corevault.capture.admission import journal

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing
if TYPE_CHECKING:
    from collections.abc import Callable


def _empty(entry_tmp: str) -> None:
    """Cut the entry's files to nothing before they are removed.

    The thread still writing the entry holds them open (its copy of the core), and a thread
    blocked for good never closes them: removed, they would keep their blocks, as many as the
    pod's share let it write, on the spool's filesystem for as long as it waits, where the spool's
    accounting (a walk of its directories) no longer sees them: a few pods' cores of a namespace,
    called off one after the other, would take the room of every other tenant's next crash.
    """
    try:
        names = os.listdir(entry_tmp)
    except OSError:
        return
    for name in names:
        try:
            fd = os.open(
                os.path.join(entry_tmp, name), os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            continue  # a directory, or gone meanwhile
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)


class CalledOff(Exception):
    """The dump was called off meanwhile (journaled by whoever called it off)."""


class Call:
    """One dump's state as its deadline sees it."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.lock = _thread.allocate_lock()
        #: the crash's journal record once it was admitted (its pod and container)
        self.record: dict | None = None
        #: what the dump is doing, for the reason: "decided", "read", "let go"
        self.stage = "decided"
        #: the spool entry being written (removed when the dump is called off)
        self.entry_tmp: str | None = None
        #: the plain core's path in the pod's volume, once published there
        self.volume: str | None = None
        #: why it was called off, or None
        self.reason: str | None = None
        self.finished = False
        self._give_back: list[Callable[[], None]] = []

    def on_give_back(self, release: Callable[[], None]) -> None:
        """Run ``release`` once, when the node-wide slots are given back (:meth:`give_back`)."""
        with self.lock:
            self._give_back.append(release)

    def give_back(self) -> None:
        """Give the node-wide slots back: once the process is let go, called off, or served."""
        with self.lock:
            releases, self._give_back = self._give_back, []
        for release in releases:
            release()

    def check(self) -> None:
        if self.reason is not None:
            raise CalledOff(self.reason)

    def opened_entry(self, entry_tmp: str | None) -> None:
        with self.lock:
            self.entry_tmp = entry_tmp
        self.check()

    def publish(self, publish: Callable[[], None]) -> None:
        """Run ``publish`` (the spool entry's rename into ready/) unless the dump was called off."""
        with self.lock:
            self.check()
            publish()
            self.finished = True

    def finish(self) -> None:
        """The dump is done: calling it off now changes nothing; raises if it was called off."""
        with self.lock:
            self.check()
            self.finished = True

    def call_off(self, seconds: float) -> bool:
        """The deadline struck: journal the dump dropped and remove its spool entry, unless done."""
        with self.lock:
            if self.finished or self.reason is not None:
                return False
            where = {
                "decided": "before its core was read",
                "read": "while its core was read",
                "let go": "after the process was let go, while its binaries and copy were stored",
            }[self.stage]
            self.reason = (
                f"coredump socket: the dump outlasted [capture] timeout ({seconds:g}s) {where}; "
                "nothing of it is kept in the spool. A file of the pod that does not answer (its "
                "executable or a library on a FUSE or network filesystem whose server stopped) "
                "holds it: repair that mount; for larger cores or binaries raise [capture] timeout"
            )
            tmp, self.entry_tmp = self.entry_tmp, None
            if tmp is not None:
                # imported here: shutil brings re, enum, fnmatch, bz2 and lzma with it, and the pipe
                # handler imports this module (delivery does) on every crash, where it is never used
                import shutil

                _empty(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
            record = {**(self.record or {"transport": "socket"}), "event": "dropped", "reason": self.reason}
            if self.volume is not None:
                record["volume"] = self.volume
        journal(self.settings, record)
        return True
