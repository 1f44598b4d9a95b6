"""The ELF objects a crashed process had mapped, by build-id, kept for later symbolization.

While the process still exists, every file-backed mapping that starts an ELF object is
opened through ``/proc/%P/map_files/<range>``: that is the very file the process mapped,
inside its container, even if it was deleted or replaced since. Its GNU build-id is read
from the program headers' notes (a few hundred bytes, no ELF library needed here), and the
open fd is kept so the copy into the node's build-id store can happen after the core has
been streamed. The store uses the debuginfod layout, ``buildid/<id>/executable``, so gdb,
drgn and eu-stack can point at it with ``DEBUGINFOD_URLS=file://<store>``.
"""

from __future__ import annotations

import os

from corevault import elf
from corevault.capture.safefs import NewFile

MAX_STORED_SIZE = 2 << 30


class Module:
    """One mapped ELF object of the crashed process."""

    __slots__ = ("build_id", "end", "fd", "path", "start", "stored")

    def __init__(self, path: str, start: int, end: int) -> None:
        self.path = path
        self.start = start
        self.end = end
        self.build_id: str | None = None
        self.fd = -1
        #: "new", "held" (already in the store), or why it was not stored
        self.stored: str | None = None

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "start": self.start,
            "end": self.end,
            "build_id": self.build_id,
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


def read_build_id(fd: int) -> str | None:
    """The GNU build-id of the ELF file open on ``fd``, or None."""
    return elf.build_id(lambda offset, size: os.pread(fd, size, offset))


def open_modules(proc_fd: int, maps: str) -> list[Module]:
    """Open and identify every mapped ELF object while the process is still there."""
    modules = []
    for path, name, start, end in mapped_objects(maps):
        m = Module(path, start, end)
        try:
            m.fd = os.open(f"map_files/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
            m.build_id = read_build_id(m.fd)
        except OSError as e:
            m.stored = f"unreadable: {e.strerror}"
        if m.build_id is None and m.fd >= 0:
            os.close(m.fd)  # not ELF (locale archives, fonts…) or no build-id
            m.fd = -1
            continue
        modules.append(m)
    return modules


def store_modules(buildid_dir: str, modules: list[Module]) -> None:
    """Copy each module the store does not hold yet; set ``stored`` and close the fds."""
    for m in modules:
        if m.fd < 0:
            continue
        try:
            m.stored = _store(buildid_dir, m.build_id or "", m.fd)
        except OSError as e:
            m.stored = f"not stored: {e.strerror or e}"
        finally:
            os.close(m.fd)
            m.fd = -1


def _store(buildid_dir: str, build_id: str, src: int) -> str:
    d = os.path.join(buildid_dir, "buildid", build_id)
    if os.path.exists(os.path.join(d, "executable")):
        return "held"
    size = os.fstat(src).st_size
    if size > MAX_STORED_SIZE:
        return f"not stored: {size} bytes is more than {MAX_STORED_SIZE}"
    os.makedirs(d, mode=0o755, exist_ok=True)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        new = NewFile(dir_fd)
        try:
            copied = 0
            while copied < size:
                n = os.sendfile(new.fd, src, copied, size - copied)
                if n == 0:
                    break
                copied += n
            new.publish("executable", 0, 0, 0o644, max_suffix=0)
        except FileExistsError:
            return "held"  # another handler stored it meanwhile
        finally:
            new.discard()
        return "new"
    finally:
        os.close(dir_fd)
