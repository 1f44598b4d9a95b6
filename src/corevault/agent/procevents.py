"""Every core-signal death, from the kernel's process events connector, reconciled with the journal.

The kernel's log names at most ten skipped dumps in five seconds (its coredump lines are
rate-limited, and the pattern is the host's: anyone's crashes use the window up), then only
a count with its next line, which may never come. So the kernel's log alone lets a tenant's
skipped dump go unrecorded. The process events connector (netlink ``NETLINK_CONNECTOR``,
``CN_IDX_PROC``) is not rate-limited: ``get_signal`` sends ``PROC_EVENT_COREDUMP`` (pid,
tgid, parent pid and tgid, all in the initial namespaces) for every death by a core signal,
before ``do_coredump``, while the process still lives. The listener subscribes to that event
only (the kernel filters the rest since 6.6), and reads the process's cgroup, comm, namespace
PID, RLIMIT_CORE and /proc owner at once, while they are still there.

Each pass of the agent then reconciles (:meth:`ProcEvents.reconcile`, after the kernel log's
poll): a death is accounted for by a journal record that names its global PID (every
handler and socket-mode record carries ``pid``, the kernel's ``%P``), or by a kernel log
record naming its PID in its namespace and its comm. One neither accounted for nor still
being dumped (the process is still there: the kernel is writing its core; or a pipe
handler whose ``%P`` argument is its PID still runs) for :data:`GRACE` seconds is journaled
once under its pod: ``dropped`` when the pod opted in, ``skipped`` (what the handler journals
for such crashes) when it did not, so a host's crashes that never asked for cores read as
they always did rather than as losses.

Bounds: the table of deaths waiting holds at most :data:`MAX_PENDING`; beyond, the oldest death
of the tenant (namespace) holding the most places is given up, so a tenant's crash loop pushes
out its own deaths and never another's; each tenant's count of given-up deaths is journaled
under its last such pod. A socket overrun (ENOBUFS: the kernel had
more events than the socket's buffer) is counted and journaled too, since deaths were lost
unseen. What the netlink socket carries is the kernel's; what /proc holds of a process is
its tenant's, read bounded and kept as plain data.

The connector reaches sockets in the initial network namespace only, from a process in the
initial user and PID namespaces with CAP_NET_ADMIN: the DaemonSet's agent (privileged,
``hostPID``, not ``hostNetwork``) makes its socket on a thread that enters the host's network
namespace (kthreadd's: :data:`corevault.hostsetup.HOST_NAMESPACES`). Where that fails, one
warning says so and the agent goes on with the kernel log alone.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import platform
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from corevault import config, hostsetup, podannotations, quickjson, spool
from corevault.agent import receiver
from corevault.capture import cgroup, lookup

log = logging.getLogger("corevault.agent")

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_COREDUMP = 0x40000000
CLONE_NEWNET = 0x40000000
#: the initial network namespace's inode number, fixed by the kernel (PROC_NET_INIT_INO)
INIT_NET_INO = 0xEFFFFFF9

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
COREDUMP = struct.Struct("=iiii")  # process pid, process tgid, parent pid, parent tgid

#: seconds a death may go unaccounted for once nothing dumps it any more
GRACE = 15.0
#: deaths waiting to be accounted for, at most
MAX_PENDING = 4096
#: records seen in the journal, at most (kept a while: a record may come before its event is read)
MAX_SEEN = 16384
#: records of one PID kept; seconds between a record's crash_time (whole seconds) and the death's
PER_PID = 4
CRASH_TIME_SLACK = 2.0
#: how long a journal record can account for a death that comes after it
SEEN_FOR = 120.0
#: the socket's receive buffer: about 5,000 events (each takes ~700 bytes of buffer)
RCVBUF = 4 << 20
#: bytes read of one /proc file of a crashed process (its tenant's data)
PROC_READ = 16384
#: seconds a crashed process's pod is known by its cgroup, exe, comm and uid; pods so known, at most
OWNER_FOR = 2.0
MAX_OWNERS = 1024
#: clock ticks a second, the unit of a process's start time
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Death:
    """What the connector and /proc told of one process killed by a core signal."""

    pid: int  # tgid, in the initial PID namespace: the kernel's %P
    when: float  # wall-clock time of the event
    start: str  # /proc/PID/stat starttime: tells the process from a later one with its PID
    comm: str = ""
    ns_pid: int | None = None
    uid: int = -1
    exe: str = ""
    rlimit_core: str = ""
    not_dumpable: bool = False
    known: bool = False  # whether its cgroup could be read: a pod that may have opted in is known
    pod: dict | None = None
    opted_in: bool = False
    gone_at: float | None = None
    key: int = -1  # its place in the table


def _read(path: str, limit: int = PROC_READ) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, limit).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _start_time(pid: int) -> str:
    """The process's start time in ticks since boot; "" once it has exited (a zombie too: a parent
    that never reaps it must not keep its death waiting). Fields follow the comm's last ')'."""
    fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else ""


def find_owner(
    settings: config.Settings, cgroup_text: str, exe: str, comm: str, uid: int
) -> tuple[dict, bool]:
    """A process's pod (as journaled) and whether it opted in."""
    owner = lookup.find_owner(settings, cgroup.parse(cgroup_text), exe, comm, uid)
    return owner.as_dict(), podannotations.core_pattern(owner.annotations) is not None


class Owners:
    """The pods of the latest crashed processes, by what names them (their cgroup, exe, comm and
    uid), for :data:`OWNER_FOR` seconds: finding a pod is most of what a death costs the listener
    (a container's cgroup names it alone, a new container has a cgroup of its own), and a pod's
    crash loop would otherwise cost the agent as much CPU as the pod spends crashing."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.known: collections.OrderedDict[tuple[str, str, str, int], tuple[float, dict, bool]] = (
            collections.OrderedDict()
        )

    def __call__(self, cgroup_text: str, exe: str, comm: str, uid: int) -> tuple[dict, bool]:
        key, now = (cgroup_text, exe, comm, uid), time.monotonic()
        hit = self.known.get(key)
        if hit is None or now - hit[0] >= OWNER_FOR:
            hit = (now, *find_owner(self.settings, *key))
            self.known[key] = hit
            self.known.move_to_end(key)
            while len(self.known) > MAX_OWNERS:
                self.known.popitem(last=False)
        return dict(hit[1]), hit[2]


def observe(
    settings: config.Settings,
    pid: int,
    when: float,
    since_boot: float | None = None,
    owners: Callable[[str, str, str, int], tuple[dict, bool]] | None = None,
) -> Death:
    """Read what /proc holds of a process the kernel is about to dump, and find its pod, while the
    process and its container are still there (best effort).

    A process whose dump the kernel skips is gone within microseconds: what names its pod (the
    cgroup) is read first, then what matches it to the kernel's log (status: comm, namespace PID).
    A process that started after the event (``since_boot``, CLOCK_MONOTONIC seconds) is another
    that took the PID while the event waited in the socket: nothing of it is the death's.
    """
    cgroup_text = _read(f"/proc/{pid}/cgroup")
    status = _read(f"/proc/{pid}/status")
    start = _start_time(pid)
    if start and since_boot is not None and started_after(start, since_boot):
        return Death(pid=pid, when=when, start="")
    d = Death(pid=pid, when=when, start=start, known=bool(cgroup_text))
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key == "Name":
            d.comm = rest.strip()[:64]
        elif key == "NSpid" and fields and fields[-1].isdigit():
            d.ns_pid = int(fields[-1])
        elif key == "Uid" and fields and fields[0].isdigit():
            d.uid = int(fields[0])
    with contextlib.suppress(OSError):
        d.exe = os.readlink(f"/proc/{pid}/exe")[:4096]
    # the pod at once: a runtime's state of the container goes with it
    if owners is None:
        d.pod, d.opted_in = find_owner(settings, cgroup_text, d.exe, d.comm, d.uid)
    else:
        d.pod, d.opted_in = owners(cgroup_text, d.exe, d.comm, d.uid)
    with contextlib.suppress(OSError):
        # /proc/PID belongs to root while the process is not dumpable (task_dump_owner)
        d.not_dumpable = d.uid > 0 and os.stat(f"/proc/{pid}").st_uid == 0
    for line in _read(f"/proc/{pid}/limits").splitlines():
        if line.startswith("Max core file size") and line[26:].split():
            d.rlimit_core = line[26:].split()[0]
    return d


def started_after(start: str, since_boot: float) -> bool:
    """Whether a process's start time (/proc/PID/stat: clock ticks since boot, suspends counted)
    is past a tick after ``since_boot`` (CLOCK_MONOTONIC seconds, suspends not counted)."""
    suspended = time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)
    return int(start) > (since_boot + suspended) * TICKS + 1


def kernel_comm(comm: str) -> str:
    """The comm as the kernel's log prints it (%pE: a non-printable byte as \\ooo)."""
    return "".join(c if " " <= c < "\x7f" else "".join(f"\\{b:03o}" for b in c.encode()) for c in comm)


def parse(data: bytes) -> tuple[int, int] | None:
    """(tgid, event time in ns since boot) of a PROC_EVENT_COREDUMP message; None for any other."""
    if len(data) < NLMSG.size + CN_MSG.size + EVENT.size + COREDUMP.size:
        return None
    idx, val, *_ = CN_MSG.unpack_from(data, NLMSG.size)
    what, _cpu, stamp = EVENT.unpack_from(data, NLMSG.size + CN_MSG.size)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) or what != PROC_EVENT_COREDUMP:
        return None
    _pid, tgid, _ppid, _ptgid = COREDUMP.unpack_from(data, NLMSG.size + CN_MSG.size + EVENT.size)
    return tgid, stamp


def _subscribe(sock: socket.socket) -> None:
    # since 6.6 the kernel takes an event filter with the listen request (struct proc_input)
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    if m is not None and (int(m[1]), int(m[2])) >= (6, 6):
        payload = struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_COREDUMP)
    else:
        payload = struct.pack("=I", PROC_CN_MCAST_LISTEN)
    msg = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    sock.send(NLMSG.pack(NLMSG.size + len(msg), NLMSG_DONE, 0, 0, 0) + msg)


def _make_socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE: past rmem_max, as root
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, CN_IDX_PROC))
        _subscribe(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def open_connector(rcvbuf: int = RCVBUF) -> socket.socket:
    """A socket subscribed to core-signal deaths, made in the host's network namespace."""
    if os.stat("/proc/self/ns/net").st_ino == INIT_NET_INO:
        return _make_socket(rcvbuf)
    # setns changes the calling thread's namespace only: a thread of its own enters the host's,
    # makes the socket (which stays in the namespace it was made in) and ends
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"{hostsetup.HOST_NAMESPACES}/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "cannot enter the host's network namespace")
            finally:
                os.close(fd)
            result.append(_make_socket(rcvbuf))
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=make, name="corevault-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class ProcEvents:
    """Listens on a thread of its own; :meth:`reconcile` journals the deaths nothing accounted for."""

    def __init__(
        self,
        settings: config.Settings,
        grace: float = GRACE,
        max_pending: int = MAX_PENDING,
        rcvbuf: int = RCVBUF,
        on_drop: Callable[[int], object] | None = None,
    ) -> None:
        self.settings = settings
        self.grace = grace
        self.max_pending = max_pending
        self.rcvbuf = rcvbuf
        self.on_drop = on_drop
        self.owners = Owners(settings)
        self.lock = threading.Lock()
        #: the deaths waiting, oldest first, by a key of their own (not the PID: see :meth:`_add`)
        self.pending: collections.OrderedDict[int, Death] = collections.OrderedDict()
        self.keys = itertools.count()
        #: the waiting deaths' PIDs by tenant, oldest first: a full table gives up the largest's
        self.tenants: dict[str, collections.OrderedDict[int, None]] = {}
        #: deaths pushed out of the full table, not yet journaled: by tenant, with its last such pod
        self.given_up: dict[str, tuple[int, dict | None]] = {}
        self.overruns = 0  # socket overruns, not yet journaled
        #: the journal's records by the PID they name: (time, whether it is the crash's own time) each
        self.seen_pids: collections.OrderedDict[int, list[tuple[float, bool]]] = collections.OrderedDict()
        #: the kernel log's records by the namespace PID they name: [comm, time] each, taken out
        #: when one accounts for a death; ``kernel_order`` ages them out oldest first
        self.seen_kernel: dict[int, list[list]] = {}
        self.kernel_order: collections.deque[tuple[int, list]] = collections.deque()
        self.journal_fd = -1
        self.partial = b""
        self.stop = threading.Event()
        self.boot = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """Subscribe and start listening; False (said once in the log) where the connector cannot be had."""
        try:
            self.sock = open_connector(self.rcvbuf)
        except OSError as e:
            log.warning(
                "cannot listen to the kernel's process events (%s): dumps the kernel skips are known "
                "only from its rate-limited log; run the agent privileged with hostPID to have them all",
                e,
            )
            return False
        self.sock.settimeout(0.5)
        self._tail_journal()  # records from before now account for nothing to come
        self.thread = threading.Thread(target=self._listen, name="corevault-procevents", daemon=True)
        self.thread.start()
        return True

    def _listen(self) -> None:
        assert self.sock is not None
        while not self.stop.is_set():
            try:
                data = self.sock.recv(8192)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    with self.lock:
                        self.overruns += 1
                    continue
                if self.stop.is_set():
                    return
                log.warning("cannot read the kernel's process events (%s): listening stopped", e)
                return
            event = parse(data)
            if event is None:
                continue
            tgid, stamp = event
            try:
                death = observe(self.settings, tgid, self.boot + stamp / 1e9, stamp / 1e9, self.owners)
            except Exception as e:  # a bug, or one process's odd /proc: the next deaths still count
                log.exception("cannot look at a crashed process %d: %s", tgid, e)
                death = Death(pid=tgid, when=self.boot + stamp / 1e9, start="")
            with self.lock:
                self._add(death)

    def _add(self, death: Death) -> None:
        """Keep a death waiting; past the table's size give up the oldest of the largest tenant's.

        Each death has a place of its own, its PID's earlier one's included: a PID is taken again
        within seconds where they wrap, and a pod's crash under the PID of another pod's waiting
        death must not take that death's place."""
        death.key = next(self.keys)
        self.pending[death.key] = death
        self.tenants.setdefault(tenant(death), collections.OrderedDict())[death.key] = None
        while len(self.pending) > self.max_pending:
            largest = max(self.tenants, key=lambda t: len(self.tenants[t]))
            lost = self.pending[next(iter(self.tenants[largest]))]
            self._remove(lost.key)
            n, _ = self.given_up.get(largest, (0, None))
            self.given_up[largest] = (n + 1, lost.pod)

    def _remove(self, key: int) -> None:
        if (d := self.pending.pop(key, None)) is not None:
            keys = self.tenants[tenant(d)]
            del keys[key]
            if not keys:
                del self.tenants[tenant(d)]

    def waiting(self, pid: int) -> bool:
        """Whether a death of ``pid`` waits to be accounted for."""
        with self.lock:
            return any(d.pid == pid for d in self.pending.values())

    def _tail_journal(self) -> None:
        """Note the records appended to the journal since the last call.

        The agent ships the journal by renaming it: the open descriptor is read to its end
        before the name's new file is opened, so no record between the two is missed."""
        path = os.path.join(self.settings.spool_dir, spool.JOURNAL_NAME)
        while True:
            if self.journal_fd < 0:
                try:
                    self.journal_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return
                if self.thread is None:  # the first look: only what comes from now on
                    os.lseek(self.journal_fd, 0, os.SEEK_END)
            while chunk := os.read(self.journal_fd, 1 << 20):
                lines = (self.partial + chunk).split(b"\n")
                self.partial = lines.pop()
                for line in lines:
                    self._note(line)
            try:
                same = os.stat(path).st_ino == os.fstat(self.journal_fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return
            os.close(self.journal_fd)
            self.journal_fd, self.partial = -1, b""
            if not os.path.exists(path):
                return

    def _note(self, line: bytes) -> None:
        try:
            record = quickjson.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        when = record.get("time") if isinstance(record.get("time"), (int, float)) else time.time()
        if isinstance(record.get("pid"), int):
            crash_time = record.get("crash_time")
            exact = isinstance(crash_time, (int, float)) and not isinstance(crash_time, bool)
            self._seen(record["pid"], crash_time if exact else when, exact)
        elif record.get("source") == "kernel log" and isinstance(record.get("ns_pid"), int):
            entry = [str(record.get("comm", "")), when]
            self.seen_kernel.setdefault(record["ns_pid"], []).append(entry)
            self.kernel_order.append((record["ns_pid"], entry))
            if len(self.kernel_order) > MAX_SEEN:
                self._forget_kernel()

    def _seen(self, pid: int, when: float, exact: bool) -> None:
        times = self.seen_pids.setdefault(pid, [])
        times[:] = [*times[-(PER_PID - 1) :], (when, exact)]
        self.seen_pids.move_to_end(pid)
        while len(self.seen_pids) > MAX_SEEN:
            self.seen_pids.popitem(last=False)

    def _forget_kernel(self) -> None:
        """Age out the oldest kernel log record (gone already when it accounted for a death)."""
        ns_pid, entry = self.kernel_order.popleft()
        entries = self.seen_kernel.get(ns_pid, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self.seen_kernel.pop(ns_pid, None)

    def _journaled(self, d: Death) -> bool:
        # a record of a PID before its crash belongs to another process that had the PID
        # a record naming the crash's own time seconds away from this death's is of another process
        # that had the PID since (the node's PIDs wrap at pid_max): a pod crashing under the PID of
        # another pod's skipped death would otherwise account for it
        return any(
            abs(t - d.when) <= CRASH_TIME_SLACK if exact else t >= d.when - 1
            for t, exact in self.seen_pids.get(d.pid, ())
        )

    def _logged(self, waiting: list[Death], due: list[Death]) -> set[int]:
        """The due deaths the kernel's log accounts for (their ids).

        A line names a PID in its process's namespace and a comm, both a tenant's to choose: pod
        A's own PID 1, renamed as pod B's process is, makes a line that fits B's death as well
        as A's. So a line is weighed only once a death it fits is due (every death it may be
        about has been read from the socket by then), and goes to the waiting death that fits
        it nearest in time: the kernel logs it as it skips the dump, just after that death's
        event. One line accounts for one death.
        """
        keys = {_key(d)[0] for d in due}
        fits: dict[tuple[int, str | None], list[Death]] = {}
        for d in sorted(waiting, key=_when):
            if _key(d)[0] in keys:
                fits.setdefault(_key(d), []).append(d)
        due_ids = {id(d) for d in due}
        logged: set[int] = set()
        for ns_pid in keys:
            entries = self.seen_kernel.get(ns_pid, [])
            for entry in sorted(entries, key=lambda e: e[1]):
                comm, t = entry
                near = [n for k in ((ns_pid, comm), (ns_pid, None)) if (n := _nearest(fits.get(k, []), t))]
                if not near:
                    continue
                group, i = min(near, key=lambda n: abs(n[0][n[1]].when - t))
                if id(group[i]) in due_ids:  # else the line waits for the death it is nearest to
                    logged.add(id(group.pop(i)))
                    entries.remove(entry)
        return logged

    def reconcile(self, now: float | None = None) -> int:
        """Journal the deaths nothing accounted for in time; returns how many records were written."""
        now = time.monotonic() if now is None else now
        self._tail_journal()
        with self.lock:
            deaths = list(self.pending.values())
            given_up, self.given_up = self.given_up, {}
            overruns, self.overruns = self.overruns, 0
        done: list[Death] = []
        due: list[Death] = []
        waiting: list[Death] = []
        for d in deaths:
            if self._journaled(d):
                done.append(d)
                continue
            waiting.append(d)
            if d.start and _start_time(d.pid) == d.start:
                d.gone_at = None  # still there: the kernel is writing its core
            elif d.gone_at is None:
                d.gone_at = now
            elif now - d.gone_at >= self.grace:
                due.append(d)
        if due:
            logged = self._logged(waiting, due)
            done += [d for d in due if id(d) in logged]
            due = [d for d in due if id(d) not in logged]
        if due:
            pids = {d.pid for d in due}
            running = handlers_running(pids) | receiver.captured_now(pids)
            for d in due:
                if d.pid in running:
                    d.gone_at = now
            due = [d for d in due if d.pid not in running]
        written = 0
        socket_mode = due and _read("/proc/sys/kernel/core_pattern", 256).startswith("@")
        for d in due:
            self._journal_death(d, bool(socket_mode))
            written += 1
        for n, pod in given_up.values():
            self._journal_lost(
                n,
                f"{n} core-signal deaths of this tenant went unrecorded: more waited at once than the agent "
                f"keeps track of ({self.max_pending}), this tenant's the most; look for a crash loop in it",
                pod,
            )
            written += 1
        if overruns:
            self._journal_lost(
                overruns,
                f"the kernel's process events overran the agent's socket {overruns} times: at least as many "
                "crashes, of pods unknown, went unrecorded; look for a crash loop on this node",
            )
            written += 1
        with self.lock:
            for d in done + due:
                if self.pending.get(d.key) is d:
                    self._remove(d.key)
        now_wall = time.time()
        while self.kernel_order and self.kernel_order[0][1][1] < now_wall - SEEN_FOR:
            self._forget_kernel()
        return written

    def _journal_death(self, d: Death, socket_mode: bool = False) -> None:
        record = {
            "transport": "kernel", "source": "process events", "node": self.settings.node_name,
            "time": d.when, "pid": d.pid, "comm": d.comm, "exe": d.exe, "pod": d.pod,
        }  # fmt: skip
        if d.ns_pid is not None:
            record["ns_pid"] = d.ns_pid
        if d.known and not d.opted_in:
            record.update(event="skipped", reason="not opted in (no core-pattern annotation or host rule)")
        else:
            record.update(event="dropped", reason=why(d, socket_mode))
            if self.on_drop is not None:
                self.on_drop(1)
        spool.ensure(self.settings.spool_dir)
        spool.journal(self.settings.spool_dir, record)
        self._seen(d.pid, d.when, True)

    def _journal_lost(self, n: int, reason: str, pod: dict | None = None) -> None:
        record = {
            "event": "dropped", "transport": "kernel", "source": "process events", "count": n,
            "node": self.settings.node_name,
            "reason": reason,
        }  # fmt: skip
        if pod is not None:
            record["pod"] = pod
        spool.ensure(self.settings.spool_dir)
        spool.journal(self.settings.spool_dir, record)
        if self.on_drop is not None:
            self.on_drop(n)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.journal_fd >= 0:
            os.close(self.journal_fd)
            self.journal_fd = -1


def _key(d: Death) -> tuple[int, str | None]:
    """The PID and comm the kernel's log names a death by; a process gone before its status was
    read can only be the host's own (namespace PID = PID), with any comm."""
    return (d.pid, None) if d.ns_pid is None else (d.ns_pid, kernel_comm(d.comm))


def _nearest(deaths: list[Death], t: float) -> tuple[list[Death], int] | None:
    """Of deaths sorted by time, the one nearest to a line at ``t`` it may be about (at most a
    second after it: the two clocks' slack), as (list, index)."""
    end = bisect.bisect_right(deaths, t + 1, key=_when)
    if end == 0:
        return None
    i = min(bisect.bisect_left(deaths, t, hi=end, key=_when), end - 1)
    if i > 0 and abs(deaths[i - 1].when - t) <= abs(deaths[i].when - t):
        i -= 1
    return deaths, i


def _when(d: Death) -> float:
    return d.when


def tenant(d: Death) -> str:
    """Whose place in the table a death takes: its pod's namespace; the host's, and a process
    gone before its pod could be read, share one."""
    return str((d.pod or {}).get("namespace") or "")


#: why the kernel skips a dump in socket mode (core_pattern ``@…``), where no pipe limit counts
SOCKET_SKIP = (
    "most likely the agent's coredump socket did not take it (its queue full in a crash storm, or the "
    "agent not listening); see the kernel's log and the agent's"
)


def why(d: Death, socket_mode: bool = False) -> str:
    """The reason journaled for a death the kernel handed no core for."""
    if not d.known:
        likely = (
            SOCKET_SKIP
            if socket_mode
            else "most likely over kernel.core_pipe_limit; raise it or stop the crash loop holding the slots"
        )
        gone = "the kernel handed no core to corevault, and the process was gone before its pod could be read"
        return f"{gone}: {likely}"
    if d.rlimit_core == "1":
        return (
            "the kernel handed no core to corevault: RLIMIT_CORE is 1 in the process, which tells the "
            "kernel not to pipe it; raise it (ulimit -c) to get cores"
        )
    if d.not_dumpable:
        return (
            "the kernel handed no core to corevault: the process was not dumpable (prctl PR_SET_DUMPABLE 0, "
            "or it changed credentials while fs.suid_dumpable is 0)"
        )
    if socket_mode:
        return (
            f"the kernel handed no core to corevault and its rate-limited log did not say why: {SOCKET_SKIP}"
        )
    return (
        "the kernel handed no core to corevault and its rate-limited log did not say why: most likely "
        "over kernel.core_pipe_limit (that many dumps were being read at once); raise core_pipe_limit "
        "or stop the crash loop that holds the slots"
    )


def handlers_running(pids: set[int]) -> set[int]:
    """Which of ``pids`` a pipe handler started by the kernel still runs for (its ``%P`` argument)."""
    pattern = _read("/proc/sys/kernel/core_pattern", 256).strip()
    if not pattern.startswith("|"):
        return set()
    tokens = pattern[1:].split()
    if "%P" not in tokens:
        return set()
    at = tokens.index("%P")
    wanted = {str(p).encode(): p for p in pids}
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read(4096).split(b"\0")
        except OSError:
            continue
        if len(argv) > at and argv[0] == tokens[0].encode() and argv[at] in wanted:
            found.add(wanted[argv[at]])
    return found
