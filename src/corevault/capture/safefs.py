"""Writing a file into a directory that a container controls, as root, safely.

The handler runs as root on the host; the directory belongs to a possibly hostile
container. Each trap below was a real CVE in apport, ABRT or systemd-coredump, and each is
closed here by construction rather than by checking first:

- symlinks, final or on the way, absolute ones that would resolve against the host's
  root: the path is walked one component at a time from the container's root fd with
  ``O_NOFOLLOW | O_DIRECTORY``, so a symlink anywhere fails the walk;
- ``..`` (and ``.``) components: refused before any walk;
- FIFOs and devices: ``O_DIRECTORY`` fails on them without opening them, and the core is
  never opened by name at all;
- pre-existing files and hard links at the target: the core is written to an anonymous
  ``O_TMPFILE`` (or, where the filesystem lacks it, a fresh ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` temporary name) and published with ``link()``, which never replaces a
  name; a taken name gets a ``.1``, ``.2``… suffix instead;
- owner and mode are set on the fd before the file gets its name, so it never exists
  under its name with the wrong owner; the directory is fsynced after the link.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import suppress

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SUFFIX = 99


class UnsafePath(Exception):
    """The target cannot be reached without following a link or leaving the root."""


def open_dir(root_fd: int, path: str) -> int:
    """Open directory ``path`` (absolute, relative to ``root_fd``) without following links."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsafePath(f"{path!r} has a '.' or '..' component")
    fd = os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    walked = ""
    try:
        for part in parts:
            walked += "/" + part
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise UnsafePath(_why(fd, part, walked, e)) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(dir_fd: int, name: str, walked: str, err: OSError) -> str:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return f"{walked} does not exist" if err.errno == errno.ENOENT else f"{walked}: {err.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{walked} is a symbolic link; refusing to follow it"
    if not stat.S_ISDIR(st.st_mode):
        return f"{walked} is not a directory"
    return f"{walked}: {err.strerror}"


class NewFile:
    """A file being written in a directory, invisible until :meth:`publish`."""

    __slots__ = ("dir_fd", "fd", "tmp_name")

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.tmp_name: str | None = None
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.tmp_name = f".corevault-{os.urandom(8).hex()}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.tmp_name, flags, 0o600, dir_fd=dir_fd)

    def publish(self, name: str, uid: int, gid: int, mode: int = 0o600, max_suffix: int = MAX_SUFFIX) -> str:
        """Give the file its owner, mode and ``name`` (or ``name.N`` if taken); return the name."""
        fd = self.fd
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
            mine = os.fstat(fd)
            published = self._link(name, mine, max_suffix)
            # NFS may report ENOSPC/EDQUOT only at close: a file that failed there is withdrawn.
            self.fd = -1
            try:
                os.close(fd)
            except OSError:
                os.unlink(published, dir_fd=self.dir_fd)
                raise
            os.fsync(self.dir_fd)
            return published
        finally:
            self.discard()

    def _link(self, name: str, mine: os.stat_result, max_suffix: int) -> str:
        for n in range(max_suffix + 1):
            candidate = name if n == 0 else f"{name}.{n}"
            try:
                if self.tmp_name is None:
                    os.link(f"/proc/self/fd/{self.fd}", candidate, dst_dir_fd=self.dir_fd)
                else:
                    os.link(
                        self.tmp_name,
                        candidate,
                        src_dir_fd=self.dir_fd,
                        dst_dir_fd=self.dir_fd,
                        follow_symlinks=False,
                    )
            except FileExistsError:
                continue
            if self.tmp_name is not None:
                # The directory is the container's: its temporary name may have been swapped.
                st = os.stat(candidate, dir_fd=self.dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                    os.unlink(candidate, dir_fd=self.dir_fd)
                    raise UnsafePath(f"the temporary file for {name} was replaced while it was written")
            return candidate
        raise FileExistsError(errno.EEXIST, f"{name} and {max_suffix} suffixed names are taken")

    def discard(self) -> None:
        """Drop the file: the anonymous one vanishes, a temporary name is removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp_name is not None:
            with suppress(FileNotFoundError):
                os.unlink(self.tmp_name, dir_fd=self.dir_fd)
            self.tmp_name = None
