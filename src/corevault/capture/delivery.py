"""Delivery: one admitted core streamed into its targets and published.

The targets are the directory of the expanded pattern inside the container's root
(:mod:`.safefs`, written on a thread of its own: :mod:`.volumecopy`) and a new spool entry;
the mapped ELF objects are opened while the process still exists (:mod:`.buildid`). The core
is streamed once into every target (:mod:`.stream`); once it is read the process is let go
while the plain core gets its kernel-exact name, and the spool entry its
record (:mod:`corevault.crashrecord`) and one rename into ``ready/``, and new binaries go
into the build-id store. What failed or was cut is journaled; a half-written target is
removed.
"""

from __future__ import annotations

import os
import time

from corevault import atomic, config, fingerprint, nodestore, quickjson, spool
from corevault.capture import (
    admission,
    buildid,
    calloff,
    cgroup,
    corehead,
    hashcache,
    lookup,
    policy,
    process,
    stream,
    stuckwriters,
    volumecopy,
)
from corevault.capture.admission import describe_error, journal

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the crash path
if TYPE_CHECKING:
    from corevault.crashrecord import CrashRecord

#: the version of the crash record this handler writes (:mod:`corevault.crashrecord` says what
#: each holds). Kept here, not there: importing that module would make its eight record classes
#: on every crash (0.9 M instructions, ~2 % of a small crash's handler, by callgrind)
RECORD_VERSION = 2


class HandlerTimeout(Exception):
    """The handler's timeout struck (SIGALRM): the dump is dropped and the process released."""


def signal_name(number: int) -> str | None:
    """``signal.Signals(number).name``, without importing ``signal``: it builds that enum at import,
    and importing ``enum`` costs the handler ~5 ms of every crash. Of several names for one
    number (SIGABRT and SIGIOT) the enum keeps the first in sorted order; so does this.
    """
    import _signal

    # the names of ``number`` alone, not every signal's sorted (~0.1 ms of every crash)
    names = [
        name
        for name, value in vars(_signal).items()
        if value == number and isinstance(value, int)
        if name.isupper() and name.startswith("SIG") and not name.startswith("SIG_")
    ]
    return min(names, default=None)


def store_room(settings: config.Settings, spool_used: int | None = None) -> int:
    """Bytes the node's binary store may still take (its quota, the spool's max_size, keep_free).

    ``spool_used``: the spool's bytes where the caller knows them, so the spool is not walked again.
    """
    try:
        s, used = settings, spool.usage(settings.spool_dir) if spool_used is None else spool_used
        return nodestore.room(s.buildid_dir, s.store_max_size, used, s.spool_max_size, s.spool_keep_free)
    except OSError:
        return 0


class Delivered:
    """Where one core went: the spool entry, the path in the pod's volume, its size, what failed."""

    __slots__ = ("entry", "problems", "size", "volume")

    def __init__(self, entry: str | None, volume: str | None, size: int, problems: list[str]) -> None:
        self.entry = entry
        self.volume = volume
        self.size = size
        self.problems = problems


def deliver(
    admitted: admission.Admitted,
    core_fd: int,
    started: float,
    head: corehead.Head | None = None,
    call: calloff.Call | None = None,
) -> Delivered | None:
    """Stream the core (``head``'s bytes, then ``core_fd``) into the crash's targets and publish them.

    Without ``head`` (the pipe), the core's headers are read here first: they say how long the
    core should be (:mod:`.corehead`). Returns where the core went, or None when nothing could
    be written (journaled with why). With ``call`` (socket mode, :mod:`.calloff`), the dump may
    be called off from another thread: it then returns None at its next step and publishes
    nothing; the pod's files are read only after the process is let go (``call.give_back()``
    then gives the node-wide slots back), so a file that never answers holds nothing node-wide.
    """
    settings, crash, record = admitted.settings, admitted.crash, admitted.record
    job = _Job(settings, crash, admitted.owner, admitted.plan, record)
    job.tenants = admitted.tenants
    job.call = call
    try:
        job.open_targets()
        if call is not None:
            call.opened_entry(job.entry_tmp)
        if not job.sinks:
            journal(settings, {**record, "event": "dropped", "reason": "; ".join(job.problems)})
            return
        # The mapped binaries are opened while the process still exists, copied later. In
        # socket mode they are only held here (O_PATH: nothing asked of their filesystem) and
        # read once the process is let go.
        # The process's mountinfo says which files lie on the pod's own FUSE mounts (never
        # opened) and where the hash cache may be trusted; it goes with the process.
        mounts = hashcache.Mounts(crash.proc_fd)
        job.modules, job.objects_skipped = buildid.hold_modules(
            crash.proc_fd, crash.maps, settings.objects_max, path_only=call is not None, mounts=mounts
        )
        if call is None:
            job.modules, job.objects_skipped = buildid.identify_modules(
                job.modules, settings.objects_max_size, job.objects_skipped
            )
        try:
            head = head if head is not None else corehead.read_head(core_fd)
            # the memory at the stack pointer, as it streams past, for the crash's fingerprint
            tap = stream.Window(head.stack, fingerprint.STACK_BYTES) if head.stack is not None else None
            if job.vault is not None:
                job.vault.expected = head.size
            taps = [tap] if tap is not None else []
            # socket mode: a core that stops coming (its pages on a filesystem that does not
            # answer) gives the node-wide slots back and is read on until its deadline
            stalled = call.give_back if call is not None else None
            job.size, job.truncated = stream.pump(
                core_fd, job.sinks, admitted.plan.limit, head.data, taps, stalled=stalled
            )
        except HandlerTimeout:
            reason = f"handler timeout after {settings.timeout:g}s; raise [capture] timeout for larger cores"
            journal(settings, {**record, "event": "dropped", "reason": reason})
            return
        if call is not None:
            call.check()
        job.problems += [f"{s.name}: {s.failed}" for s in job.sinks if s.failed]
        written = any(not s.failed for s in job.sinks)  # else the handler stopped reading, not the kernel
        if head.size is not None and not job.truncated and written and job.size < head.size:
            # The kernel stops writing when the dumping process gets a fatal signal (a
            # SIGKILL meanwhile, or the OOM killer); the stream then simply ends early.
            job.truncated, job.expected = True, head.size
        # The volume's copy is finished and published on its own thread; the process waits for it
        # only as long as the stall rule allows: a volume that does not answer holds nothing
        # node-wide, and a slow upload goes on after the let-go, with the binaries' storing.
        job.ask_publish()
        job.publish_volume(None)
        # Everything after this works from what was read and the fds opened before: the kernel may
        # let the process go (the compressed copy and its hash finish on their threads meanwhile)
        # and its dump slot is free then. The tenants' slots stay held until the handler ends: the
        # work left (hashing and storing up to max_objects_size of binaries) is the pod's, and its
        # share bounds how many of its crashes do it at once.
        stream.let_go(core_fd)
        if call is not None:
            call.stage = "let go"
            call.give_back()
            call.check()
            job.modules, job.objects_skipped = buildid.identify_modules(
                job.modules, settings.objects_max_size, job.objects_skipped, reopen=True
            )
            call.check()
        hashes = hashcache.cache_dir(settings.state_dir)
        buildid.store_modules(
            settings.buildid_dir,
            job.modules,
            lambda: store_room(settings, job.spool_used()),
            hashes,
            mounts=mounts,
        )
        # waited for until shortly before the deadline, so the spool entry is finished in time
        job.publish_volume(started + settings.timeout - min(stream.STALL, settings.timeout / 2))
        if call is not None:
            call.check()
            if job.volume["written"]:
                call.volume = job.volume["path"]
        stack = bytes(tap.data) if tap is not None else b""
        modules = [m.as_dict() for m in job.modules]
        job.fingerprint = fingerprint.of(head.signal, head.code, head.pc, stack, modules)
        job.finish_entry(admitted.cg, started)
        return job.report()
    except calloff.CalledOff:
        return None  # journaled by whoever called it off
    except HandlerTimeout:
        # Struck after the core was read (the pipe handler's timer runs to its end): the work left
        # is dropped as a timeout, said as one, with the plain core where it was published already.
        reason = (
            f"handler timeout after {settings.timeout:g}s, after the core was read, while its copy "
            "and binaries were stored; raise [capture] timeout for larger cores or binaries"
        )
        volume = job.volume["path"] if job.volume["written"] else None
        journal(
            settings, {**record, "event": "dropped", "reason": reason, "size": job.size, "volume": volume}
        )
        return None
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
        self.call: calloff.Call | None = None
        self.problems: list[str] = []
        self.modules: list[buildid.Module] = []
        #: why some mapped files were not looked at or not stored (the per-crash bounds), or None
        self.objects_skipped: str | None = None
        #: where it crashed, cheaply (corevault.fingerprint), once the modules are hashed
        self.fingerprint: str | None = None
        self.volume: dict = {"pattern": plan.pattern, "path": plan.volume_path, "written": False}
        self.volume_copy: volumecopy.VolumeCopy | None = None
        self.volume_owner = (0, 0)
        self.vault: stream.ZstdSink | None = None
        self.tenants: tuple[str | None, str | None] = policy.tenant_keys(owner)
        self.entry_id: str | None = None
        self.entry_tmp: str | None = None
        #: the spool's use by owner when this entry was opened (None: no entry)
        self.spool_usage: tuple[int, dict[str, int]] | None = None
        self.size = 0
        self.truncated = False
        #: the size the core's program headers promised, when the kernel stopped short of it
        self.expected: int | None = None

    def open_targets(self) -> None:
        if self.plan.volume_path is not None:
            directory = self.plan.volume_path.rpartition("/")[0] or "/"
            stuck = stuckwriters.blocked(self.settings, self.tenants)
            if stuck is not None:
                self._volume_failed(volumecopy.VolumeFailed(stuck))
            else:
                s = self.settings
                c = self.crash
                whose = {"pid": c.global_pid, "comm": c.comm, "exe": c.exe, "pod": self.owner.as_dict()}
                copy = volumecopy.VolumeCopy(
                    s,
                    self.tenants,
                    self.crash.root_fd,
                    directory,
                    stream.STALL,
                    proc_fd=self.crash.proc_fd,
                    whose=whose,
                )
                self.volume_copy = copy
                self.sinks.append(copy)
        if self.plan.vault:
            s = self.settings
            try:
                # walked once: the binaries' room (store_room) counts from the same figure
                self.spool_usage = spool.usage_by_owner(s.spool_dir)
                budget, what = admission.spool_budget(s, self.tenants, self.spool_usage)
                self.entry_id = spool.new_id(time.time(), self.crash.global_pid)
                self.entry_tmp = os.path.join(spool.tmp_dir(s.spool_dir), self.entry_id)
                entry_tmp = self.entry_tmp
                spool.made(s.spool_dir, lambda: os.mkdir(entry_tmp, 0o700))
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
                self.problems.append(f"vault: {describe_error(e)}")

    def spool_used(self) -> int | None:
        """The spool's bytes now, as far as this crash knows without walking it again: what it held
        when this entry was opened, and what the entry has written since (None: not known)."""
        if self.spool_usage is None:
            return None
        return self.spool_usage[0] + (self.vault.stored if self.vault is not None else 0)

    def _room(self) -> tuple[int, str]:
        """The spool's room for this entry now (it counts what the entry holds already)."""
        try:
            return admission.spool_budget(self.settings, self.tenants)
        except stream.SinkFailed as e:
            return 0, str(e)

    def _volume_failed(self, e: BaseException) -> None:
        self.volume["error"] = describe_error(e)
        self.problems.append(f"volume: {self.volume['error']}")

    def ask_publish(self) -> None:
        """Ask the volume's writer to give the plain core its kernel-exact name, owned as the
        kernel would own it (:meth:`publish_volume` waits for it)."""
        copy = self.volume_copy
        if copy is None or copy.failed:
            return
        name = (self.plan.volume_path or "").rpartition("/")[2]
        # Dump mode 2 (a process that changed credentials): root-only, like the kernel.
        uid, gid = (0, 0) if self.crash.dump_mode == 2 else (self.crash.fsuid, self.crash.fsgid)
        self.volume_owner = (uid, gid)
        try:
            copy.publish(name, uid, gid)
        except volumecopy.VolumeFailed as e:
            copy.failed = str(e)
            self._volume_failed(e)

    def publish_volume(self, until: float | None) -> None:
        """Wait for the plain core's publish until ``until`` (monotonic) at most, or (None) as long as
        its writer makes progress and the publish no longer than the stall rule; say what failed."""
        copy = self.volume_copy
        if copy is None or self.volume["written"] or "error" in self.volume:
            return
        if copy.failed:  # among the problems already; the metadata says it too
            self.volume["error"] = copy.failed
            return
        try:
            published = copy.result(until)
            if published is None:
                return  # still publishing: asked again after the let-go
        except volumecopy.VolumeFailed as e:
            copy.failed = str(e)
            self._volume_failed(e)
            return
        directory = (self.plan.volume_path or "").rpartition("/")[0]
        uid, gid = self.volume_owner
        self.volume.update(written=True, path=f"{directory}/{published}", uid=uid, gid=gid, mode="0600")

    def finish_entry(self, cg: cgroup.CgroupInfo | None, started: float) -> None:
        vault = self.vault
        if vault is None or vault.failed or self.entry_tmp is None or self.entry_id is None:
            return
        try:
            vault.finish()
            self.vault = None
            meta = _record(self, self.entry_id, vault, cg, started)
            spool_dir, entry_id, entry_tmp = self.settings.spool_dir, self.entry_id, self.entry_tmp
            if self.call is not None:  # never renamed into ready/ once called off
                ran: list[bool] = []

                def finish() -> None:
                    ran.append(True)
                    _finish_entry(spool_dir, entry_id, entry_tmp, vault.fd, meta)  # closes the fd

                try:
                    self.call.publish(finish)
                except calloff.CalledOff:
                    if not ran:
                        os.close(vault.fd)
                    raise
            else:
                _finish_entry(spool_dir, entry_id, entry_tmp, vault.fd, meta)
        except (OSError, stream.SinkFailed) as e:
            self.problems.append(f"vault: {describe_error(e)}")
            return
        self.entry_tmp = None

    def report(self) -> Delivered | None:
        """Journal the outcome: what was cut, what was dropped, and where the core went."""
        if self.call is not None:
            self.call.finish()
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
        if self.objects_skipped is not None:
            journal(self.settings, {**event, "event": "objects-skipped", "reason": self.objects_skipped})
        for problem in self.problems:
            journal(self.settings, {**event, "event": "dropped", "reason": problem})
        if self.volume["written"] or event["entry"]:
            journal(self.settings, {**event, "event": "captured"})
            return Delivered(event["entry"], event["volume"], self.size, self.problems)
        return None

    def close(self) -> None:
        if self.volume_copy is not None:
            try:
                self.volume_copy.close()
            except HandlerTimeout:
                pass  # struck while the writer removed its file: what is left below is closed still
        if self.vault is not None:
            self.vault.close()
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
        "version": RECORD_VERSION,
        "id": entry_id,
        "node": job.settings.node_name,
        "time": crash.time,
        "captured_at": time.time(),
        "handler_seconds": round(time.monotonic() - started, 4),
        # Peak RSS so far, the core streamed. A pipe handler is started from a kernel thread,
        # so this is its own (nothing inherited at exec); in socket mode, the receiver's.
        "handler_max_rss_kib": peak_rss_kib(),
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
        "fingerprint": job.fingerprint,
        "warnings": [*job.record.get("warnings", []), *filter(None, [job.objects_skipped])],
        "problems": job.problems,
        "snapshot": job.record.get("snapshot"),
    }


def peak_rss_kib() -> int | None:
    """This process's peak RSS in KiB (``VmHWM``, what ``getrusage`` gives as ``ru_maxrss``);
    None when /proc does not say. Read from /proc: the ``resource`` module's extension would
    cost every crash more to load than this read."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        return int(status.partition(b"\nVmHWM:")[2].split(None, 1)[0])
    except (OSError, ValueError, IndexError):
        return None


def _finish_entry(spool_dir: str, entry_id: str, entry_tmp: str, core_fd: int, meta: CrashRecord) -> None:
    """fsync the core and its metadata, then move the entry into ready/ in one rename.

    The metadata's writeback is started before the core is synced (``posix_fadvise``'s
    ``DONTNEED`` writes dirty pages back, without waiting, before it drops clean ones; Python has
    no ``sync_file_range``): a journaling filesystem (ext4, XFS) then commits both files in the
    core's ``fsync``, and the metadata's finds its file committed (one journal commit where there
    were two). Each file is still synced before the rename, so an entry in ready/ is whole on any
    filesystem.
    """
    try:
        meta_path = os.path.join(entry_tmp, spool.META_NAME)
        fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            data = quickjson.dumps(meta, sort_keys=True).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # a hint: without it, the metadata is written in its own fsync
            os.fsync(core_fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(core_fd)
    os.rename(entry_tmp, os.path.join(spool.ready_dir(spool_dir), entry_id))
    atomic.fsync_dir(spool.ready_dir(spool_dir))


def _truncation(size: int, expected: int | None, plan: policy.Plan) -> str:
    if expected is not None:
        return (
            f"the kernel stopped the dump after {size} of {expected} bytes "
            "(the process was killed while it was being dumped)"
        )
    return f"cut at {plan.limit} bytes by {plan.limit_source}"
