"""Forgetting what the node's pod index holds of pods and containers that are long gone.

The index (:mod:`corevault.podindex`) has a file per pod of the node and one per container id.
On a node whose pods churn (jobs, crash loops, rollouts) it would grow without end:

- a container that restarts gets a new id; the pod's record names the new one, and the old
  one's file was never removed (forgetting a pod removed only the ids its record named), one
  file per restart of every crash-looping pod;
- a pod marked deleted stays ``keep_deleted`` seconds, so that a crash the kernel reports late
  still finds its pod; a file that is no entry (a write cut short, one that does not parse)
  stayed for good.

:func:`sweep` (the pod watch's, after each watch stream) removes:

- a pod marked deleted more than ``keep_deleted`` ago, and its containers' files;
- a container's file its pod's record no longer names (or whose pod is gone), untouched for
  ``keep_deleted`` (a current container's file is written with its pod's every change; a
  replaced one's no longer);
- a file that is no entry of the index, untouched for ``keep_deleted``.

Never while a process of that pod (or container) lives: a pod deleted by force, or a process
stuck for hours on a volume, may still crash, and its crash must find its pod. The crashing
process is in /proc until its dump is read, so a pod with no process in any cgroup of the node
(:func:`live_cgroups`) has no crash under way or to come, and its entry goes while no reader
wants it. Readers (the capture handler) never lock; a lookup of a container whose file is
gone falls back to the pod uid the cgroup names (:func:`corevault.capture.lookup.find_owner`).
Writers: an entry is unlinked only if its name still leads to the file that was read
(``podindex`` writes by rename, so a file written since is another inode), so what another
writer wrote meanwhile is kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from corevault import podindex

#: bytes of one process's cgroup file read at most (a few lines of paths in practice)
CGROUP_MAX = 1 << 16


@dataclass
class Swept:
    """What one sweep removed, and the entries kept because a process of theirs lives."""

    pods: list[str] = field(default_factory=list)
    containers: int = 0
    other: int = 0
    live: int = 0


def live_cgroups(proc: str = "/proc") -> str:
    """The cgroup paths of every process of the node, one per line (read once per sweep, only
    when there is something to remove)."""
    seen = []
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            seen.append(os.read(fd, CGROUP_MAX).decode(errors="replace"))
        except OSError:
            pass
        finally:
            os.close(fd)
    return "\n".join(seen)


def sweep(
    index_dir: str, keep_deleted: float, now: float | None = None, live: Callable[[], str] = live_cgroups
) -> Swept:
    """Remove what is long gone from the index at ``index_dir`` (see the module's docstring)."""
    now = time.time() if now is None else now
    before = now - keep_deleted
    done = Swept()
    cgroups: list[str] = []  # read at the first entry that would go

    def lives(needle: str) -> bool:
        if not cgroups:
            cgroups.append(live())
        found = needle in cgroups[0]
        done.live += found
        return found

    named: dict[str, set[str]] = {}  # pod uid → the container ids its record names
    for path, st, doc in _entries(os.path.join(index_dir, "pods")):
        uid = _own_key(path, st, doc, "uid", before=before, done=done)
        if doc is None or uid is None:
            continue
        containers = doc.get("containers")
        ids = (
            [c.get("id") for c in containers.values() if isinstance(c, dict)]
            if isinstance(containers, dict)
            else []
        )
        named[uid] = {i for i in ids if isinstance(i, str)}
        deleted = doc.get("deleted_at")
        # cgroupfs names the pod pod<uid>, systemd pod<uid with underscores>
        if (
            isinstance(deleted, int | float)
            and deleted < before
            and not lives(f"pod{uid}")
            and not lives(f"pod{uid.replace('-', '_')}")
        ):
            for cid in named.pop(uid):  # its containers first: no pod's file is left without them
                # an id the record holds is a file name only where podindex would have written it
                if (container := podindex.container_file(index_dir, cid)) is not None:
                    done.containers += _unlink(container)
            if _unlink_if_same(path, st):
                done.pods.append(uid)
    for path, st, doc in _entries(os.path.join(index_dir, "containers")):
        cid = _own_key(path, st, doc, "id", before=before, done=done)
        if doc is None or cid is None:
            continue
        pod_uid = doc.get("pod_uid")
        if (isinstance(pod_uid, str) and cid in named.get(pod_uid, ())) or st.st_mtime >= before:
            continue  # its pod's current container, or replaced only lately
        if not os.path.exists(path):
            continue  # removed with its pod above
        if not lives(cid) and _unlink_if_same(path, st):
            done.containers += 1
    return done


def _own_key(
    path: str, st: os.stat_result, doc: dict | None, field: str, *, before: float, done: Swept
) -> str | None:
    """The entry's key (its ``field``) where the file is that entry, named after it; else None,
    and the file, no entry, removed once untouched since ``before`` (counted in ``done.other``)."""
    key = doc.get(field) if doc is not None else None
    if isinstance(key, str) and os.path.basename(path) == f"{key}.json":
        return key
    done.other += st.st_mtime < before and _unlink_if_same(path, st)
    return None


def _entries(directory: str) -> list[tuple[str, os.stat_result, dict | None]]:
    """Each file of one of the index's directories: its path, its ``lstat`` before it was read,
    and what it holds (None: not an entry, a temporary file among them)."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        doc = podindex.read_file(path) if name.endswith(".json") else None  # not a temporary file
        found.append((path, st, doc))
    return found


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


def _unlink_if_same(path: str, st: os.stat_result) -> bool:
    """Unlink ``path`` if it is still the file ``st`` describes (a write since is another inode)."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino, now.st_mtime_ns) != (st.st_dev, st.st_ino, st.st_mtime_ns):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
