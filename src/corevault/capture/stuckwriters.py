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
"""

from __future__ import annotations

import time

from corevault import config
from corevault.capture import policy

KIND = "stuck"
#: writers stuck on pods' volumes the node keeps at most (each a thread, and in pipe mode a
#: handler process that cannot exit: tens of MiB of memory each)
NODE_MAX = 8
_NODE = "node"


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
