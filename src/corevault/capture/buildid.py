"""The ELF objects a crashed process had mapped, kept by content for later symbolization.

While the process still exists, every file-backed mapping that starts an ELF object is
opened through ``/proc/%P/map_files/<range>``: that is the very file the process mapped,
inside its container, even if it was deleted or replaced since. Its GNU build-id, or Go's
build id, is read from the program headers' notes (a few hundred bytes, no ELF library
needed here), and the open fd is kept so the copy into the node's store can happen after
the core has been streamed.

A build-id is only a claim (any pod can write any build-id into its own files), so the
store is keyed by content: each object is hashed (SHA-256) through the fd, stored once as
``buildid/<key>/<sha256>`` (:mod:`corevault.nodestore`), and the crash's record names both,
so nothing another pod stored under the same key is ever taken for this crash's file.
Files are copied with their holes (``SEEK_DATA``/``SEEK_HOLE``, and zero blocks skipped),
and only when the store's quota, the spool's ``max_size`` and ``keep_free`` leave room.
"""

from __future__ import annotations

import errno
import os
import stat

from corevault import elf, hashing, nodestore, objectid
from corevault.capture import hashcache, mountinfo
from corevault.capture.safefs import NewFile
from corevault.capture.stream import CHUNK, SparseSink, zero_chunk

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_STORED_SIZE = 2 << 30


class Module:
    """One mapped ELF object of the crashed process."""

    __slots__ = ("build_id", "end", "fd", "go_build_id", "path", "sha256", "size", "start", "stored")

    def __init__(self, path: str, start: int, end: int) -> None:
        self.path = path
        self.start = start
        self.end = end
        self.build_id: str | None = None
        self.go_build_id: str | None = None
        self.sha256: str | None = None
        self.size: int | None = None
        self.fd = -1
        #: "new", "held" (already in the store), or why it was not stored
        self.stored: str | None = None

    @property
    def key(self) -> str | None:
        return objectid.key_for(self.build_id, self.go_build_id, self.sha256)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "start": self.start,
            "end": self.end,
            "build_id": self.build_id,
            "go_build_id": self.go_build_id,
            "key": self.key,
            "sha256": self.sha256,
            "size": self.size,
            "stored": self.stored,
        }


def mapped_objects(maps: str) -> list[tuple[str, str, int, int]]:
    """``(path, map_files name, start, end)`` of each file mapped from offset 0, first first."""
    seen: dict[str, tuple[str, str, int, int]] = {}
    ends: dict[str, int] = {}
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
            continue
        path = fields[5]
        lo, _, hi = fields[0].partition("-")
        ends[path] = max(ends.get(path, 0), int(hi, 16))
        if path not in seen and int(fields[2], 16) == 0:
            # maps pads addresses to 8 digits (00400000), map_files names have no leading
            # zeros (400000): a non-PIE executable is only found under the unpadded name.
            name = f"{int(lo, 16):x}-{int(hi, 16):x}"
            seen[path] = (path, name, int(lo, 16), int(hi, 16))
    return [(p, name, lo, ends[p]) for p, name, lo, _ in seen.values()]


def executable_paths(maps: str) -> set[str]:
    """The files the process mapped with execute permission somewhere."""
    paths = set()
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
            paths.add(fields[5])
    return paths


def read_build_id(fd: int) -> str | None:
    """The GNU build-id of the ELF file open on ``fd``, or None."""
    return elf.build_id(lambda offset, size: os.pread(fd, size, offset))


def open_modules(
    proc_fd: int, maps: str, max_files: int | None = None, max_bytes: int | None = None
) -> tuple[list[Module], str | None]:
    """Open and identify the mapped ELF objects while the process is still there.

    A process decides how many files it maps, so at most ``max_files`` of them are looked at
    (those with code first) and at most ``max_bytes`` of ELF objects are kept open to be
    hashed and copied; an object past that is listed with its build-ids, not stored.
    Returns the objects and, when some were passed over, why, in one line.
    """
    held, why = hold_modules(proc_fd, maps, max_files)
    return identify_modules(held, max_bytes, why)


def hold_modules(
    proc_fd: int,
    maps: str,
    max_files: int | None = None,
    *,
    path_only: bool = False,
    mounts: hashcache.Mounts | None = None,
    host: hashcache.Mounts | None = None,
) -> tuple[list[Module], str | None]:
    """The mapped objects, each open on its ``fd``, in the order they are to be looked at.

    With ``path_only`` each is held by an ``O_PATH`` fd: the kernel follows the map_files
    link to the very file and asks its filesystem nothing (no open, no read), so a file on a
    FUSE filesystem whose server stopped answering, or a hard NFS mount whose server is gone,
    cannot hold the caller up here; :func:`identify_modules` opens it for reading later.

    A file on a filesystem of the pod's own that may wait on the pod's server (:func:`own_fuse`;
    ``mounts`` is the crashed process's mountinfo, ``host`` the host's) is never asked anything,
    in either mode: its fd is closed at once and the module is listed as not read, with why.
    """
    mounts = mounts if mounts is not None else hashcache.Mounts(proc_fd)
    host = host if host is not None else host_mounts(proc_fd, mounts)
    mapped = mapped_objects(maps)
    # Files with code first (the executable, its libraries), then data files (jars, fonts, a
    # tenant's thousands of mappings); within each, in the order of their addresses.
    code = executable_paths(maps)
    order = sorted(range(len(mapped)), key=lambda i: mapped[i][0] not in code)[:max_files]
    held = []
    for i in order:
        path, name, start, end = mapped[i]
        m = Module(path, start, end)
        try:
            # O_PATH: opening the file for reading is left to regular files, and to later with
            # path_only (a device's own open may act: a watchdog starts, a tape rewinds)
            m.fd = os.open(f"map_files/{name}", os.O_PATH | os.O_CLOEXEC, dir_fd=proc_fd)
            if (why_not := own_fuse(m.fd, mounts, host)) is not None:
                os.close(m.fd)
                m.fd, m.stored = -1, why_not
            elif not path_only:
                _open_regular(m)
        except OSError as e:
            m.stored = f"unreadable: {e.strerror}"
        if m.fd >= 0 or m.stored != NOT_REGULAR:
            held.append(m)
    why = None
    if max_files is not None and len(mapped) > max_files:
        why = (
            f"{len(mapped) - max_files} of {len(mapped)} mapped files not looked at: "
            f"[capture] max_objects is {max_files}"
        )
    return held, why


#: a mapped file that is no regular file (a device): never opened for reading
NOT_REGULAR = "not a regular file: not opened"

#: the host's mount namespace: init's (the pipe handler runs in it; the agent runs with hostPID)
HOST_MOUNTINFO = "/proc/1/mountinfo"


def host_mounts(proc_fd: int, mounts: hashcache.Mounts) -> hashcache.Mounts:
    """The host's mountinfo: ``mounts`` itself when the crashed process is in the host's mount
    namespace (a process of the node, not of a pod), so it is not read twice."""
    try:
        if os.stat("ns/mnt", dir_fd=proc_fd).st_ino == os.stat("/proc/1/ns/mnt").st_ino:
            return mounts
    except OSError:
        pass  # init's namespace files may be closed even to root: read its mountinfo
    return hashcache.Mounts(path=HOST_MOUNTINFO)


def mount_id(fd: int) -> int | None:
    """The id of the mount ``fd`` is open on, from ``/proc/self/fdinfo`` (the kernel's own
    record of the open file: no filesystem is asked anything, not even ``getattr``)."""
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        if key == b"mnt_id":
            return int(value)
    return None


def own_fuse(fd: int, mounts: hashcache.Mounts, host: hashcache.Mounts) -> str | None:
    """Why the file held on the ``O_PATH`` ``fd`` is not to be opened or read, or None.

    A FUSE filesystem's server answers every ``getattr``, ``open`` and ``read`` of it, so one
    the pod runs itself can stop answering while its process dumps, and a request already sent
    waits uninterruptibly. Even ``fstat`` and ``fstatfs`` ask the server (statfs does for root):
    the filesystem's type is taken from the mount the fd is on, which the kernel names in
    fdinfo and in the crashed process's mountinfo. A mount the host's mount namespace also lists
    (a CSI driver's bucket mount, the pod's root overlay, its volumes) is the node's, served by
    the node, and read as any other file. A mount the process's mountinfo does not list (cut at
    ``MOUNTINFO_MAX`` by a tenant's many mounts) is not trusted.

    Any other filesystem the pod mounted itself is not trusted either, unless it lives in memory
    alone (:data:`.mountinfo.MEMORY_TYPES`): its pages may come from the pod's own server under a name of
    their own. An overlayfs (or aufs, shiftfs) over the pod's FUSE mount reads its layers; an
    erofs image file on that mount is read by the kernel from the FUSE server (a pod with
    ``CAP_SYS_ADMIN`` mounts one without a loop device); a pod's own NFS or SMB server stops
    answering as its FUSE server does. fdinfo, mountinfo and maps name that filesystem alone.

    The mount is always the one the held fd is on, never the device maps gave the mapping: a
    process sharing the crashed process's memory (``CLONE_VM`` without ``CLONE_THREAD``) runs on
    while the kernel dumps, and may map another file at the same addresses between the read of
    maps and the open of map_files. A mapping that maps said was on the pod's tmpfs so held the
    handler in the open of a file of the pod's stopped FUSE server.
    """
    found = mounts.mount(mid) if (mid := mount_id(fd)) is not None else None
    if found is None:
        return "not read: its mount is not in the process's mountinfo"
    dev, kind = found
    base = kind.partition(b".")[0]
    if base in mountinfo.MEMORY_TYPES or host.has_device(dev):
        return None
    if base in mountinfo.FUSE_TYPES:
        what, why = "FUSE filesystem", "whose server"
    elif base in mountinfo.STACKED_TYPES:
        what, why = "stacked filesystem", "whose layers may be FUSE mounts, whose server"
    else:
        what, why = "filesystem", "whose image file, device or server may be the pod's, which"
    return (
        f"not read: on the pod's own {what} ({kind.decode(errors='replace')} {dev.decode()}), "
        f"{why} may not answer during the dump"
    )


def _open_regular(m: Module) -> None:
    """Open ``m``'s ``O_PATH`` fd for reading, through ``/proc/self/fd`` (the same file, even
    if it was deleted or replaced since), if it is a regular file; a device's own open is never
    called (its fd is closed and ``m.stored`` says why)."""
    path_fd, m.fd = m.fd, -1
    try:
        if stat.S_ISREG(os.fstat(path_fd).st_mode):
            m.fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
        else:
            m.stored = NOT_REGULAR
    finally:
        os.close(path_fd)


def identify_modules(
    held: list[Module], max_bytes: int | None = None, why: str | None = None, *, reopen: bool = False
) -> tuple[list[Module], str | None]:
    """Read the build-ids of the objects :func:`hold_modules` held; keep the ELF ones, in address order.

    With ``reopen`` (they were held ``path_only``) each is opened for reading here first (through
    ``/proc/self/fd``: the same file, even if it was deleted or replaced since). At most
    ``max_bytes`` of objects stay open to be stored. Returns them and why some were passed
    over (``why``, the holding's reason, first), in one line.
    """
    kept = passed_over = 0
    found = []
    for m in held:
        ids = None
        if m.fd >= 0:
            try:
                if reopen:
                    _open_regular(m)
                if m.fd >= 0:
                    ids = elf.build_ids(lambda offset, size, fd=m.fd: os.pread(fd, size, offset))
            except OSError as e:
                m.stored = f"unreadable: {e.strerror}"
        if m.stored == NOT_REGULAR:
            continue  # a device or other special file mapped: no object
        if ids is None and m.fd >= 0:
            os.close(m.fd)  # not ELF (locale archives, fonts…)
            m.fd = -1
            continue
        if ids is not None:
            m.build_id, m.go_build_id = ids
        if m.fd >= 0 and max_bytes is not None:
            m.size = os.fstat(m.fd).st_size
            if kept + m.size > max_bytes:
                os.close(m.fd)
                m.fd = -1
                m.stored = f"not stored: past [capture] max_objects_size ({max_bytes} bytes a crash)"
                passed_over += 1
            else:
                kept += m.size
        found.append(m)
    found.sort(key=lambda m: m.start)  # in the order of their addresses
    reasons = [why] if why else []
    if passed_over:
        reasons.append(f"{passed_over} mapped ELF objects not stored: "
                       f"[capture] max_objects_size is {max_bytes} bytes")  # fmt: skip
    return found, "; ".join(reasons) or None


def store_modules(
    store: str,
    modules: list[Module],
    room: int | Callable[[], int] | None = None,
    hashes: str | None = None,
    proc_fd: int | None = None,
    *,
    mounts: hashcache.Mounts | None = None,
) -> None:
    """Hash each module, copy the contents the store does not hold; set ``stored``, close the fds.

    ``room`` is how many bytes of disk the store may still take (None: no limit), or a function
    that tells, asked only once a file is to be copied: measuring the store's use walks it, which
    a crash whose binaries are all held never needs. ``hashes`` is the directory of the content
    hash cache (:mod:`.hashcache`; None: hash every file), trusted for the filesystems that the
    mountinfo of ``proc_fd`` (the crashed process's ``/proc/PID``; None: this process's) lists,
    or ``mounts`` where that was read already.
    """
    mounts = mounts if mounts is not None else hashcache.Mounts(proc_fd)
    left = [room]

    def room_now() -> int | None:
        if callable(left[0]):
            left[0] = left[0]()
        return left[0]

    for m in modules:
        if m.fd < 0:
            continue
        try:
            m.stored, taken = _store(store, m, room_now, hashes, mounts)
            room = room_now() if taken else None
            if room is not None:
                left[0] = room - taken
        except OSError as e:
            m.stored = f"not stored: {e.strerror or e}"
        finally:
            os.close(m.fd)
            m.fd = -1


def content_hash(fd: int, size: int) -> str:
    """SHA-256 of the file's first ``size`` bytes, holes read as the zeros they are."""
    return _pass(fd, size, None)


def cached_content_hash(fd: int, st: os.stat_result, hashes: str | None, mounts: hashcache.Mounts) -> str:
    """:func:`content_hash` of the whole file, from the cache where this version of it is there."""
    stamp = hashcache.version(fd, mounts) if hashes is not None else None
    if stamp is None or hashes is None:
        return content_hash(fd, st.st_size)
    held = hashcache.lookup(hashes, st, stamp)
    if held is not None:
        return held
    sha256 = content_hash(fd, st.st_size)
    if hashcache.version(fd, mounts) == stamp:  # not changed while it was read
        hashcache.remember(hashes, st, stamp, sha256)
    return sha256


def _segments(fd: int, size: int) -> list[tuple[int, int, bool]]:
    """``(start, end, holds data)`` runs covering the file's first ``size`` bytes."""
    runs = []
    pos = 0
    while pos < size:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from here on
                data = size
            elif e.errno == errno.EINVAL:  # no hole support: all data
                runs.append((pos, size, True))
                break
            else:
                raise
        if data > pos:
            runs.append((pos, data, False))
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        runs.append((data, hole, True))
        pos = hole
    return runs


def _pass(src: int, size: int, sink: SparseSink | None) -> str:
    """Hash the file (and write its data through ``sink``, holes left as holes)."""
    h = hashing.sha256(size)
    zeros = memoryview(zero_chunk())
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for start, end, data in _segments(src, size):
        pos = start
        while pos < end:
            want = min(CHUNK, end - pos)
            if not data:
                h.update(zeros[:want])
                pos += want
                continue
            n = os.preadv(src, [view[:want]], pos)
            if n == 0:
                raise _Changed
            h.update(view[:n])
            if sink is not None:
                sink.size = pos
                sink.write(buf, view, n)
            pos += n
    if sink is not None:
        sink.size = size
        sink.finish()
    return h.hexdigest()


class _Changed(Exception):
    """The file shrank while it was read."""


def _store(
    store: str, m: Module, room_now: Callable[[], int | None], hashes: str | None, mounts: hashcache.Mounts
) -> tuple[str, int]:
    st = os.fstat(m.fd)
    size = m.size = st.st_size
    if size > MAX_STORED_SIZE:
        return f"not stored: {size} bytes is more than {MAX_STORED_SIZE}", 0
    try:
        m.sha256 = cached_content_hash(m.fd, st, hashes, mounts)
    except _Changed:
        return "not stored: the file changed while it was read", 0
    key = m.key or ""
    path = nodestore.object_path(store, key, m.sha256)
    if os.path.isfile(path):
        os.utime(path)  # in use again: eviction's grace period starts anew
        return "held", 0
    need = sum(end - start for start, end, data in _segments(m.fd, size) if data)
    room = room_now()
    if room is not None and need > room:
        return (
            f"not stored: no room for {need} bytes in the node's store "
            "(raise [spool] store_max_size, max_size or keep_free's headroom)"
        ), 0
    for attempt in (1, 2):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue  # eviction removed the empty key directory just now
        try:
            return _publish(dir_fd, m, size), need
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _publish(dir_fd: int, m: Module, size: int) -> str:
    new = NewFile(dir_fd)
    try:
        try:
            copied = _pass(m.fd, size, SparseSink(new.fd, "store"))
        except _Changed:
            copied = None
        if copied != m.sha256:
            return "not stored: the file changed while it was copied"
        new.publish(m.sha256 or "", 0, 0, 0o644, max_suffix=0)
    except FileExistsError:
        return "held"  # another handler stored the same content meanwhile
    finally:
        new.discard()
    return "new"
