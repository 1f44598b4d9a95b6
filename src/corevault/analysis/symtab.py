"""Function names from an ELF symbol table (``.symtab``), without reading any DWARF.

A distribution's libc ships stripped: its ``.dynsym`` names only exported functions, so
the frames gdb names ``__pthread_kill_implementation``, ``start_thread`` or
``__strlen_avx2`` stay ``libc.so.6+0x…`` under drgn. Their separate debug file (found by
build-id: the host's ``/usr/lib/debug/.build-id``, the node store, an upstream debuginfod)
carries the full symbol table next to its DWARF. Loading that DWARF into an unwinder
indexes all of it (0.28 s of a 0.31 s report for libc); the symbol table alone is one
section of ~10,000 fixed-size entries, read here with ``struct`` in a few milliseconds.

The file is untrusted (a pod's own library, or a download): sizes, counts and name
lengths are bounded, and a file that does not parse gives no names rather than an error.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass

PT_LOAD = 1
SHT_SYMTAB = 2
STT_FUNC = 2
STT_GNU_IFUNC = 10
SHN_UNDEF = 0
MAX_SECTIONS = 1 << 16
MAX_SYMBOLS = 1 << 21  # libc's debug file has 10,021; a large C++ program a few hundred thousand
MAX_STRTAB = 256 << 20
MAX_NAME = 4096
#: global beats weak beats local when several symbols start at one address (malloc, __libc_malloc)
_BINDING_RANK = {1: 0, 2: 1, 0: 2}
#: glibc's internal aliases of public functions: the public name is the one people know
_INTERNAL = (b"__GI_", b"__libc_")


@dataclass(frozen=True, slots=True)
class Symbols:
    """The function symbols of one ELF file, sorted by address."""

    #: the file's lowest loadable address, page-aligned: where its load address maps to
    base: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    names: tuple[str, ...]

    def name_at(self, offset: int) -> str | None:
        """The function covering ``offset`` (from the object's load address), or None."""
        address = self.base + offset
        i = bisect.bisect_right(self.starts, address) - 1
        # Functions do not nest, but a cold part or an alias can start inside another one:
        # look back a little for the nearest symbol whose extent covers the address.
        for j in range(i, max(i - 8, -1), -1):
            if self.starts[j] <= address < self.ends[j]:
                return self.names[j]
        return None


def read(path: str) -> Symbols | None:
    """The function symbols of the ELF file at ``path``, or None when it has none or is broken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read(fd)
    except (OSError, ValueError, struct.error):
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> Symbols | None:
    head = os.pread(fd, 64, 0)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    e = "<" if head[5] == 1 else ">"
    wide = head[4] == 2
    if wide:
        phoff, shoff = struct.unpack_from(e + "QQ", head, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 54)
        ph_fmt, sh_fmt, sym_fmt = e + "I4x8xQ", e + "4xI16xQQI4x8xQ", e + "IBBHQQ"
    else:
        phoff, shoff = struct.unpack_from(e + "II", head, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 42)
        ph_fmt, sh_fmt, sym_fmt = e + "I4xI", e + "4xI8xIII4x4xI", e + "IIIBBH"
    if not 0 < shnum <= MAX_SECTIONS or shentsize < struct.calcsize(sh_fmt):
        return None
    if phentsize < struct.calcsize(ph_fmt) or phnum > MAX_SECTIONS:
        return None
    phdrs = os.pread(fd, phentsize * phnum, phoff)
    loads = [
        vaddr
        for i in range(len(phdrs) // phentsize)
        for p_type, vaddr in [struct.unpack_from(ph_fmt, phdrs, i * phentsize)]
        if p_type == PT_LOAD
    ]
    base = (min(loads) & ~0xFFF) if loads else 0
    table = os.pread(fd, shentsize * shnum, shoff)
    # (sh_type, sh_offset, sh_size, sh_link, sh_entsize) of each section header
    sections = [struct.unpack_from(sh_fmt, table, i * shentsize) for i in range(len(table) // shentsize)]
    symtab = next((s for s in sections if s[0] == SHT_SYMTAB), None)
    if symtab is None or symtab[3] >= len(sections):
        return None
    _, sym_off, sym_size, link, entsize = symtab
    if entsize < struct.calcsize(sym_fmt) or sym_size // entsize > MAX_SYMBOLS:
        return None
    _, str_off, str_size, _, _ = sections[link]
    strtab = os.pread(fd, min(str_size, MAX_STRTAB), str_off)
    raw = os.pread(fd, sym_size - sym_size % entsize, sym_off)
    if entsize != struct.calcsize(sym_fmt):  # padded entries: unusual, read them one by one
        raw = b"".join(raw[i : i + struct.calcsize(sym_fmt)] for i in range(0, len(raw), entsize))
    symbols = struct.iter_unpack(sym_fmt, raw)
    if not wide:  # ELF32 orders the fields differently
        symbols = ((n, i, o, x, v, z) for n, v, z, i, o, x in symbols)
    functions = (STT_FUNC, STT_GNU_IFUNC)
    entries = [
        (value, _BINDING_RANK.get(info >> 4, 3), value + size, name)
        for name, info, _, shndx, value, size in symbols
        if info & 0xF in functions and shndx != SHN_UNDEF and size and name
    ]
    entries.sort()
    starts: list[int] = []
    ends: list[int] = []
    names: list[str] = []
    for value, _, end, offset in entries:
        stop = strtab.find(b"\0", offset, offset + MAX_NAME)
        if stop < 0:
            continue
        name = strtab[offset:stop].split(b"@", 1)[0]  # a symbol version (memcpy@@GLIBC_2.14) is no part of it
        if starts and starts[-1] == value:  # an alias of the better-ranked symbol just kept
            if names[-1].encode().startswith(_INTERNAL) and not name.startswith(_INTERNAL):
                names[-1] = name.decode(errors="replace")
            continue
        starts.append(value)
        ends.append(end)
        names.append(name.decode(errors="replace"))
    if not starts:
        return None
    return Symbols(base, tuple(starts), tuple(ends), tuple(names))
