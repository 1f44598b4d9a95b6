"""Snapshots: a core of a live process, through the same path as a crash.

A hung or misbehaving process is often worth a core without waiting for it to crash. gdb's
``gcore`` writes one (every thread, its registers, and the memory a kernel core would hold,
honouring the process's ``coredump_filter``) with the process stopped under ptrace only
while it does, and detaches so the process goes on. The core is written to a temporary
file in the spool (the node's page cache), then handed to the crash path's own
:func:`~corevault.capture.admission.admit` and :func:`~corevault.capture.delivery.deliver`:
the pod's annotation decides whether and where the plain core goes in its volume (with
the same safety rules), a spool entry and the binaries by build-id are kept, and the
agent ships and analyses it like any crash. The core's threads carry no signal, which is
how the analysis tells a snapshot from a crash.

Limits, each journaled: one snapshot at a time per container (a lock), a size cap
(``RLIMIT_FSIZE`` on gdb, so no larger file can ever be written), and a timeout after
which gdb is killed and the process is resumed whatever state gdb left it in.

gdb would read the process's executable and libraries on attach: parsing a pod's files as
root, with the process stopped meanwhile (seconds for a large Go or Node binary). It is
given the host's ``/bin/true`` as its program instead, with the mismatch check off, and
loads no shared libraries: ``gcore`` needs only ptrace, /proc/PID/smaps and memory, so it
parses nothing of the pod's and the process is stopped for about half as long (measured
here: 0.05-0.1 s against 0.2-0.3 s to attach to a three-thread process).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import NoReturn

from corevault import bounded, config, spool
from corevault.capture import admission, cgroup, delivery, lookup, policy, process

#: the state directory's set of per-container snapshot locks
KIND = "snapshots"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_SIZE = 16 << 30
#: gdb's program while it attaches: a host file, so that nothing of the pod's is parsed
STAND_IN = "/bin/true"


class SnapshotError(Exception):
    """No snapshot was taken; the message says why (and the journal has a record of it)."""


class NotHere(SnapshotError):
    """The pod (or its container) has no process on this node."""


@dataclass(frozen=True, slots=True)
class Outcome:
    pid: int
    entry: str | None
    volume: str | None
    size: int
    stopped_seconds: float | None
    killed: bool


def take(
    settings: config.Settings,
    pid: int,
    *,
    reason: str = "",
    requested_by: str = "",
    kill: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_size: int = DEFAULT_MAX_SIZE,
) -> Outcome:
    """Snapshot process ``pid`` (a host PID) into its pod's targets; raises :class:`SnapshotError`."""
    started, when = time.monotonic(), time.time()
    request = {"reason": reason, "requested_by": requested_by, "kill": kill}
    record: dict = {"node": settings.node_name, "crash_time": int(when), "transport": "snapshot",
                    "pid": pid, "snapshot": request}  # fmt: skip
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        _refuse(settings, record, f"no process {pid}: {e.strerror}")
    try:
        crash = _crash(pidfd, when)
        try:
            process.open_process(crash, pidfd)
        except process.ProcessGone as e:
            _refuse(settings, record, str(e))
        try:
            process.read_facts(crash)
            record.update(admission.new_record(settings, crash), transport="snapshot", snapshot=request)
            admitted = admission.admit(settings, crash, record, [], limits=False)
            if admitted is None:
                raise SnapshotError(record.get("reason") or "refused by the pod's settings")
            with _one_at_a_time(settings, admitted.owner, crash, record):
                return _snapshot(
                    admitted, pidfd, request, started=started, timeout=timeout, max_size=max_size
                )
        finally:
            crash.close()
    finally:
        os.close(pidfd)


def _crash(pidfd: int, when: float) -> process.Crash:
    """The crash-like description of a live process: the values a kernel would pass, signal 0."""
    info = process.pidfd_info(pidfd)
    values = process.values_from_pidfd(pidfd, info, when)
    values.update(s="0", i=values["p"], I=values["P"], d=str(_dump_mode(info.pid)))
    return process.Crash(values)


def _dump_mode(pid: int) -> int:
    """1, or 2 (a root-only core) for a process whose ids differ, as the kernel decides for setuid."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            ids = [line.split()[1:] for line in f if line.startswith((b"Uid:", b"Gid:"))]
    except OSError:
        return 2
    return 1 if ids and all(len(set(row)) == 1 for row in ids) else 2


def _refuse(settings: config.Settings, record: dict, why: str) -> NoReturn:
    admission.journal(settings, {**record, "event": "refused", "reason": why})
    raise SnapshotError(why)


@contextmanager
def _one_at_a_time(
    settings: config.Settings, owner: lookup.Owner, crash: process.Crash, record: dict
) -> Iterator[None]:
    """A per-container lock: a second snapshot of the same container is refused, not queued.

    The lock is a slot of :func:`corevault.capture.policy.take_slot` (a share of one, in the
    state's ``snapshots/``), so the agent prunes the files of containers gone for a while as it
    prunes dump slots, and never one held."""
    key = owner.container_id or f"pid-{crash.global_pid}"
    fd = policy.take_slot(
        settings.state_dir, "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:120], 1, KIND
    )
    if fd is None:
        _refuse(settings, record, "a snapshot of this container is already being taken")
    try:
        yield
    finally:
        os.close(fd)


def _snapshot(
    admitted: admission.Admitted, pidfd: int, request: dict, *, started: float, timeout: float, max_size: int
) -> Outcome:
    settings, crash, record = admitted.settings, admitted.crash, admitted.record
    spool.ensure(settings.spool_dir)
    path = os.path.join(spool.tmp_dir(settings.spool_dir), f"snapshot-{crash.global_pid}-{os.getpid()}.core")
    try:
        stopped = _gcore(admitted, path, timeout=timeout, max_size=max_size)
        record["snapshot"] = {**request, "stopped_seconds": stopped}
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.unlink(path)
            result = delivery.deliver(admitted, fd, started)
        finally:
            os.close(fd)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
    killed = False
    if request["kill"]:
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            killed = True
    if result is None:
        journal_path = os.path.join(settings.spool_dir, spool.JOURNAL_NAME)
        raise SnapshotError(f"no target could be written; the reasons are in {journal_path}")
    return Outcome(crash.global_pid, result.entry, result.volume, result.size, stopped, killed)


def _gcore(admitted: admission.Admitted, path: str, *, timeout: float, max_size: int) -> float | None:
    """Write the core with gdb; returns how long the process was stopped, as gdb measured it."""
    settings, crash, record = admitted.settings, admitted.crash, admitted.record
    was_stopped = _state(crash.global_pid) in ("T", "t")
    # gdb's clock runs from just before attach to just after detach: the time the process was stopped.
    cmd = [
        "gdb", "-batch", "-nx", "-iex", "set auto-load off", "-iex", "set auto-solib-add off",
        "-iex", "set debuginfod enabled off", "-iex", "set use-coredump-filter on",
        "-iex", "set exec-file-mismatch off", "-ex", f"file {STAND_IN}",
        "-ex", "python import time; gdb.cv_t0 = time.monotonic()",
        "-ex", f"attach {crash.global_pid}", "-ex", f"gcore {path}", "-ex", "detach",
        "-ex", "python print('corevault-stopped %.6f' % (time.monotonic() - gdb.cv_t0))",
    ]  # fmt: skip

    try:
        out, _, returncode = bounded.run(
            cmd, timeout=timeout, limits={resource.RLIMIT_FSIZE: max_size}, stderr=subprocess.STDOUT, cwd="/"
        )
    except subprocess.TimeoutExpired:
        _resume(crash.global_pid, was_stopped)
        _refuse(settings, record, f"snapshot took longer than {timeout:g}s; the process was resumed")
    except bounded.TooMuchOutput as e:
        _resume(crash.global_pid, was_stopped)
        _refuse(settings, record, f"gdb {e} while it took the snapshot; the process was resumed")
    _resume(crash.global_pid, was_stopped)
    text = out.decode(errors="replace")
    if returncode == -signal.SIGXFSZ or (os.path.exists(path) and os.path.getsize(path) >= max_size):
        _refuse(settings, record, f"the process's core is larger than the snapshot cap of {max_size} bytes")
    stopped = None
    for line in text.splitlines():
        if line.startswith("corevault-stopped "):
            stopped = round(float(line.split()[1]), 4)
    if not os.path.exists(path) or stopped is None:
        detail = next((ln for ln in text.splitlines() if "ptrace" in ln or "rror" in ln), "gdb wrote no core")
        _refuse(settings, record, f"gdb could not snapshot the process: {detail.strip()[:200]}")
    return stopped


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _resume(pid: int, was_stopped: bool) -> None:
    """Whatever gdb did, a process that was running before runs again."""
    if not was_stopped and _state(pid) in ("T", "t"):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def pod_processes(
    settings: config.Settings, namespace: str, name: str, container: str | None = None, every: bool = False
) -> list[int]:
    """Host PIDs of a pod's processes on this node: each container's first process, or ``every`` one.

    Raises :class:`NotHere` when the pod has no process here, :class:`SnapshotError` when it has
    several containers and none was chosen.
    """
    found: dict[str, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cg = cgroup.parse(f.read())
        except OSError:
            continue
        if cg is None or cg.container_id is None:
            continue
        owner = lookup.find_owner(settings, cg, "", "", -1)
        if owner.namespace != namespace or owner.name != name:
            continue
        if container is not None and owner.container != container:
            continue
        found.setdefault(owner.container or cg.container_id, []).append((_ns_pid(pid), pid))
    what = f"pod {namespace}/{name}"
    if not found:
        missing = f"container {container}" if container else "process"
        raise NotHere(f"{what} has no {missing} on this node")
    if len(found) > 1 and container is None and not every:
        raise SnapshotError(f"{what} has containers {', '.join(sorted(found))}: choose one with -c, or --all")
    pids = []
    for procs in found.values():
        procs.sort()
        pids += [p for _, p in procs] if every else [procs[0][1]]
    return pids


def _ns_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return pid
