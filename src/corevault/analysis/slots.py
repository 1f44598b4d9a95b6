"""Analysis slots: a uid of its own for each analysis running at once, and a bound on its processes.

An analysis that a core took over can fork without end. ``RLIMIT_NPROC`` bounds that, but
the kernel counts it per real uid: under one uid shared by every analysis, one analysis's
fork bomb takes the processes every other analysis (and the template that forks them)
needs. So each analysis running at once holds a **slot**, a uid of a fixed range
(``[agent] analysis_uid`` and the ``analysis_uids - 1`` uids after it), used by that
analysis alone, with ``RLIMIT_NPROC`` (``[agent] analysis_processes``) set before the
sandbox drops to it. A fork bomb then fills its own slot and no other: the node's
processes it can take are ``analysis_uids * analysis_processes`` at most, and another
tenant's analysis, in another slot, forks as if it were alone.

A slot is taken for a whole analysis (the core's copy is made readable to the slot's own
group, and to no other slot's) and given back only once no process of the analysis is
left: its PID namespace is gone. The kernel reaps a PID namespace's PID 1 only after every
other process in it, so an analysis that ended (the template's keeper reaped it, or
bubblewrap its own PID 1) proves it; one that was killed (its time was up, it wrote too
much, its keeper never said it ended) is :func:`suspect`, and its slot is given back only
once ``/proc`` shows none of its uid's processes in the agent's cgroups outside its
template (a pod's processes of that uid are elsewhere).
Slots are held across processes too (the agent and a ``corevault analyze`` run by root
on the same node): each is a ``flock`` on a file under :data:`LOCK_DIR`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator

#: uids in the range, from ``[agent] analysis_uid`` on: analyses that may run at once
DEFAULT_COUNT = 32
#: processes and threads of one analysis, its template and keeper included: drgn and gdb
#: start a thread per core, addr2line and c++filt run beside them
DEFAULT_PROCESSES = 256
LOCK_DIR = "/run/corevault/analysis-slots"

log = logging.getLogger("corevault.analysis")


class NoSlot(Exception):
    """No slot came free before the analysis's time was up."""


_cond = threading.Condition()
_held: set[int] = set()
#: slots whose last analysis was killed: checked in /proc before they are given back
_suspects: dict[int, str | None] = {}


def _try_lock(uid: int) -> int | None:
    """The slot's lock file, locked for this process, or None if another process holds it."""
    try:
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:  # no /run to write: slots are this process's alone
        log.debug("analysis slot locks unavailable (%s): held in this process only", e)
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def held(base: int, count: int, deadline: float) -> Iterator[int]:
    """A free uid of ``base .. base + count - 1`` for the caller alone, until the block ends;
    :class:`NoSlot` when none came free before ``deadline`` (monotonic).

    Not root: the caller's own uid is what the sandbox keeps, and there is nothing to share."""
    if os.geteuid() != 0:
        yield base
        return
    uid, lock = _take(base, max(count, 1), deadline)
    try:
        yield uid
    finally:
        _give_back(uid, lock)


def _take(base: int, count: int, deadline: float) -> tuple[int, int]:
    with _cond:
        while True:
            # the lowest free one: the slots in use keep their templates warm
            for uid in range(base, base + count):
                if uid in _held:
                    continue
                lock = _try_lock(uid)
                if lock is not None:
                    _held.add(uid)
                    return uid, lock
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoSlot(f"all {count} analysis uids from {base} were busy")
            # another process's slot frees without a notify here: look again now and then
            _cond.wait(min(left, 0.2))


def suspect(uid: int, spared_ns: str | None) -> None:
    """The analysis in slot ``uid`` was killed and the end of its processes is not proven:
    the slot is given back only once ``/proc`` shows none of them left, but for those in
    ``spared_ns``, the PID namespace of the slot's template and its keepers."""
    with _cond:
        _suspects[uid] = spared_ns


def _give_back(uid: int, lock: int) -> None:
    """Free ``uid`` for the next analysis, once its processes are gone where that is in doubt."""

    def free() -> None:
        with _cond:
            _suspects.pop(uid, None)
            if lock >= 0:
                os.close(lock)
            _held.discard(uid)
            _cond.notify()

    with _cond:
        doubt = uid in _suspects
        spared = _suspects.get(uid)
    if not doubt or not stragglers(uid, spared):
        free()
        return
    log.info("analysis uid %d: waiting for the processes of a stopped analysis to end", uid)

    def watch() -> None:
        while stragglers(uid, spared):
            time.sleep(0.1)
        free()

    threading.Thread(target=watch, name=f"analysis-slot-{uid}", daemon=True).start()


def _cgroups(pid: str) -> bytes:
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        return f.read()


def stragglers(uid: int, spared_ns: str | None = None) -> list[int]:
    """This process's analysis processes whose real uid is ``uid``, but for those in the PID
    namespace ``spared_ns`` (a template's own, where it and its keepers live).

    Its analyses are those in its own cgroups, where they start and whence they cannot move
    (no capability, no cgroupfs in their sandbox). A process of the uid elsewhere is not
    one: any pod may run as an analysis uid, and counting its processes would keep a
    killed analysis's uid from coming back for as long as the pod runs."""
    found = []
    own = _cgroups("self")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                uids = next(line for line in f if line.startswith(b"Uid:")).split()
            if int(uids[1]) != uid or _cgroups(name) != own:
                continue
            if spared_ns is not None and os.readlink(f"/proc/{name}/ns/pid") == spared_ns:
                continue
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # gone meanwhile
        found.append(int(name))
    return found
