"""A process's mountinfo read whole in bounded memory, and the FUSE mounts it lists.

A tenant decides how long its mountinfo is (as many mounts under as long paths as it likes):
a reader that stops at a bound lets it put a mount past the cut, out of sight. So it is read
whole, in chunks, one line at a time (:func:`lines`: a line is cut at :data:`LINE_MAX`, the
longest a kernel-escaped path can be). The kernel writes every line; a mount point the tenant
named is escaped (``\\040`` for a space, ``\\134`` for a backslash), so it cannot pose as
another field. Nothing here asks a mounted filesystem anything.

:func:`parse` is the one reading of a line, for the FUSE lookups here, the content-hash cache's
filesystem types (:class:`.hashcache.Mounts`) and the agent's stuck-dump watch; the filesystem
types the capture tells apart are named here too. This module imports nothing of corevault's,
so every module of the crash path may import it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

#: bytes of one maps / mountinfo line kept at most (a path is at most PATH_MAX, escaped 4 times)
LINE_MAX = 1 << 16

#: mountinfo's type of a FUSE mount, before the ".<subtype>" its server may name
FUSE_TYPES = (b"fuse", b"fuseblk")

#: mountinfo's types of filesystems whose files' pages come from the filesystems below them
STACKED_TYPES = (b"overlay", b"aufs", b"shiftfs")

#: mountinfo's types of filesystems whose files live in memory alone: no server, file or device
#: behind them that a pod could stop
MEMORY_TYPES = (b"tmpfs", b"ramfs", b"hugetlbfs")


def lines(path: str, dir_fd: int | None = None) -> Iterator[bytes]:
    """Every line of ``path``, read whole in chunks: only one line (cut at :data:`LINE_MAX`) is
    held at a time, however long the file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        rest = b""
        while chunk := os.read(fd, 1 << 16):
            found = (rest + chunk).split(b"\n")
            rest = found.pop()[:LINE_MAX]
            yield from found
        if rest:
            yield rest
    finally:
        os.close(fd)


def parse(line: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """``(mount id, major:minor, mount point, filesystem type)`` of a mountinfo line, or None for
    a line cut short ("36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/vda rw": the paths
    are escaped, so neither holds " - ")."""
    fields = line.split(b" ", 5)
    _, sep, tail = line.partition(b" - ")
    if len(fields) < 5 or not sep:
        return None
    return fields[0], fields[2], fields[4], tail.split(b" ", 1)[0]


def fuse_mounts(mountinfo: Iterable[bytes], types: tuple[bytes, ...] = FUSE_TYPES) -> dict[bytes, bytes]:
    """``major:minor`` → mount point of the mounts of ``types`` (FUSE's) a mountinfo's lines list."""
    found = {}
    for line in mountinfo:
        if (mount := parse(line)) is not None and mount[3].partition(b".")[0] in types:
            found.setdefault(mount[1], mount[2])
    return found


def fuse_on_the_way(
    mountinfo: Iterable[bytes], directory: str, mount_id: int | None
) -> dict[bytes, bytes] | None:
    """The FUSE mounts (``major:minor`` → mount point) a walk to ``directory`` (absolute, in the
    process's root) and the writes in it may wait on: the one of mount ``mount_id`` (where the
    walk is, or the directory's once it is open; none when that mount is not a FUSE one, and
    None when no line lists it), or else every FUSE mount at ``directory`` or above it."""
    found = {}
    want = directory.rstrip("/").encode()
    for line in mountinfo:
        mount = parse(line)
        if mount is None:
            continue
        ident, dev, at, kind = mount
        fuse = kind.partition(b".")[0] in FUSE_TYPES
        if mount_id is not None:
            if ident == b"%d" % mount_id:
                return {dev: at} if fuse else {}
            continue
        if not fuse:
            continue
        point = unescape(at).rstrip(b"/")
        if want == point or want.startswith(point + b"/"):
            found[dev] = at
    return None if mount_id is not None else found


def unescape(field: bytes) -> bytes:
    """A mountinfo path as it is: the kernel writes a space, tab, newline and backslash as
    ``\\ooo`` (octal). Without ``re``: this module lies on the crash path."""
    head, *rest = field.split(b"\\")
    out = [head]
    for part in rest:
        digits = part[:3]
        if len(digits) == 3 and all(0x30 <= c <= 0x37 for c in digits):
            out.append(bytes([int(digits, 8) & 0xFF]) + part[3:])
        else:
            out.append(b"\\" + part)
    return b"".join(out)
