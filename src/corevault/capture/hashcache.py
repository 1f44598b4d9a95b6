"""Content hashes of mapped binaries, remembered per file where the kernel alone can change them.

A crash's binaries are kept by content (:mod:`.buildid`): libc, ld.so and the executable are
hashed on every crash, a few MiB of SHA-256 (with OpenSSL's library to load) that a
crash-looping pod pays each time for the same files. This cache remembers a file's hash under
what identifies one version of it: ``(st_dev, st_ino)`` names the entry, and the entry holds
``st_size``, ``st_mtime_ns``, ``st_ctime_ns`` and the inode's generation
(``FS_IOC_GETVERSION``, where the filesystem has one). A hit needs all of them equal.

That is sound only where the file's owner cannot put a changed file back under the old
values. ``mtime`` can be set by anyone who may write the file; ``ctime`` cannot: a local
filesystem's kernel sets it on every change of data or metadata, ``utime`` included, and a
reused inode number gets a new ctime and generation. So the cache is used only for files on
the filesystems in :data:`LOCAL` (decided by the type of the superblock behind ``st_dev`` in
``/proc/self/mountinfo``; a device not found there is not trusted). On FUSE, NFS, 9p, ceph,
CIFS and every bucket volume the server, which may be the tenant's, reports whatever metadata
it likes: their files are hashed on every crash, and nothing about them is written here.

One kind of write moves no time: a store through a shared mapping whose page is already
writable (the kernel updates the times when a page is first made writable, and on ext4, xfs
and btrfs not again until writeback has cleaned it; on tmpfs never, which is why tmpfs is
not in :data:`LOCAL`). Such a mapping holds the file open for writing, so the cache is read
and written only while nobody does (:func:`unwritten`); a writer that comes later makes its
first page writable after that, which moves the ctime.

A file that changes while it is hashed (its ctime moves) is not remembered. The cache lives
under the node's state directory (root's alone), one small file per binary written with
:mod:`corevault.atomic` (renamed into place, not fsynced: it is a cache), and holds at most
:data:`MAX_ENTRIES`. When full, the :data:`EVICT` entries used longest ago go: a hit marks its
entry used (its atime; the mtime stays when it was written), so a pod that maps many distinct
files pushes out what no crash has used since, a few at a time, and never the entries of the
pods that crash meanwhile (emptying the whole cache, as this did, sent every pod back to
hashing). A miss costs the next crash a hash and nothing else.
"""

from __future__ import annotations

import _signal  # the C module: ``signal`` imports enum, which the pipe handler does not load
import fcntl
import os
from time import time_ns

from corevault import atomic
from corevault.capture import mountinfo
from corevault.capture.process import read_upto

NAME = "hashes"
MAX_ENTRIES = 1024
#: entries removed at once when the cache is full: one read of the directory's times per this many new ones
EVICT = 64
#: filesystems whose kernel sets ctime itself on every change (mountinfo's type names)
LOCAL = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "overlay"})
_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)


def cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, NAME)


#: at most this much of a mountinfo is read (a process in its own mount namespace decides how
#: many mounts it has); a device listed past it is not trusted
MOUNTINFO_MAX = 4 << 20


class Mounts:
    """The type of the filesystem behind a device number, read once per crash from mountinfo.

    ``proc_fd`` is the crashed process's ``/proc/PID``: its own mountinfo lists the mounts of
    what it mapped, whatever namespace the reader runs in (the agent's container, in socket
    mode, sees none of a pod's), each line read by :func:`.mountinfo.parse`.
    Without ``proc_fd``, the mountinfo at ``path`` (the reader's own by default).
    """

    def __init__(self, proc_fd: int | None = None, path: str = "/proc/self/mountinfo") -> None:
        self.proc_fd = proc_fd
        self.path = path
        self.types: dict[bytes, bytes] | None = None
        #: mount id → (``major:minor``, filesystem type)
        self.mounts: dict[bytes, tuple[bytes, bytes]] = {}

    def _read(self) -> bytes:
        path, dir_fd = ("mountinfo", self.proc_fd) if self.proc_fd is not None else (self.path, None)
        data = read_upto(path, MOUNTINFO_MAX + 1, dir_fd)  # one byte more says it was cut
        return data if len(data) <= MOUNTINFO_MAX else data[: data.rfind(b"\n", 0, MOUNTINFO_MAX) + 1]

    def load(self) -> Mounts:
        """Read the mountinfo now, if not read yet (the process's is gone with the process)."""
        if self.types is None:
            self.types = {}
            try:
                lines = self._read().splitlines()
            except OSError:
                lines = []
            for line in lines:
                if (mount := mountinfo.parse(line)) is not None:
                    ident, dev, _, kind = mount
                    self.types.setdefault(dev, kind)
                    self.mounts[ident] = (dev, kind)
        return self

    def mount(self, mount_id: int) -> tuple[bytes, bytes] | None:
        """``(major:minor, type)`` of the mount with that id (ids are the kernel's, the same in
        every namespace), or None when it is not listed."""
        return self.load().mounts.get(str(mount_id).encode())

    def has_device(self, dev: bytes) -> bool:
        """Whether a mount of the device ``major:minor`` is listed."""
        return dev in (self.load().types or {})

    def fs_type(self, dev: int) -> str | None:
        types = self.load().types or {}
        kind = types.get(f"{os.major(dev)}:{os.minor(dev)}".encode())
        return kind.decode() if kind is not None else None


def unwritten(fd: int) -> bool:
    """Whether nobody holds the file open for writing (a writable mapping included) right now.

    A read lease is granted only then; it is let go at once. A writer opening the file in
    between waits for that, and the kernel signals the lease's holder: SIGURG, which is ignored
    unless asked for, rather than SIGIO, which would end the handler (or the agent)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False  # EAGAIN: a writer; or a filesystem without leases
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def version(fd: int, mounts: Mounts) -> str | None:
    """What names this version of the file, or None when it is not one to trust: on a filesystem
    not in :data:`LOCAL`, or open for writing."""
    if not unwritten(fd):
        return None
    st = os.fstat(fd)  # after the lease: a writer since then has moved the ctime
    if mounts.fs_type(st.st_dev) not in LOCAL:
        return None
    generation = 0
    try:
        generation = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8)), "little")
    except OSError:
        pass  # overlay has none; its ctime still tells
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {generation}"


def _name(st: os.stat_result) -> str:
    return f"{st.st_dev:x}-{st.st_ino:x}"


def lookup(directory: str, st: os.stat_result, stamp: str) -> str | None:
    """The remembered SHA-256 of the file version ``stamp`` (see :func:`version`), if any.

    An entry counts only whole: its own name, the stamp, 64 hex digits and the newline that
    ends it. Entries are written without fsync (:func:`remember`), so a power cut may leave
    one empty, cut short or lost: each of those is a miss and the file is hashed again.
    """
    try:
        # not open(): its buffered file costs more than this read, for every binary of every crash
        fd = os.open(os.path.join(directory, _name(st)), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 256).decode("ascii", "replace")
        head, sep, rest = text.partition(" ")
        held, _, sha256 = rest.rpartition(" ")
        sha256, newline, after = sha256.partition("\n")
        if (head, sep, held, newline, after) != (_name(st), " ", stamp, "\n", ""):
            return None
        if len(sha256) != 64 or sha256.strip("0123456789abcdef"):
            return None
        try:  # used now: eviction takes the entries used longest ago
            os.utime(fd, ns=(time_ns(), os.fstat(fd).st_mtime_ns))
        except OSError:
            pass
    except OSError:
        return None
    finally:
        os.close(fd)
    return sha256


def remember(directory: str, st: os.stat_result, stamp: str, sha256: str) -> None:
    """Keep ``sha256`` for the file version ``stamp``; best effort (a cache).

    Renamed into place but not fsynced (two fsyncs a new binary, on the crash path): a
    reader never sees a half-written entry, and one cut by a power cut is a miss (:func:`lookup`).
    """
    try:
        try:
            count = len(os.listdir(directory))
        except FileNotFoundError:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            count = 0
        if count >= MAX_ENTRIES:
            _evict(directory)
        text = f"{_name(st)} {stamp} {sha256}\n"
        atomic.write(os.path.join(directory, _name(st)), text, 0o600, durable=False)
    except OSError:
        pass


def _evict(directory: str) -> None:
    """Remove the entries used longest ago (by atime), down to :data:`EVICT` below the limit."""
    used = []
    with os.scandir(directory) as entries:
        for e in entries:
            try:
                used.append((e.stat(follow_symlinks=False).st_atime_ns, e.name))
            except OSError:
                pass  # removed meanwhile
    used.sort()
    for _, name in used[: len(used) - MAX_ENTRIES + EVICT]:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
