"""The crashed process: the kernel's arguments and the facts read from ``/proc/%P``.

The kernel starts the pipe handler with every core(5) specifier as an argument (in the
order of :data:`corevault.pattern.SPECIFIERS`), the core on fd 0 and, with ``%F``, a pidfd
of the crashed task on some fd. ``/proc/%P`` stays readable until the handler has read
the core's EOF (with ``core_pipe_limit > 0``, until it exits), but a PID can be reused, so
the handler opens ``/proc/%P`` first and then checks with the pidfd that the task is alive
and still has that PID (CVE-2025-4598, CVE-2019-15790 came from skipping that check). Every
later read goes through the directory fd opened before the check.
"""

from __future__ import annotations

import os
from contextlib import suppress

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
    return dict(zip(SPECIFIERS, argv, strict=False))


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
    with suppress(OSError):
        crash.exe = os.readlink("exe", dir_fd=fd)
    crash.maps = _read(fd, "maps")


def _read(dir_fd: int, name: str, limit: int = 1 << 22) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return ""
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
