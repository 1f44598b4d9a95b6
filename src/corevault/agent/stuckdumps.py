"""Pipe dumps the kernel is stuck in on a pod's own FUSE server: ended past their deadline.

In pipe mode the kernel counts every dump against ``core_pipe_limit`` until it has written the
whole core. A pod that serves a file over FUSE from its own server, maps it, stops the server and
crashes makes the kernel wait in the dump for that file's pages (state D, even after SIGKILL: a
request already sent waits uninterruptibly), and so holds a slot of the node for as long as it
keeps its server stopped; with a few such crashes every other pod's dump is skipped. Nothing the
handler does frees the slot; only the FUSE connection's abort does (every request waiting on it
fails, the kernel dumps the page as missing and goes on).

Each agent pass (:meth:`StuckDumps.check`, at most every :data:`EVERY` seconds) looks for
processes the kernel dumps (``CoreDumping: 1`` in ``/proc/PID/status``) with a task in state D.
One seen so for longer than the dump's deadline (``[capture] timeout``, counted from the first
pass that saw it dumping) has its FUSE mounts found: the devices of its file mappings
(``/proc/PID/maps``, no file is touched) whose mount in its own mountinfo is a FUSE one, or
every FUSE mount of its mountinfo when it mapped a file of a filesystem of its own that may
read from them: an overlay over them, an erofs image file on them (:func:`stuck_on`). Only a
connection whose mount belongs to the crashed pod alone is aborted (its ``abort`` file under
``/sys/fs/fuse/connections/<dev>/``): absent from the host's mount
namespace (a mount the host sees is the node's, a CSI driver's bucket), and absent from every
mount namespace of a process of another pod or of the host. The maps and mountinfo these
decisions rest on are read whole, line by line (a tenant decides their length: a FUSE mount or
mapping it put past a cut would have kept its dump, and the node's slot, out of reach; a sharer's
mount past a cut would have been aborted), once per stuck process. Each abort is journaled under
the pod as ``dropped`` and counted; a stuck mount that may not be aborted is logged once.
Every read of a process goes through a directory fd of its ``/proc/PID`` (:class:`Proc`),
opened once per look and checked against the start time the first look saw: a PID reused in
between (another pod's process) is never read as the stuck one, and the stuck one, ended or
replaced, is dropped from the watch.
``[capture] abort_stuck_fuse = false`` turns this off. Socket mode needs none of it: the kernel's
pipe limit does not count socket dumps.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator

from corevault import config, spool
from corevault.agent import procevents
from corevault.capture import cgroup
from corevault.capture.mountinfo import FUSE_TYPES, MEMORY_TYPES, fuse_mounts
from corevault.capture.mountinfo import lines as _lines
from corevault.capture.mountinfo import parse as parse_mount
from corevault.capture.process import read_upto

log = logging.getLogger("corevault.agent")

CONNECTIONS = "/sys/fs/fuse/connections"
#: bytes of a process's status / cgroup / stat read at most (the tenant decides their length)
READ_MAX = 4 << 20
#: seconds between two looks at most: a look reads every process's status (about 19 µs a process
#: here), and a deadline of minutes needs no finer watch (a shorter deadline is looked at twice)
EVERY = 10.0
#: the mount point journaled for a FUSE mount the pod detached (no mountinfo names one)
DETACHED = "a FUSE mount no namespace lists (unmounted lazily, or in a thread's namespace of its own)"


class Gone(OSError):
    """The process is gone, or its PID is another process's now."""


class Proc:
    """A process pinned by a directory fd of its ``/proc/PID``: every read goes through that fd,
    so a process that ended fails them (the fd keeps naming it, not the PID) and a PID reused
    meanwhile is never read as the process first seen. ``start`` is its start time (field 22 of
    its stat), which tells a reused PID from the process first seen across passes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._start: bytes | None = None

    @property
    def start(self) -> bytes:
        """Its start time, read once (when asked: most processes a look pins are not dumping)."""
        if self._start is None:
            try:
                self._start = self.read("stat", 4096).rpartition(b")")[2].split()[19]
            except (OSError, IndexError) as e:
                raise Gone(f"process {self.pid} is gone") from e
        return self._start

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, name: str, limit: int = READ_MAX) -> bytes:
        return read_upto(name, limit, self.fd)

    def lines(self, name: str) -> Iterator[bytes]:
        return _lines(name, self.fd)

    def listdir(self, name: str) -> list[str]:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def mnt_ns(self) -> int:
        return os.stat("ns/mnt", dir_fd=self.fd).st_ino

    def exe(self) -> str:
        return os.readlink("exe", dir_fd=self.fd)


def pinned(pid: int, start: bytes) -> Proc:
    """``pid`` pinned (:class:`Proc`), when it is still the process that started at ``start``;
    raises :class:`Gone` otherwise."""
    proc = Proc(pid)
    try:
        if proc.start != start:
            raise Gone(f"process {pid} is gone, its PID is another process's now")
    except Gone:
        os.close(proc.fd)
        raise
    return proc


def dumping(proc: Proc) -> bool:
    """Whether the kernel dumps ``proc`` now with one of its tasks in state D."""
    try:
        status = proc.read("status", 1 << 16)
    except OSError:
        return False
    if b"\nCoreDumping:\t1" not in status:
        return False
    try:
        tasks = proc.listdir("task")
    except OSError:
        return False
    for tid in tasks:
        try:
            stat = proc.read(f"task/{tid}/stat", 4096)
        except OSError:
            continue
        if stat.rpartition(b")")[2].split(None, 1)[0] == b"D":
            return True
    return False


def mapped_devices(proc: Proc) -> set[bytes]:
    """``major:minor`` (decimal, as mountinfo has them) of the files ``proc`` mapped, from its maps."""
    devs = set()
    for line in proc.lines("maps"):
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[4] != b"0":
            major, _, minor = fields[3].partition(b":")
            devs.add(b"%d:%d" % (int(major, 16), int(minor, 16)))
    return devs


def stuck_on(proc: Proc) -> tuple[dict[bytes, bytes], set[bytes], set[bytes]]:
    """The FUSE mounts (``major:minor`` → mount point) in ``proc``'s mountinfo, those of them its
    dump may wait on, and the devices of its mappings its mountinfo does not list.

    It may wait on the mounts it mapped files of, or on all of them when it mapped a file of a
    filesystem the host does not list that may read from them (:func:`beneath_fuse`): its pages
    come from mounts that maps does not name (an overlay the pod mounted over its own FUSE mount,
    an erofs image file on it, name themselves alone). A mapped device no mount of its mountinfo
    has may be a FUSE mount it unmounted (lazily: the mapping keeps it alive) after mapping the
    file, or one of a thread of its own mount namespace."""
    fuse = fuse_mounts(proc.lines("mountinfo"))
    mapped = mapped_devices(proc)
    kinds = mount_types(proc.lines("mountinfo"))
    unlisted = mapped - kinds.keys()
    beneath = {dev for dev in mapped & kinds.keys() if beneath_fuse(kinds[dev])}
    if beneath and beneath - mount_types(_lines("/proc/1/mountinfo")).keys():
        return fuse, set(fuse), unlisted
    return fuse, mapped & fuse.keys(), unlisted


def beneath_fuse(kind: bytes) -> bool:
    """Whether a filesystem of mountinfo's type ``kind`` may read its files' pages from a FUSE
    mount (neither FUSE itself nor in memory alone: :func:`corevault.capture.buildid.own_fuse`)."""
    return kind.partition(b".")[0] not in FUSE_TYPES + MEMORY_TYPES


def mount_types(mountinfo: Iterable[bytes]) -> dict[bytes, bytes]:
    """``major:minor`` → filesystem type of every mount a mountinfo's lines list."""
    found = {}
    for line in mountinfo:
        if (mount := parse_mount(line)) is not None:
            found.setdefault(mount[1], mount[3])
    return found


def lists(mountinfo: Iterable[bytes], dev: bytes) -> bool:
    """Whether a mountinfo's lines list a mount of ``major:minor`` ``dev``."""
    return any((mount := parse_mount(line)) is not None and mount[1] == dev for line in mountinfo)


def _pod_uid(proc: Proc) -> str | None:
    info = cgroup.parse(proc.read("cgroup", 1 << 16).decode(errors="replace"))
    return info.pod_uid if info is not None else None


def seen_elsewhere(dev: bytes, own_pod: str | None, own_ns: int | None = None) -> str | None:
    """Who else sees the mount of ``dev``: the host, or a process of another pod than ``own_pod``
    (or of no pod) in a mount namespace other than ``own_ns`` (the crashed process's, when it is
    still there); None when only ``own_pod`` does: the rule for every abort of the agent's."""
    if lists(_lines("/proc/1/mountinfo"), dev):
        return "the host's mount namespace lists it"
    if own_pod is None:
        return "the crashed process is in no pod"
    looked: set[int] = {own_ns} if own_ns is not None else set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            # each one pinned too: its namespace, pod and mountinfo are one process's
            with Proc(int(name)) as other:
                ns = other.mnt_ns()
                # the pod's own processes are not asked: their namespaces are the pod's to make,
                # as many and as long as it likes, and read whole for each stuck dump they would
                # cost the agent what the pod decides
                if ns in looked or _pod_uid(other) == own_pod:
                    continue
                if lists(other.lines("mountinfo"), dev):
                    return f"process {name}, of another pod or of the host, sees it"
                looked.add(ns)
        except OSError:
            continue  # gone meanwhile
    return None


def connection(dev: bytes) -> str:
    """The name of the connection behind ``major:minor`` under the FUSE control filesystem (the
    kernel's ``dev_t``)."""
    major, _, minor = dev.partition(b":")
    return str(int(major) << 20 | int(minor))


#: aborts a connection through a fusectl mount of its own, in a mount namespace of its own that
#: ends with it: nothing is left mounted on the node; exits 3 when there is no such connection
ABORT_PRIVATELY = 'mount -t fusectl fusectl "$1" && { [ -d "$1/$2" ] || exit 3; } && echo 1 > "$1/$2/abort"'
#: lists the connections (through a fusectl mount of its own, as above)
LIST_PRIVATELY = 'mount -t fusectl fusectl "$1" && ls "$1"'


def _privately(script: str, name: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", CONNECTIONS, name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def live_connections() -> set[str]:
    """The names of the node's FUSE connections (:func:`connection`), listed once: a pod decides how
    many devices its mappings name that no mountinfo lists (:func:`stuck_on`)."""
    if os.path.ismount(CONNECTIONS):
        return set(os.listdir(CONNECTIONS))
    listed = _privately(LIST_PRIVATELY)
    return set(listed.stdout.split()) if listed.returncode == 0 else set()


def abort(dev: bytes) -> None:
    """Abort the FUSE connection behind ``major:minor``: every request waiting on it fails.

    Where the node has the control filesystem mounted (systemd mounts it), its ``abort`` file is
    written; elsewhere (this agent's container, a node without systemd) a child mounts it in a
    mount namespace of its own. Raises OSError when neither could."""
    name = connection(dev)
    try:
        with open(os.path.join(CONNECTIONS, name, "abort"), "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        pass
    done = _privately(ABORT_PRIVATELY, name)
    if done.returncode != 0:
        raise OSError(f"could not abort FUSE connection {name}: {done.stderr.strip() or done.returncode}")


class StuckDumps:
    """The agent's watch over pipe dumps stuck on a pod's own FUSE server."""

    def __init__(self, settings: config.Settings, on_abort: Callable[[], object] | None = None) -> None:
        self.settings = settings
        self.on_abort = on_abort
        #: pid → (its /proc start time, when a pass first saw it dumping and stuck)
        self.first_seen: dict[int, tuple[bytes, float]] = {}
        #: (pid, dev) already aborted, or logged as not to be aborted
        self.done: set[tuple[int, bytes]] = set()
        #: the stuck processes (pid, start time) whose mappings were all looked at: not read again
        self.ended: set[tuple[int, bytes]] = set()
        self.owners = procevents.Owners(settings)
        self.last = -float("inf")

    def check(self, now: float | None = None) -> int:
        """One look; returns how many connections were aborted."""
        if not self.settings.abort_stuck_fuse:
            return 0
        now = time.monotonic() if now is None else now
        if now - self.last < min(EVERY, self.settings.timeout / 2):
            return 0
        self.last = now
        stuck = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                with Proc(pid) as proc:
                    if not dumping(proc):
                        continue
                    start = proc.start
            except OSError:
                continue  # gone meanwhile
            seen = self.first_seen.get(pid)
            if seen is None or seen[0] != start:  # a new process under a reused PID
                seen = self.first_seen[pid] = (start, now)
            stuck[pid] = seen
        self.first_seen = {pid: seen for pid, seen in self.first_seen.items() if pid in stuck}
        self.done = {(pid, dev) for pid, dev in self.done if pid in stuck}
        self.ended = {(pid, start) for pid, start in self.ended if stuck.get(pid, (None,))[0] == start}
        aborted = 0
        for pid, (start, since) in stuck.items():
            if now - since >= self.settings.timeout and (pid, start) not in self.ended:
                try:
                    # pinned once, and only if it is still the process first seen: everything is
                    # read through that fd, so a PID reused since is never taken for it
                    with pinned(pid, start) as proc:
                        aborted += self._end(proc)
                    self.ended.add((pid, start))
                except Gone:
                    self.first_seen.pop(pid, None)  # dropped from the watch
                except OSError as e:
                    log.warning("could not look at the stuck dump of process %d: %s", pid, e)
        return aborted

    def _end(self, proc: Proc) -> int:
        pid = proc.pid
        mounts, waited_on, unlisted = stuck_on(proc)
        # a mapped FUSE mount that no mountinfo of the pod lists (detached) is waited on as well
        live = live_connections() if unlisted else set()
        detached = {dev for dev in unlisted if connection(dev) in live}
        aborted = 0
        whose: tuple[str, str, dict] | None = None
        for dev in sorted(waited_on | detached):
            if (pid, dev) in self.done:
                continue
            self.done.add((pid, dev))
            point = mounts[dev].decode(errors="backslashreplace") if dev in mounts else DETACHED
            elsewhere = seen_elsewhere(dev, _pod_uid(proc), proc.mnt_ns())
            if elsewhere is not None:
                log.warning(
                    "the dump of process %d is stuck on the FUSE mount %s (%s), which is not its pod's "
                    "alone (%s): not aborted",
                    pid, point, dev.decode(), elsewhere,
                )  # fmt: skip
                continue
            # whose dump it is, read before the abort: the dump and the process may end at once after it
            whose = whose or self._whose(proc)
            abort(dev)
            aborted += 1
            self._journal(pid, point, *whose)
        return aborted

    def _whose(self, proc: Proc) -> tuple[str, str, dict]:
        """``(comm, exe, pod)`` of the dumping process ``proc``."""
        try:
            cgroup_text = proc.read("cgroup", 1 << 16).decode(errors="replace")
            status = proc.read("status", 1 << 16).decode(errors="replace")
            comm = status.partition("Name:\t")[2].partition("\n")[0]
            uid = int(status.partition("Uid:\t")[2].split()[0])
            exe = proc.exe()
        except (OSError, ValueError, IndexError):
            cgroup_text, comm, uid, exe = "", "", -1, ""
        pod, _ = self.owners(cgroup_text, exe, comm, uid)
        return comm, exe, pod

    def _journal(self, pid: int, point: str, comm: str, exe: str, pod: dict) -> None:
        reason = (
            f"the pod's own FUSE server of {point} stopped answering during its dump: the kernel waited "
            f"past [capture] timeout ({self.settings.timeout:g}s) holding a core_pipe_limit slot of the "
            "node, and the FUSE connection was aborted (its mount fails from now on)"
        )
        whose = {"pid": pid, "comm": comm, "exe": exe, "pod": pod}
        journal_abort(self.settings, "stuck dumps", whose, reason)
        if self.on_abort is not None:
            self.on_abort()


def journal_abort(settings: config.Settings, source: str, whose: dict, reason: str) -> None:
    """Journal an abort of the agent's as ``dropped`` under ``whose`` pod (``pid``, ``comm``,
    ``exe``, ``pod``), and log it."""
    record = {
        "event": "dropped", "transport": "kernel", "source": source, "node": settings.node_name,
        "time": int(time.time()), **whose, "reason": reason,
    }  # fmt: skip
    spool.ensure(settings.spool_dir)
    spool.journal(settings.spool_dir, record)
    log.warning("process %s: %s", whose.get("pid"), reason)
