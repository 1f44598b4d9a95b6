"""Finding a crash's binaries and debug info by build-id, never by path alone.

A container's libc is not the host's, and an image may be gone by the time someone
looks: the capture handler copied every mapped ELF object into the node's build-id store
(``<store>/buildid/<id>/executable``, the debuginfod layout). Debug info is looked for in
the store (``buildid/<id>/debuginfo``) and in the host's standard separate-debug tree
(``/usr/lib/debug/.build-id/xx/rest.debug``), which is safe because it is keyed by the
same build-id. Every candidate's build-id is read from the file and compared before it is
used: a file that does not match is reported, never used (gdb would use a wrong libc
silently).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from corevault import elf

DEBUG_DIRS = ("/usr/lib/debug",)


@dataclass(frozen=True, slots=True)
class Found:
    executable: str | None
    debuginfo: str | None


def file_build_id(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return elf.build_id(lambda offset, size: os.pread(fd, size, offset))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def has_dwarf(path: str) -> bool:
    """Whether an ELF file carries DWARF (a ``.debug_info`` section).

    Read with :func:`corevault.elf.section_names`, which is bounded: the agent asks this of
    every binary a tenant's crash mapped, in its own process.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        names = elf.section_names(lambda offset, size: os.pread(fd, size, offset))
    except (OSError, ValueError, struct.error):
        return False
    finally:
        os.close(fd)
    return names is not None and ".debug_info" in names


def locate(build_id: str, stores: list[str], debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> Found:
    """The executable and the debug info held for ``build_id``, each checked against it."""
    executable = debuginfo = None
    for store in stores:
        d = os.path.join(store, "buildid", build_id)
        if executable is None and file_build_id(os.path.join(d, "executable")) == build_id:
            executable = os.path.join(d, "executable")
        if debuginfo is None and file_build_id(os.path.join(d, "debuginfo")) == build_id:
            debuginfo = os.path.join(d, "debuginfo")
    if debuginfo is None:
        for base in debug_dirs:
            candidate = os.path.join(base, ".build-id", build_id[:2], build_id[2:] + ".debug")
            if file_build_id(candidate) == build_id:
                debuginfo = candidate
                break
    if debuginfo is None and executable is not None and has_dwarf(executable):
        debuginfo = executable
    return Found(executable, debuginfo)
