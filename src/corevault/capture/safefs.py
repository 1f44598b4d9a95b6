"""Writing a file into a directory that a container controls, as root, safely.

The handler runs as root on the host; the directory belongs to a possibly hostile
container. Each trap below was a real CVE in apport, ABRT or systemd-coredump, and each is
closed here by construction rather than by checking first:

- symlinks, final or on the way, absolute ones that would resolve against the host's
  root: the path is walked one component at a time from the container's root fd with
  ``O_NOFOLLOW | O_DIRECTORY`` (``O_PATH`` on the way), so a symlink anywhere fails the walk;
- ``..`` (and ``.``) components: refused before any walk;
- FIFOs and devices: ``O_DIRECTORY`` fails on them without opening them, and the core is
  never opened by name at all;
- pre-existing files and hard links at the target: the core is written to an anonymous
  ``O_TMPFILE`` (or, where the filesystem lacks it, a fresh ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` temporary name) and published with ``link()``, which never replaces a
  name; a taken name gets a ``.1``, ``.2``… suffix instead;
- owner and mode are set on the fd before the file gets its name, so it never exists
  under its name with the wrong owner; the directory is fsynced after the link.

Filesystems that mount a bucket through FUSE (s3fs/ossfs, rclone, gcsfuse, blobfuse2)
have neither ``O_TMPFILE`` nor hard links, make ``rename`` a copy and a delete, and
upload at ``fsync``/``close``, where quota and network errors surface. The way to publish
is chosen by what the directory does when tried, never by its filesystem's name:

1. ``O_TMPFILE`` + ``link()`` (local disks);
2. a temporary name + ``link()`` (NFS and others without ``O_TMPFILE``);
3. where ``link()`` is refused: the temporary name is fsynced and closed first (so an
   upload error is reported before any final name exists), the final name is then
   reserved with ``mkdir`` (which never replaces a name nor follows a link; a taken
   name moves on to the next suffix), and the temporary file renamed to it. A rename
   does not follow a link at its target either, and what the name holds after it is
   checked to be the file written (a temporary name swapped during the rename is not
   published).
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: a place on the walk: a symlink or anything else but a directory fails it (ENOTDIR), and the
#: directory is not opened (neither read nor asked to ``opendir``)
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SUFFIX = 99


class UnsafePath(Exception):
    """The target cannot be reached without following a link or leaving the root."""


def open_dir(root_fd: int, path: str, at: Callable[[int], object] | None = None) -> int:
    """Open directory ``path`` (absolute, relative to ``root_fd``) without following links.

    The walk holds ``O_PATH`` fds, which ask a filesystem nothing (no ``opendir`` of a directory
    on the way, nor of a mount's root as the walk enters it); only the directory reached is
    opened for reading, from the last of them. ``at`` is told every fd the walk holds, the
    directory's last, each before the one it replaces is closed: while the walk waits on a
    filesystem that stopped answering, the fd ``at`` was told last lies on it or just above it
    (:mod:`.volumecopy` names the FUSE connection a writer given up waits on by it)."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsafePath(f"{path!r} has a '.' or '..' component")
    fd = os.open(".", _PATH_FLAGS, dir_fd=root_fd)
    if at is not None:
        at(fd)
    walked = ""
    try:
        for part in [*parts, "."]:
            walked += "/" + part if part != "." else ""
            try:
                nfd = os.open(part, _PATH_FLAGS if part != "." else _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise UnsafePath(_why(fd, part, walked or "/", e)) from None
            if at is not None:
                at(nfd)
            os.close(fd)
            fd = nfd
    except BaseException:
        if at is not None:
            at(-1)
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


class PublishFailed(OSError):
    """The file could not be given its name; nothing is left under that name.

    An OSError with the original errno, whose message names the step that failed.
    """


# What link() fails with where a filesystem has no hard links: EPERM (vfat, and Linux for
# some FUSE filesystems), EOPNOTSUPP (s3fs), ENOSYS, EIO (rclone mount answers every
# unimplemented operation so; a real I/O error shows again at the next step).
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EIO, errno.EMLINK, errno.EXDEV)


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
            self.fd = os.open(self.tmp_name, _NEW_FLAGS, 0o600, dir_fd=dir_fd)

    def publish(self, name: str, uid: int, gid: int, mode: int = 0o600, max_suffix: int = MAX_SUFFIX) -> str:
        """Give the file its owner, mode and ``name`` (or ``name.N`` if taken); return the name.

        Raises :class:`PublishFailed` (or :class:`UnsafePath`) with the step that failed;
        the file is then gone and nothing was left under ``name``.
        """
        fd = self.fd
        try:
            _step(f"setting the owner of the file for {name}", os.fchown, fd, uid, gid)
            _step(f"setting the mode of the file for {name}", os.fchmod, fd, mode)
            _step(f"fsync of the file for {name}", os.fsync, fd)
            mine = os.fstat(fd)
            if self.tmp_name is None:
                published = self._link(name, max_suffix, mine)
                self._close(name, published)
            else:
                # Close before any final name exists: write-back filesystems (NFS, every
                # FUSE bucket) report ENOSPC, EDQUOT and upload errors only here.
                self._close(name, None)
                self._check_mine(name, mine)
                published = self._link(name, max_suffix, mine)
            try:  # a FUSE directory may not take fsync; the data already did
                os.fsync(self.dir_fd)
            except OSError:
                pass
            return published
        finally:
            self.discard()

    def _close(self, name: str, published: str | None) -> None:
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as e:
            if published is not None:
                try:
                    os.unlink(published, dir_fd=self.dir_fd)
                except OSError:
                    pass
            raise PublishFailed(
                e.errno, f"close of the file for {name} failed, nothing was published: {e.strerror}"
            ) from e

    def _check_mine(self, name: str, mine: os.stat_result) -> None:
        """The directory is the container's: its temporary name may have been swapped."""
        assert self.tmp_name is not None
        try:
            st = os.stat(self.tmp_name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError as e:
            raise UnsafePath(f"the temporary file for {name} was removed while it was written") from e
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) or not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"the temporary file for {name} was replaced while it was written")

    def _link(self, name: str, max_suffix: int, mine: os.stat_result) -> str:
        renaming = False  # the filesystem refused a hard link: reserve and rename from then on
        for n in range(max_suffix + 1):
            candidate = name if n == 0 else f"{name}.{n}"
            try:
                if not renaming:
                    renaming = not self._try_link(candidate, mine)
                if renaming:
                    self._reserve_and_rename(candidate, mine)
            except FileExistsError:
                continue
            return candidate
        raise FileExistsError(errno.EEXIST, f"{name} and {max_suffix} suffixed names are taken")

    def _try_link(self, candidate: str, mine: os.stat_result) -> bool:
        """Link the file as ``candidate``; False when the filesystem has no hard links."""
        try:
            if self.tmp_name is None:
                os.link(f"/proc/self/fd/{self.fd}", candidate, dst_dir_fd=self.dir_fd)
                return True
            os.link(
                self.tmp_name,
                candidate,
                src_dir_fd=self.dir_fd,
                dst_dir_fd=self.dir_fd,
                follow_symlinks=False,
            )
        except FileExistsError:
            raise
        except OSError as e:
            if self.tmp_name is None or e.errno not in _NO_LINKS:
                raise PublishFailed(e.errno, f"link to {candidate} failed: {e.strerror}") from e
            return False
        # Checked again after the link: the temporary name may have been swapped just before it.
        st = os.stat(candidate, dir_fd=self.dir_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            os.unlink(candidate, dir_fd=self.dir_fd)
            raise UnsafePath(f"the temporary file for {candidate} was replaced while it was written")
        return True

    def _reserve_and_rename(self, candidate: str, mine: os.stat_result) -> None:
        """Claim ``candidate`` with an empty directory, then rename the core to it.

        ``mkdir`` is atomic, fails on any existing name and follows no link; unlike an empty
        file, nothing of it is uploaded after ``close()`` returned (rclone mount releases a
        file asynchronously: an empty reservation's late upload raced the rename and the
        core vanished). Renaming a file onto a directory fails (EISDIR), so the name is
        freed just before the rename; only a name swapped in within that instant is replaced.

        The temporary name was checked before the reservation, but the container may swap it
        between that check and the rename (each is a round trip to a FUSE daemon): what got
        ``candidate`` is checked again, opened by the directory's fd without following a
        link, and must be the file written (device and inode); anything else is taken away
        from the name and the publish fails.
        """
        assert self.tmp_name is not None
        _step(f"reserving {candidate}", os.mkdir, candidate, 0o700, dir_fd=self.dir_fd)
        try:
            os.rmdir(candidate, dir_fd=self.dir_fd)
            os.rename(self.tmp_name, candidate, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except IsADirectoryError:
            raise FileExistsError(errno.EEXIST, f"{candidate} became a directory") from None
        except OSError as e:
            try:
                os.rmdir(candidate, dir_fd=self.dir_fd)
            except OSError:
                pass
            raise PublishFailed(
                e.errno, f"renaming the file to {candidate} failed, nothing was published: {e.strerror}"
            ) from e
        self.tmp_name = None  # whatever it names now is not ours to remove
        if not _is_mine(self.dir_fd, candidate, mine):
            try:
                os.unlink(candidate, dir_fd=self.dir_fd)
            except OSError:
                pass  # a directory swapped in stays: it names no core either
            raise UnsafePath(f"the temporary file for {candidate} was replaced while it was renamed")

    def discard(self) -> None:
        """Drop the file: the anonymous one vanishes, a temporary name is removed."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            # Dropped anyway: a FUSE bucket's failing upload at close must not hide the first error.
            try:
                os.close(fd)
            except OSError:
                pass
        if self.tmp_name is not None:
            # Best effort: on a bucket whose endpoint is gone this fails too, and what is
            # left is a hidden .corevault-*.tmp name, recognisably not a core.
            try:
                os.unlink(self.tmp_name, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.tmp_name = None


def _is_mine(dir_fd: int, name: str, mine: os.stat_result) -> bool:
    """Whether ``name`` in ``dir_fd`` is the regular file ``mine`` (a link there is not followed).

    The same device and inode; or, on the same device, a file of ``mine``'s size, owner and
    mode: rclone mount gives a file a new inode number when it is renamed. A tenant passes that
    only with a file of the core's exact size, owner and mode, in its own directory, where it
    may write as well once the core is published.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_dev != mine.st_dev:
        return False
    if st.st_ino == mine.st_ino:
        return True
    same = ("st_size", "st_uid", "st_gid", "st_mode")
    return all(getattr(st, a) == getattr(mine, a) for a in same)


def _step(what: str, fn, *args, **kwargs):  # -> fn's result
    """Call ``fn``; an OSError other than EEXIST becomes PublishFailed naming ``what``."""
    try:
        return fn(*args, **kwargs)
    except FileExistsError:
        raise
    except OSError as e:
        raise PublishFailed(e.errno, f"{what} failed, nothing was published: {e.strerror}") from e
