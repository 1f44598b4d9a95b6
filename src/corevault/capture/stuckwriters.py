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

A writer given up also says what it waits on (:func:`note_mounts`): the FUSE mounts of its
walk to the volume's directory, or the directory's own once it is open, taken from the fd's
``mnt_id`` and the crashed process's mountinfo (no filesystem is asked), with whose dump it is.
The record is a root-only file under the state dir's :data:`MOUNTS`, locked for as long as the
writer waits. The agent (:mod:`corevault.agent.stuckvolumes`) aborts such a mount past the
dump's deadline when it is the pod's alone; the writer's request then fails, its thread ends
and its slots come back.
"""

from __future__ import annotations

import fcntl
import os
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


def note_mounts(settings: config.Settings, mounts: dict[bytes, bytes], whose: dict) -> int | None:
    """Record the FUSE mounts (``major:minor`` → mount point) a writer given up waits on, and
    ``whose`` dump it is (``pid``, ``comm``, ``exe``, ``pod``): the record's fd, locked, to be
    closed with the writer's slots when it ends; None when there is nothing to record.

    It is written under a hidden name and renamed once locked, so a record the agent lists is
    locked for as long as its writer waits (an unlocked one is a writer's that ended)."""
    if not mounts:
        return None
    d = os.path.join(settings.state_dir, MOUNTS)
    name = os.urandom(8).hex()
    fd = policy.open_state(d, f".{name}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = {
            "mounts": [
                [dev.decode(), point.decode(errors="backslashreplace")] for dev, point in mounts.items()
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
