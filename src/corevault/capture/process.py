"""The crashed process: the kernel's arguments and the facts read from ``/proc/%P``.

The kernel starts the pipe handler with every core(5) specifier as an argument (in the
order of :data:`corevault.pattern.SPECIFIERS`), the core on fd 0 and, with ``%F``, a pidfd
of the crashed task on some fd. ``/proc/%P`` stays readable until the handler has read
the core's EOF (with ``core_pipe_limit > 0``, until it lets go of the pipe:
:func:`corevault.capture.stream.let_go`), but a PID can be reused, so
the handler opens ``/proc/%P`` first and then checks with the pidfd that the task is alive
and still has that PID (CVE-2025-4598, CVE-2019-15790 came from skipping that check). Every
later read goes through the directory fd opened before the check.
"""

from __future__ import annotations

import os

from corevault import redact
from corevault.pattern import SPECIFIERS

ULONG_MAX = (1 << 64) - 1


class ProcessGone(Exception):
    """/proc/%P is not (or no longer) the process that crashed."""


class Crash:
    """One crash as the kernel described it, plus what /proc said while the task existed."""

    __slots__ = (
        "cgroup", "cmdline", "comm", "cpu", "dump_mode", "environ", "exe", "fsgid", "fsuid", "gid",
        "global_pid", "global_tid", "hostname", "maps", "pid", "proc_fd", "rlimit_core", "root_fd", "signal",
        "tid", "time", "uid", "values",
    )  # fmt: skip

    def __init__(self, values: dict[str, str]) -> None:
        #: the kernel's own formatted (and escaped) value for each specifier letter
        self.values = values
        self.global_pid = _int(values, "P")
        self.pid = _int(values, "p")
        self.tid = _int(values, "i")
        self.global_tid = _int(values, "I")
        self.signal = _int(values, "s")
        self.time = _int(values, "t")
        self.dump_mode = _int(values, "d")
        self.uid = _int(values, "u")
        self.gid = _int(values, "g")
        self.cpu = _int(values, "C")
        limit = _int(values, "c", ULONG_MAX)
        #: soft RLIMIT_CORE in bytes, None when unlimited
        self.rlimit_core: int | None = None if limit >= ULONG_MAX else limit
        self.hostname = values.get("h", "")
        self.comm = values.get("e", "")
        self.exe = values.get("E", "").replace("!", "/")
        self.fsuid = self.uid
        self.fsgid = self.gid
        self.cmdline: list[str] = []
        #: the environment at exec (as /proc shows it), secret-looking values redacted
        self.environ: dict[str, str] = {}
        self.cgroup = ""
        self.maps = ""
        self.proc_fd = -1
        self.root_fd = -1

    def close(self) -> None:
        """Close /proc/PID and the root (a long-running agent captures many crashes)."""
        for fd in (self.proc_fd, self.root_fd):
            if fd >= 0:
                os.close(fd)
        self.proc_fd = self.root_fd = -1


def _int(values: dict[str, str], key: str, default: int = -1) -> int:
    try:
        return int(values.get(key, ""))
    except ValueError:
        return default


def parse_args(argv: list[str]) -> dict[str, str]:
    """Map the handler's positional arguments to specifier letters."""
    if len(argv) < len(SPECIFIERS) - 1:
        raise ValueError(
            f"expected {len(SPECIFIERS)} arguments ({' '.join('%' + s for s in SPECIFIERS)}), got {len(argv)}"
        )
    # The kernel's arguments are bytes the process chose (%e, %E, %f): Python decoded them with
    # surrogateescape, which no JSON reader, database or terminal takes as text. A byte that is
    # not UTF-8 is shown as U+FFFD, as everything else read from /proc is.
    return dict(zip(SPECIFIERS, (os.fsencode(a).decode(errors="replace") for a in argv), strict=False))


def pidfd_pid(pidfd: int) -> int:
    """The PID (in our namespace) of the task behind a pidfd; -1 once it has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    raise ProcessGone(f"fd {pidfd} is not a pidfd")


def open_process(crash: Crash, pidfd: int | None) -> None:
    """Open /proc/%P and the process's root, then prove they belong to the crashed task."""
    try:
        proc_fd = os.open(f"/proc/{crash.global_pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ProcessGone(f"cannot open /proc/{crash.global_pid}: {e.strerror}") from None
    try:
        if pidfd is None:
            # Kernels before %F: a pidfd opened now is as good as the check gets.
            pidfd = os.pidfd_open(crash.global_pid)
            owned = True
        else:
            owned = False
        try:
            if pidfd_pid(pidfd) != crash.global_pid:
                raise ProcessGone(f"pid {crash.global_pid} no longer belongs to the crashed process")
        finally:
            if owned:
                os.close(pidfd)
        crash.root_fd = os.open("root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc_fd)
    except OSError as e:
        os.close(proc_fd)
        raise ProcessGone(f"cannot reach process {crash.global_pid}: {e.strerror}") from None
    except ProcessGone:
        os.close(proc_fd)
        raise
    crash.proc_fd = proc_fd


def read_facts(crash: Crash) -> None:
    """Fill in what /proc knows beyond the kernel's arguments (best effort, never raises)."""
    fd = crash.proc_fd
    status = _read(fd, "status")
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key == "Uid" and len(fields) == 4:
            crash.fsuid = int(fields[3])
        elif key == "Gid" and len(fields) == 4:
            crash.fsgid = int(fields[3])
    crash.cgroup = _read(fd, "cgroup")
    crash.cmdline = redact.cmdline([a for a in _read(fd, "cmdline").split("\0") if a][:256])
    crash.environ = redact.environ(
        dict(v.partition("=")[::2] for v in _read(fd, "environ", 1 << 16).split("\0")[:512] if "=" in v)
    )
    comm = _read(fd, "comm").rstrip("\n")
    if comm:
        crash.comm = comm
    try:
        crash.exe = os.readlink(b"exe", dir_fd=fd).decode(errors="replace")
    except OSError:
        pass
    crash.maps = _read(fd, "maps")


def read_upto(path: str, limit: int, dir_fd: int | None = None) -> bytes:
    """At most ``limit`` bytes of ``path`` (a /proc file: the process decides how long it is)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks, size = [], 0
        while size < limit and (chunk := os.read(fd, min(1 << 16, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read(dir_fd: int, name: str, limit: int = 1 << 22) -> str:
    try:
        return read_upto(name, limit, dir_fd).decode(errors="replace")
    except OSError:
        return ""


# struct pidfd_info (include/uapi/linux/pidfd.h), up to coredump_mask: PIDFD_INFO_SIZE_VER1.
_PIDFD_INFO_SIZE = 72
PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR(0xFF, 11, ...)
PIDFD_INFO_PID, PIDFD_INFO_CREDS, PIDFD_INFO_COREDUMP = 1 << 0, 1 << 1, 1 << 4
PIDFD_COREDUMPED, PIDFD_COREDUMP_USER, PIDFD_COREDUMP_ROOT = 1 << 0, 1 << 2, 1 << 3


class PidfdInfo:
    __slots__ = ("coredump_mask", "pid", "rgid", "ruid")

    def __init__(self, pid: int, ruid: int, rgid: int, coredump_mask: int) -> None:
        self.pid = pid
        self.ruid = ruid
        self.rgid = rgid
        self.coredump_mask = coredump_mask

    @property
    def dumping(self) -> bool:
        """Whether the kernel is dumping this task's core (a real coredump connection, not a user)."""
        return bool(self.coredump_mask & PIDFD_COREDUMPED)

    @property
    def dump_mode(self) -> int:
        """%d: 2 when the core must be root's only, 1 when it is the owner's."""
        if self.coredump_mask & PIDFD_COREDUMP_ROOT:
            return 2
        return 1 if self.coredump_mask & PIDFD_COREDUMP_USER else 0


def pidfd_info(pidfd: int) -> PidfdInfo:
    """PIDFD_GET_INFO (Linux 6.13; the coredump mask since 6.16)."""
    import fcntl
    import struct

    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_PID | PIDFD_INFO_CREDS | PIDFD_INFO_COREDUMP)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError as e:
        raise ProcessGone(f"cannot read the crashed task's pidfd: {e.strerror}") from None
    mask = struct.unpack_from("=Q", buf, 0)[0]
    pid, _, _, ruid, rgid = struct.unpack_from("=IIIII", buf, 16)
    coredump = struct.unpack_from("=I", buf, 64)[0] if mask & PIDFD_INFO_COREDUMP else 0
    return PidfdInfo(pid, ruid, rgid, coredump)


def values_from_pidfd(pidfd: int, info: PidfdInfo, when: float) -> dict[str, str]:
    """The specifier values the kernel would pass a pipe handler, from the task and /proc.

    The coredump socket passes none of them. ``%s`` and ``%i``/``%I`` are not known until
    the core's notes are read (:mod:`corevault.capture.corehead`); until then they stay
    empty. ``%h`` is read inside the task's UTS namespace.
    """
    from contextlib import suppress  # not at import: the pipe handler imports this module

    base = f"/proc/{info.pid}"
    values = {
        "P": str(info.pid), "p": str(info.pid), "t": str(int(when)), "d": str(info.dump_mode),
        "u": str(info.ruid), "g": str(info.rgid), "F": str(pidfd), "s": "", "i": "", "I": "",
    }  # fmt: skip
    with suppress(OSError), open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"NSpid:"):
                values["p"] = line.split()[-1].decode()
    with suppress(OSError), open(f"{base}/comm", "rb") as f:
        values["e"] = f.read().decode(errors="replace").rstrip("\n")
    with suppress(OSError):
        exe = os.readlink(f"{base}/exe".encode()).decode(errors="replace")
        values["E"] = exe.removesuffix(" (deleted)")
        values["f"] = values["E"].rpartition("/")[2]
    with suppress(OSError, ValueError, IndexError), open(f"{base}/stat", "rb") as f:
        values["C"] = f.read().rpartition(b")")[2].split()[36].decode()  # field 39: processor
    values["c"] = str(ULONG_MAX)
    with suppress(OSError), open(f"{base}/limits", "rb") as f:
        for line in f:
            if line.startswith(b"Max core file size"):
                soft = line.split()[4]
                values["c"] = str(ULONG_MAX) if soft == b"unlimited" else soft.decode()
    values["h"] = uts_hostname(info.pid) or ""
    return values


def uts_hostname(pid: int) -> str | None:
    """The hostname in a task's UTS namespace, read by a thread that joins it for a moment."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    result: list[str] = []

    def visit() -> None:
        try:
            theirs = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if libc.setns(theirs, 0x04000000) == 0:  # CLONE_NEWUTS, for this thread only
                result.append(os.uname().nodename)
        finally:
            os.close(theirs)

    thread = threading.Thread(target=visit, name="uts")  # it ends in their namespace, then is gone
    thread.start()
    thread.join()
    return result[0] if result else None
