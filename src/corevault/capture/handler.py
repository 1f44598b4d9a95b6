"""The capture handler: one short-lived process per crash, started by the kernel.

It runs as root in the host's initial namespaces with the core on fd 0 and nothing else
but the pidfd open, so it first points fds 1 and 2 at /dev/null (a file opened later must
not become "stdout"), never dumps core itself and arms a timeout so a crashing process is
never held forever. Then, in this order, because /proc/%P is only guaranteed while the
core has not been read to the end:

1. open /proc/%P, prove with the pidfd it is the crashed task, read its facts;
2. find its container and pod (:mod:`.cgroup`, :mod:`.lookup`) and decide (:mod:`.policy`);
3. open the targets: the directory of the expanded pattern inside the container's root
   (:mod:`.safefs`) and a new spool entry; open the mapped ELF objects (:mod:`.buildid`);
4. stream the core once into every target (:mod:`.stream`);
5. publish the plain core, finish the spool entry, copy new binaries into the build-id store.

It never talks to the network, the catalog or the API server. Everything that is dropped,
cut or refused is written to the spool's journal with the reason; a crash that did not opt
in is journaled as skipped and nothing else is written.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

from corevault import config, crashrecord, nodestore, spool
from corevault.capture import buildid, cgroup, corehead, lookup, policy, process, safefs, stream

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the crash path
if TYPE_CHECKING:
    from corevault.crashrecord import CrashRecord


class HandlerTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise HandlerTimeout


def _quiet_stdio() -> None:
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    _quiet_stdio()
    os.umask(0o077)
    # A crash in here must not recurse: the kernel starts pipe helpers with RLIMIT_CORE 1, the
    # one value it honours for pipes ("aborting core"); 0 would be ignored and call us again.
    resource.setrlimit(resource.RLIMIT_CORE, (1, 1))
    args = sys.argv[1:] if argv is None else argv
    path = None
    if len(args) >= 2 and args[0] in ("-c", "--config"):
        path, args = args[1], args[2:]
    warnings: list[str] = []
    if path is None and os.path.exists(config.DEFAULT_SNAPSHOT):
        path = config.DEFAULT_SNAPSHOT
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        settings = config.Settings()
        warnings.append(f"{e}; using built-in defaults")
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    try:
        return capture(settings, args, 0, warnings)
    except Exception as e:  # a bug: say so in the journal rather than vanish
        journal(settings, {"event": "error", "reason": f"handler failed: {type(e).__name__}: {e}"})
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def journal(settings: config.Settings, record: dict) -> None:
    try:
        spool.ensure(settings.spool_dir)
        spool.journal(settings.spool_dir, record)
    except OSError:
        pass  # nowhere left to say it; the crash must still be released


def _core_uses_pid(settings: config.Settings) -> bool:
    if settings.core_uses_pid is not None:
        return settings.core_uses_pid
    try:
        with open("/proc/sys/kernel/core_uses_pid", "rb") as f:
            return f.read().strip() not in (b"", b"0")
    except OSError:
        return False


def signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def capture(settings: config.Settings, args: list[str], core_fd: int, warnings: list[str]) -> int:
    """The pipe transport: the kernel's arguments, the core on ``core_fd``."""
    started = time.monotonic()
    try:
        crash = process.Crash(process.parse_args(args))
    except ValueError as e:
        journal(settings, {"event": "error", "reason": f"bad handler arguments: {e}"})
        return 2
    pidfd_arg = crash.values.get("F", "")
    record = new_record(settings, crash)
    try:
        process.open_process(crash, int(pidfd_arg) if pidfd_arg.isdigit() else None)
    except process.ProcessGone as e:
        journal(settings, {**record, "event": "refused", "reason": str(e), "exe": crash.exe})
        return 0
    admitted = None
    try:
        process.read_facts(crash)
        admitted = admit(settings, crash, record, warnings)
        if admitted is None:
            return 0
        stream.enlarge_pipe(core_fd)
        deliver(admitted, core_fd, started)
        return 0
    finally:
        if admitted is not None:
            admitted.release()
        crash.close()


def new_record(settings: config.Settings, crash: process.Crash) -> dict:
    """The journal record of a crash, as far as the kernel's values tell."""
    return {
        "pid": crash.global_pid,
        "ns_pid": crash.pid,
        "signal": crash.signal,
        "crash_time": crash.time,
        "node": settings.node_name,
    }


class Admitted:
    """A crash that opted in, holds its tenants' dump slots and passed the storm limit."""

    __slots__ = ("cg", "crash", "owner", "plan", "record", "settings", "slots", "tenants")

    def __init__(self, settings: config.Settings, crash: process.Crash, *, cg: cgroup.CgroupInfo | None,
                 owner: lookup.Owner, plan: policy.Plan, record: dict, slots: list[int]) -> None:  # fmt: skip
        self.settings = settings
        self.crash = crash
        self.cg = cg
        self.owner = owner
        self.plan = plan
        self.record = record
        #: the pod's and the namespace's share keys (see :func:`policy.tenant_keys`)
        self.tenants = policy.tenant_keys(owner)
        #: the locked slot files; closing them gives the slots back
        self.slots = slots

    def replan(self) -> None:
        """Expand the pattern again, once values that were unknown at admission are known."""
        self.plan = policy.plan(self.crash, self.owner, self.settings, _core_uses_pid(self.settings))
        self.record.update(signal=self.crash.signal)

    def release(self) -> None:
        """Give the tenants' dump slots back (a pipe handler's exit does it too)."""
        for fd in self.slots:
            os.close(fd)
        self.slots = []


def admit(
    settings: config.Settings, crash: process.Crash, record: dict, warnings: list[str], *, limits: bool = True
) -> Admitted | None:
    """Decide whether this crash gets a core: its pod opted in, and the storm limit allows it.

    Everything refused is journaled here with the reason (also left in ``record["reason"]``);
    None means no core. ``limits=False`` (no dump slots, no storm limit) is for snapshots: a
    person asked for them, and they hold none of the kernel's dump slots.
    """
    record.update(exe=crash.exe, comm=crash.comm)
    cg = cgroup.parse(crash.cgroup)
    owner = lookup.find_owner(settings, cg, crash.exe, crash.comm, crash.uid)
    record["pod"] = owner.as_dict()
    plan = policy.plan(crash, owner, settings, _core_uses_pid(settings))
    warnings += plan.warnings
    if warnings:
        record["warnings"] = warnings
    if plan.refused:
        event = "skipped" if not plan.opted_in else "refused"
        record["reason"] = plan.refused
        journal(settings, {**record, "event": event})
        return None
    if not limits:
        return Admitted(settings, crash, cg=cg, owner=owner, plan=plan, record=record, slots=[])
    slots = _take_slots(settings, policy.tenant_keys(owner), record)
    if slots is None:
        return None
    kept, seen = policy.admit(
        settings.state_dir,
        policy.storm_key(owner, crash),
        settings.storm_max,
        settings.storm_window,
        time.time(),
    )
    if not kept:
        reason = (
            f"crash storm: {seen} crashes of this container in {settings.storm_window:g}s, "
            f"at most {settings.storm_max} cores kept"
        )
        record["reason"] = reason
        journal(settings, {**record, "event": "dropped"})
        for fd in slots:
            os.close(fd)
        return None
    return Admitted(settings, crash, cg=cg, owner=owner, plan=plan, record=record, slots=slots)


def _take_slots(
    settings: config.Settings, tenants: tuple[str | None, str | None], record: dict
) -> list[int] | None:
    """One of the pod's and one of the namespace's dump slots; None (journaled) when either is full.

    Refusing here, before a byte of the core is read, is what keeps one tenant from holding
    the kernel's core_pipe_limit: the handler exits at once and the kernel frees the slot.
    """
    pod, namespace = tenants
    held: list[int] = []
    for key, share, whose in (
        (pod, settings.pod_dumps, "pod"),
        (namespace, settings.namespace_dumps, "namespace"),
    ):
        if key is None:
            continue
        fd = policy.take_slot(settings.state_dir, key, share)
        if fd is None:
            for h in held:
                os.close(h)
            reason = (
                f"{share} dumps of this {whose} are being read already (its share, [capture] {whose}_dumps); "
                "refused before the core was read"
            )
            record["reason"] = reason
            journal(settings, {**record, "event": "dropped"})
            return None
        held.append(fd)
    return held


def spool_budget(settings: config.Settings, tenants: tuple[str | None, str | None]) -> tuple[int, str]:
    """Bytes a new spool entry of ``tenants`` may take, and what limits it; SinkFailed when none."""
    spool.ensure(settings.spool_dir)
    pod, namespace = tenants
    shares = {k: part for k, part in ((pod, settings.pod_share), (namespace, settings.namespace_share)) if k}
    budget, binding = spool.room(
        settings.spool_dir, settings.spool_max_size, settings.spool_keep_free, shares
    )
    if binding is None:
        what = "spool is full (its max_size or keep_free is reached)"
    else:
        whose, part = (
            ("pod", settings.pod_share) if binding == pod else ("namespace", settings.namespace_share)
        )
        what = f"spool is full for this {whose}: its share ([spool] {whose}_share = {part:g}) is used up"
    if budget <= 0:
        raise stream.SinkFailed(what)
    return budget, what


def store_room(settings: config.Settings) -> int:
    """Bytes the node's binary store may still take (its quota, the spool's max_size, keep_free)."""
    try:
        s, used = settings, spool.usage(settings.spool_dir)
        return nodestore.room(s.buildid_dir, s.store_max_size, used, s.spool_max_size, s.spool_keep_free)
    except OSError:
        return 0


def spool_full(settings: config.Settings, tenants: tuple[str | None, str | None]) -> str | None:
    """Why no spool entry can be made now, if it cannot (the vault target only)."""
    try:
        spool_budget(settings, tenants)
    except (OSError, stream.SinkFailed) as e:
        return _reason(e)
    return None


class Delivered:
    """Where one core went: the spool entry, the path in the pod's volume, its size, what failed."""

    __slots__ = ("entry", "problems", "size", "volume")

    def __init__(self, entry: str | None, volume: str | None, size: int, problems: list[str]) -> None:
        self.entry = entry
        self.volume = volume
        self.size = size
        self.problems = problems


def deliver(
    admitted: Admitted, core_fd: int, started: float, head: corehead.Head | None = None
) -> Delivered | None:
    """Stream the core (``head``'s bytes, then ``core_fd``) into the crash's targets and publish them.

    Without ``head`` (the pipe), the core's headers are read here first: they say how long the
    core should be (:mod:`.corehead`). Returns where the core went, or None when nothing could
    be written (journaled with why).
    """
    settings, crash, record = admitted.settings, admitted.crash, admitted.record
    job = _Job(settings, crash, admitted.owner, admitted.plan, record)
    job.tenants = admitted.tenants
    try:
        job.open_targets()
        if not job.sinks:
            journal(settings, {**record, "event": "dropped", "reason": "; ".join(job.problems)})
            return
        # The mapped binaries are opened while the process still exists, copied later.
        job.modules = buildid.open_modules(crash.proc_fd, crash.maps)
        try:
            head = head if head is not None else corehead.read_head(core_fd)
            job.size, job.truncated = stream.pump(core_fd, job.sinks, admitted.plan.limit, head.data)
        except HandlerTimeout:
            reason = f"handler timeout after {settings.timeout:g}s; raise [capture] timeout for larger cores"
            journal(settings, {**record, "event": "dropped", "reason": reason})
            return
        job.problems += [f"{s.name}: {s.failed}" for s in job.sinks if s.failed]
        if head.size is not None and not job.truncated and job.size < head.size:
            # The kernel stops writing when the dumping process gets a fatal signal (a
            # SIGKILL meanwhile, or the OOM killer); the stream then simply ends early.
            job.truncated, job.expected = True, head.size
        job.publish_volume()
        buildid.store_modules(settings.buildid_dir, job.modules, store_room(settings))
        job.finish_entry(admitted.cg, started)
        return job.report()
    finally:
        job.close()


class _Job:
    """The targets of one admitted crash, from opening them to cleaning up after a failure."""

    def __init__(
        self,
        settings: config.Settings,
        crash: process.Crash,
        owner: lookup.Owner,
        plan: policy.Plan,
        record: dict,
    ) -> None:
        self.settings = settings
        self.crash = crash
        self.owner = owner
        self.plan = plan
        self.record = record
        self.sinks: list = []
        self.problems: list[str] = []
        self.modules: list[buildid.Module] = []
        self.volume: dict = {"pattern": plan.pattern, "path": plan.volume_path, "written": False}
        self.volume_dir = -1
        self.volume_file: safefs.NewFile | None = None
        self.volume_sink: stream.SparseSink | None = None
        self.vault: stream.ZstdSink | None = None
        self.tenants: tuple[str | None, str | None] = policy.tenant_keys(owner)
        self.entry_id: str | None = None
        self.entry_tmp: str | None = None
        self.size = 0
        self.truncated = False
        #: the size the core's program headers promised, when the kernel stopped short of it
        self.expected: int | None = None

    def open_targets(self) -> None:
        if self.plan.volume_path is not None:
            directory = self.plan.volume_path.rpartition("/")[0] or "/"
            try:
                self.volume_dir = safefs.open_dir(self.crash.root_fd, directory)
                self.volume_file = safefs.NewFile(self.volume_dir)
                self.volume_sink = stream.SparseSink(self.volume_file.fd)
                self.sinks.append(self.volume_sink)
            except (safefs.UnsafePath, OSError) as e:
                self._volume_failed(e)
        if self.plan.vault:
            s = self.settings
            try:
                budget, what = spool_budget(s, self.tenants)
                self.entry_id = spool.new_id(time.time(), self.crash.global_pid)
                self.entry_tmp = os.path.join(spool.tmp_dir(s.spool_dir), self.entry_id)
                os.mkdir(self.entry_tmp, 0o700)
                spool.write_owner(self.entry_tmp, [k for k in self.tenants if k])
                fd = os.open(
                    os.path.join(self.entry_tmp, spool.CORE_NAME),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                )
                level, threads = s.compression_level, s.compression_threads
                self.vault = stream.ZstdSink(fd, level, threads, budget, over=what, recheck=self._room)
                self.sinks.append(self.vault)
            except (OSError, stream.SinkFailed) as e:
                self.problems.append(f"vault: {_reason(e)}")

    def _room(self) -> tuple[int, str]:
        """The spool's room for this entry now (it counts what the entry holds already)."""
        try:
            return spool_budget(self.settings, self.tenants)
        except stream.SinkFailed as e:
            return 0, str(e)

    def _volume_failed(self, e: BaseException) -> None:
        self.volume["error"] = _reason(e)
        self.problems.append(f"volume: {self.volume['error']}")

    def publish_volume(self) -> None:
        """Give the plain core its kernel-exact name, owned as the kernel would own it."""
        if self.volume_file is None or self.volume_sink is None:
            return
        if self.volume_sink.failed:  # already among the problems; the metadata says it too
            self.volume["error"] = self.volume_sink.failed
            return
        directory, _, name = (self.plan.volume_path or "").rpartition("/")
        # Dump mode 2 (a process that changed credentials): root-only, like the kernel.
        uid, gid = (0, 0) if self.crash.dump_mode == 2 else (self.crash.fsuid, self.crash.fsgid)
        try:
            self.volume_sink.finish()
            published = self.volume_file.publish(name, uid, gid)
        except (OSError, safefs.UnsafePath) as e:
            self._volume_failed(e)
            return
        self.volume.update(written=True, path=f"{directory}/{published}", uid=uid, gid=gid, mode="0600")

    def finish_entry(self, cg: cgroup.CgroupInfo | None, started: float) -> None:
        vault = self.vault
        if vault is None or vault.failed or self.entry_tmp is None or self.entry_id is None:
            return
        try:
            vault.finish()
            self.vault = None
            meta = _record(self, self.entry_id, vault, cg, started)
            _finish_entry(self.settings.spool_dir, self.entry_id, self.entry_tmp, vault.fd, meta)
        except (OSError, stream.SinkFailed) as e:
            self.problems.append(f"vault: {_reason(e)}")
            return
        self.entry_tmp = None

    def report(self) -> Delivered | None:
        """Journal the outcome: what was cut, what was dropped, and where the core went."""
        event = {
            **self.record,
            "pattern": self.plan.pattern,
            "size": self.size,
            "volume": self.volume["path"] if self.volume["written"] else None,
            "entry": self.entry_id if self.entry_tmp is None and self.plan.vault else None,
        }
        if self.truncated:
            reason = _truncation(self.size, self.expected, self.plan)
            journal(self.settings, {**event, "event": "truncated", "reason": reason})
        for problem in self.problems:
            journal(self.settings, {**event, "event": "dropped", "reason": problem})
        if self.volume["written"] or event["entry"]:
            journal(self.settings, {**event, "event": "captured"})
            return Delivered(event["entry"], event["volume"], self.size, self.problems)
        return None

    def close(self) -> None:
        if self.volume_file is not None:
            self.volume_file.discard()
        if self.volume_dir >= 0:
            os.close(self.volume_dir)
        if self.vault is not None:
            os.close(self.vault.fd)
        if self.entry_tmp is not None:
            import shutil

            shutil.rmtree(self.entry_tmp, ignore_errors=True)
        for m in self.modules:
            if m.fd >= 0:
                os.close(m.fd)


def _record(
    job: _Job, entry_id: str, vault: stream.ZstdSink, cg: cgroup.CgroupInfo | None, started: float
) -> CrashRecord:
    """The spool entry's metadata: everything the vault and the analysis need to know."""
    crash = job.crash
    return {
        "version": crashrecord.RECORD_VERSION,
        "id": entry_id,
        "node": job.settings.node_name,
        "time": crash.time,
        "captured_at": time.time(),
        "handler_seconds": round(time.monotonic() - started, 4),
        # Peak RSS so far, the core streamed. A pipe handler is started from a kernel thread,
        # so this is its own (nothing inherited at exec); in socket mode, the receiver's.
        "handler_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "signal": {"number": crash.signal, "name": signal_name(crash.signal)},
        "process": {
            "pid": crash.global_pid,
            "ns_pid": crash.pid,
            "tid": crash.global_tid,
            "ns_tid": crash.tid,
            "uid": crash.uid,
            "gid": crash.gid,
            "fsuid": crash.fsuid,
            "fsgid": crash.fsgid,
            "comm": crash.comm,
            "exe": crash.exe,
            "cmdline": crash.cmdline,
            "environ": crash.environ,
            "hostname": crash.hostname,
            "dump_mode": crash.dump_mode,
            "rlimit_core": crash.rlimit_core,
            "cpu": crash.cpu,
        },
        "pod": job.owner.as_dict(),
        "cgroup": cg.path if cg else None,
        "core": {
            "size": job.size,
            "truncated": job.truncated,
            "limit": job.plan.limit,
            "limit_source": job.plan.limit_source,
            **({"expected_size": job.expected, "cut_by": "kernel"} if job.expected is not None else {}),
            "sha256": vault.sha256,
            "stored_size": vault.stored,
            "compression": "zstd",
            "file": spool.CORE_NAME,
        },
        "volume": job.volume,
        "modules": [m.as_dict() for m in job.modules],
        "warnings": job.record.get("warnings", []),
        "problems": job.problems,
        "snapshot": job.record.get("snapshot"),
    }


def _finish_entry(spool_dir: str, entry_id: str, entry_tmp: str, core_fd: int, meta: CrashRecord) -> None:
    """fsync the core and its metadata, then move the entry into ready/ in one rename."""
    try:
        os.fsync(core_fd)
    finally:
        os.close(core_fd)
    meta_path = os.path.join(entry_tmp, spool.META_NAME)
    fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        data = json.dumps(meta, indent=1, sort_keys=True).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(entry_tmp, os.path.join(spool.ready_dir(spool_dir), entry_id))
    ready = os.open(spool.ready_dir(spool_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(ready)
    finally:
        os.close(ready)


def _truncation(size: int, expected: int | None, plan: policy.Plan) -> str:
    if expected is not None:
        return (
            f"the kernel stopped the dump after {size} of {expected} bytes "
            "(the process was killed while it was being dumped)"
        )
    return f"cut at {plan.limit} bytes by {plan.limit_source}"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e)
