"""Writers stuck on a pod's volume: counted per pod, per namespace and per node, and bounded.

A write into a FUSE file whose request its server already took waits until the server answers
or the connection is aborted; no signal ends it, not even SIGKILL. A copy into a pod's volume
that made no progress for ``coresocket.STALL`` seconds is given up (:mod:`.volumecopy`), but
its thread cannot be ended: it stays, in the pipe handler's process (which cannot exit while
it waits) or in the agent, until the server answers. Each such thread holds one slot
(:func:`corevault.capture.policy.take_slot`, kind ``stuck``) of its pod, of its namespace and
of the node for as long as it waits: the slot is an ``flock`` on an fd that only the thread's
end closes (or, in a pipe handler, the process's end, which waits for the thread).

Before a dump opens its pod's volume it asks :func:`blocked`: a pod with a writer stuck on
its volume already, a namespace with ``namespace_dumps`` of them, or a node with
:data:`NODE_MAX` of them, gets no new writer: the copy into the volume is skipped at once and
said, and the core goes into the spool as always. A pod's writers are at most its dumps under
way when its first one got stuck (``pod_dumps``): every later dump skips the volume.

A writer given up also says what it waits on (:func:`note_mounts`): the FUSE mount of the fd
it holds deepest on its way to the volume's directory (or every FUSE mount at the directory or
above it, before it holds one), taken from the fd's ``mnt_id`` and the crashed process's
mountinfo; or, where that mountinfo cannot tell (the process was let go before the writer was
given up, or the pod unmounted the mount lazily while the writer walked), the held fd's own
device (:func:`held_device`), which names the connection (``/sys/fs/fuse/connections/N``) with
no mount point. No filesystem is asked anything. The record, with whose dump it is, is a
root-only file under the state dir's :data:`MOUNTS`, locked for as long as the writer waits
(in a pipe handler that exited meanwhile, by its stuck thread, which keeps the process's files
open). The agent (:mod:`corevault.agent.stuckvolumes`) aborts such a mount past the dump's
deadline when it is the pod's alone; the writer's request then fails, its thread ends and its
slots come back.

A record nobody holds locked is a writer's that ended (answered, or its connection aborted):
it means nothing any more. The agent removes those it sees at every pass; where no agent runs
(a pipe handler alone on a bare host) or it is down, :func:`sweep` removes them: every give-up
sweeps before it writes its own record (so the records are at most the writers stuck now and
those that ended since the last give-up: each stuck writer holds a slot, so a few), and the
state pruning (:mod:`.stateprune`) sweeps too.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from corevault import config, quickjson
from corevault.capture import policy

KIND = "stuck"
#: writers stuck on pods' volumes the node keeps at most (each a thread, and in pipe mode a
#: handler process that cannot exit: tens of MiB of memory each)
NODE_MAX = 8
_NODE = "node"
#: the state dir's directory of the records of what stuck writers wait on (:func:`note_mounts`)
MOUNTS = "stuck-mounts"
#: records removed by one :func:`sweep` at most
SWEEP_MAX = 64
#: seconds after which a hidden record (one being written) nobody holds is a writer's that died
#: between its creation and its rename
HIDDEN_IDLE = 60.0
_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000


def _bounds(settings: config.Settings, tenants: tuple[str | None, str | None]) -> list[tuple[str, int, str]]:
    pod, namespace = tenants
    bounds = [(pod, 1, "pod"), (namespace, settings.namespace_dumps, "namespace"), (_NODE, NODE_MAX, "node")]
    return [(key, share, whose) for key, share, whose in bounds if key is not None]


def blocked(settings: config.Settings, tenants: tuple[str | None, str | None]) -> str | None:
    """Why no new writer may open this pod's volume now, or None."""
    for key, share, whose in _bounds(settings, tenants):
        # a pod's writers are counted over its pod_dumps slots; one of them is enough to skip
        slots = settings.pod_dumps if whose == "pod" else share
        if policy.held_slots(settings.state_dir, key, slots, KIND, upto=share) >= share:
            what = (
                "a writer of an earlier dump of this pod is still stuck on its volume"
                if whose == "pod"
                else f"{share} writers are stuck on volumes of this {whose} already"
            )
            return (
                f"{what} (its filesystem stopped answering writes); the copy into the volume is skipped, "
                "the core is kept in the spool: repair that mount"
            )
    return None


def register(settings: config.Settings, tenants: tuple[str | None, str | None]) -> list[int]:
    """Count one more stuck writer: the locked fds, to be closed only when it ends.

    A level whose slots are all held counts it no further (its writers are bounded by the
    dumps under way when they got stuck, see the module's docstring); a slot only probed by
    :func:`blocked` at this instant is tried again.
    """
    held: list[int] = []
    for key, share, whose in _bounds(settings, tenants):
        slots = settings.pod_dumps if whose == "pod" else share
        for _ in range(3):
            fd = policy.take_slot(settings.state_dir, key, slots, KIND)
            if fd is not None:
                held.append(fd)
                break
            time.sleep(0.002)
    return held


def note_mounts(settings: config.Settings, mounts: dict[bytes, bytes | None], whose: dict) -> int | None:
    """Record the FUSE mounts (``major:minor`` → mount point, or None where no mountinfo named
    one) a writer given up waits on, and ``whose`` dump it is (``pid``, ``comm``, ``exe``,
    ``pod``): the record's fd, locked, to be closed with the writer's slots when it ends; None
    when there is nothing to record. The records of writers that ended are swept first.

    It is written under a hidden name and renamed once locked, so a record the agent lists is
    locked for as long as its writer waits (an unlocked one is a writer's that ended)."""
    if not mounts:
        return None
    d = os.path.join(settings.state_dir, MOUNTS)
    sweep(d)
    name = os.urandom(8).hex()
    fd = policy.open_state(d, f".{name}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = {
            "mounts": [
                [dev.decode(), point.decode(errors="backslashreplace") if point is not None else None]
                for dev, point in mounts.items()
            ],
            # CLOCK_MONOTONIC is the node's: the agent's passes count from it too
            "given_up": time.monotonic(),
            **whose,
        }
        os.write(fd, quickjson.dumps(doc).encode())
        os.rename(os.path.join(d, f".{name}"), os.path.join(d, name))
    except OSError:
        os.close(fd)
        return None
    return fd


def held(directory: str, name: str) -> int | None:
    """An fd of the record ``name`` of ``directory`` when its writer still holds it (waits); a
    record nobody holds is removed (its writer ended) and None returned, as for one gone.

    A hidden record (being written, locked only once created) is removed only when it was made
    more than :data:`HIDDEN_IDLE` ago; it is never returned."""
    fd, _ = _held_or_removed(directory, name)
    return fd


def _held_or_removed(directory: str, name: str) -> tuple[int | None, bool]:
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, False
    removed = False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        if not name.startswith("."):
            return fd, False
    else:
        # nobody holds it: a writer that ended never takes it again, so it may go (a hidden
        # one only once it is old: its writer may be about to lock it)
        if not name.startswith(".") or time.time() - os.fstat(fd).st_mtime > HIDDEN_IDLE:
            try:
                os.unlink(path)
                removed = True
            except FileNotFoundError:
                pass
    os.close(fd)
    return None, removed


def sweep(directory: str, limit: int = SWEEP_MAX) -> int:
    """Remove the records of ``directory`` that no writer holds, looking at ``limit`` of them at
    most; how many were removed. Records are few (see the module's docstring): the bound keeps a
    state dir that holds many for another reason cheap to the give-up that sweeps it."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names[:limit]:
        fd, gone = _held_or_removed(directory, name)
        if fd is not None:
            os.close(fd)
        removed += gone
    return removed


def held_device(fd: int) -> bytes | None:
    """``major:minor`` of the filesystem ``fd`` lies on (for a FUSE one, its connection's
    number: :func:`corevault.agent.stuckdumps.connection`), asking it nothing: ``statx`` with
    ``AT_STATX_DONT_SYNC`` and an empty mask, to which FUSE answers from the inode it has (and
    ``st_dev`` alone to a process it does not serve) where ``fstat`` may send it a request."""
    import ctypes  # only for a writer given up: never on a crash's path

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statx
    if libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, 0, buf) != 0:
        return None
    major = int.from_bytes(buf.raw[136:140], sys.byteorder)  # stx_dev_major, stx_dev_minor
    minor = int.from_bytes(buf.raw[140:144], sys.byteorder)
    return b"%d:%d" % (major, minor)
