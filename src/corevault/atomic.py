"""Replacing a file whole: a temporary name beside it, fsync, rename, fsync of the directory.

Whoever reads the file, and the machine after a crash or a power cut, sees the old content
or the new, never a half-written file under the final name. Measured traps this closes:

- writing straight to the final name leaves a truncated file there on ENOSPC (tmpfs, ext4);
- NFS reports ENOSPC and EDQUOT only at ``fsync()`` or ``close()``: both are checked before
  the rename, so a failed write never replaces a good file;
- a rename is durable only once its directory is fsynced.

The temporary name carries the process and thread, so two writers of one path (the agent's
threads, two agents on a NAS) never write into each other's temporary file; the last rename
wins. On any error the temporary file is removed and ``path`` is left as it was.

Not for writing into a directory that a container controls: ``capture.safefs`` does that
with its own rules (openat2 inside the container's root, no-replace renames). This module
imports nothing but the standard library's cheapest parts: the capture handler uses it.
"""

from __future__ import annotations

import errno
import os
from _thread import get_native_id

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from typing import BinaryIO


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW


def _tmp_name(path: str) -> str:
    return f"{path}.{os.getpid()}.{get_native_id()}.tmp"  # what ``target`` parses


class Abandon(Exception):
    """Raised inside :func:`replacing` to drop what was written and leave the file as it was."""


def replacing(path: str, mode: int = 0o644) -> AbstractContextManager[BinaryIO]:
    """A binary file that becomes ``path`` (with ``mode``) when the block ends without error.

    Its ``name`` is the temporary path, for checks of what was written before it counts.
    """
    # contextlib, imported here rather than at the top, costs the capture handler (which
    # imports this module for fsync_dir) nothing: it pulls in collections and functools.
    from contextlib import contextmanager

    return contextmanager(_replacing)(path, mode)


def _replacing(path: str, mode: int) -> Iterator[BinaryIO]:
    from contextlib import suppress

    tmp = _tmp_name(path)
    f = open(tmp, "wb", opener=lambda name, _: os.open(name, _FLAGS, mode))  # noqa: SIM115 - closed below
    try:
        with f:
            os.fchmod(f.fileno(), mode)  # the mode asked for, whatever the umask
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Abandon:
        with suppress(OSError):
            os.unlink(tmp)
        return
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def target(tmp: str) -> str | None:
    """The path that a temporary file of :func:`replacing` was to become; None for other names."""
    parts = tmp.rsplit(".", 3)
    if len(parts) == 4 and parts[0] and parts[1].isdigit() and parts[2].isdigit() and parts[3] == "tmp":
        return parts[0]
    return None


def write(path: str, data: bytes | str, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` whole with ``data`` (text is written as UTF-8).

    ``durable=False`` leaves out both fsyncs, for a cache whose entries may be lost or cut
    short in a power cut as long as a reader can tell (a missing or half entry is a miss): a
    reader still never sees a half-written file while the machine runs, since the name only
    ever points at a whole one.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = _tmp_name(path)
    fd = os.open(tmp, _FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the mode asked for, whatever the umask
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)  # NFS reports ENOSPC and EDQUOT here too: checked before the rename
        os.replace(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib is not imported on the crash path
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make the names created, renamed or removed in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        # some filesystems (FUSE mounts of buckets among them) cannot sync a directory: the
        # rename is as durable as they make it
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
