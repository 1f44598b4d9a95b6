"""Just enough ELF to find a GNU build-id (or Go's), in a file or in a core's copy of memory.

Used by the capture handler (which must not import an ELF library: it runs per crash) and
by the core reader, which reads the same notes from the first page of each mapped object
as the kernel dumped it, and for the section names (whether a file carries DWARF), which
the agent asks of every binary it ships. Every length read from the input is bounded, so a
hostile file costs at most a few reads of a few KiB (section names: at most
``MAX_SHNUM`` headers and ``MAX_STRTAB`` bytes of names, a few MiB). An ELF library walks
whatever table the file claims: pyelftools spent minutes on a sparse file that claims 16
million section headers.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    #: read(offset, size) -> bytes (possibly short) or None when nothing is there
    Reader = Callable[[int, int], bytes | None]

PT_LOAD = 1
PT_NOTE = 4
NT_GNU_BUILD_ID = 3
NT_GO_BUILD_ID = 4  # name "Go": the linker's .note.go.buildid, where Go writes no GNU one
MAX_PHNUM = 512
MAX_NOTES = 1 << 16
#: more section headers than any linked program or debug file has (they have tens); a
#: file that claims more is not read at all
MAX_SHNUM = 1 << 16
MAX_STRTAB = 1 << 20
SHN_XINDEX = 0xFFFF


def parse_notes(data: bytes, endian: str, align: int = 4) -> Iterator[tuple[bytes, int, bytes]]:
    """``(name, type, desc)`` of each well-formed note in ``data``; stops at the first broken one."""
    off = 0
    pad = align - 1
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(endian + "III", data, off)
        name_at = off + 12
        desc_at = name_at + ((namesz + pad) & ~pad)
        end = desc_at + ((descsz + pad) & ~pad)
        if desc_at + descsz > len(data):
            return
        yield data[name_at : name_at + namesz], ntype, data[desc_at : desc_at + descsz]
        off = end


def build_id(read: Reader, *, in_memory: bool = False) -> str | None:
    """The GNU build-id of the ELF object that ``read`` sees at offset 0, or None.

    With ``in_memory`` the reader is a process image based at the object's load address,
    so notes are found by virtual address rather than by file offset.
    """
    ids = build_ids(read, in_memory=in_memory)
    return ids[0] if ids else None


def header(read: Reader) -> tuple[bytes, str] | None:
    """The ELF header and its byte order (``<`` or ``>``); None if ``read`` sees no ELF file."""
    head = read(0, 64)
    if not head or len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    if head[4] == 2 and len(head) < 64:
        return None
    return head, "<" if head[5] == 1 else ">"


def build_ids(read: Reader, *, in_memory: bool = False) -> tuple[str | None, str | None] | None:
    """``(GNU build-id as hex, Go build id)`` of an ELF object, each None if absent; None if not ELF."""
    ident = header(read)
    if ident is None:
        return None
    head, e = ident
    if head[4] == 2:
        (phoff,) = struct.unpack_from(e + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(e + "HH", head, 54)
        ph_fmt = e + "I4xQQ8xQ8xQ"  # p_type, p_offset, p_vaddr, p_filesz, p_align
    else:
        (phoff,) = struct.unpack_from(e + "I", head, 28)
        phentsize, phnum = struct.unpack_from(e + "HH", head, 42)
        ph_fmt = e + "III4xI8xI"
    if not 0 < phnum <= MAX_PHNUM or phentsize < struct.calcsize(ph_fmt):
        return None, None
    table = read(phoff, phentsize * phnum) or b""
    headers = [
        struct.unpack_from(ph_fmt, table, i * phentsize)
        for i in range(phnum)
        if (i + 1) * phentsize <= len(table)
    ]
    loads = [vaddr for p_type, offset, vaddr, _, _ in headers if p_type == PT_LOAD and offset == 0]
    base = (loads[0] & ~0xFFF) if loads else 0
    gnu = go = None
    for p_type, offset, vaddr, filesz, align in headers:
        if p_type != PT_NOTE:
            continue
        notes = read(vaddr - base if in_memory else offset, min(filesz, MAX_NOTES)) or b""
        for name, ntype, desc in parse_notes(notes, e, 8 if align == 8 else 4):
            if ntype == NT_GNU_BUILD_ID and name == b"GNU\0" and desc and gnu is None:
                gnu = desc.hex()
            elif ntype == NT_GO_BUILD_ID and name == b"Go\0\0" and desc and go is None:
                go = desc.decode("ascii", errors="replace")
    return gnu, go


def section_names(read: Reader) -> frozenset[str] | None:
    """The names of the sections of the ELF file ``read`` sees, or None if it is not a
    readable ELF file or claims more than ``MAX_SHNUM`` sections."""
    ident = header(read)
    if ident is None:
        return None
    head, e = ident
    if head[4] == 2:
        (shoff,) = struct.unpack_from(e + "Q", head, 40)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", head, 58)
        sh_fmt = e + "II16xQQI"  # sh_name, sh_type, sh_offset, sh_size, sh_link
    else:
        (shoff,) = struct.unpack_from(e + "I", head, 32)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", head, 46)
        sh_fmt = e + "II8xIII"
    if shoff == 0 or shentsize < struct.calcsize(sh_fmt):
        return None
    if shnum == 0 or shstrndx == SHN_XINDEX:
        # more than 0xff00 sections: the real count and index are in section 0
        first = read(shoff, shentsize) or b""
        if len(first) < shentsize:
            return None
        _, _, _, size0, link0 = struct.unpack_from(sh_fmt, first)
        shnum = shnum or size0
        shstrndx = link0 if shstrndx == SHN_XINDEX else shstrndx
    if not 0 < shnum <= MAX_SHNUM or shstrndx >= shnum:
        return None
    table = read(shoff, shentsize * shnum) or b""
    headers = [
        struct.unpack_from(sh_fmt, table, i * shentsize)
        for i in range(shnum)
        if (i + 1) * shentsize <= len(table)
    ]
    if shstrndx >= len(headers):
        return None
    _, _, str_offset, str_size, _ = headers[shstrndx]
    strtab = read(str_offset, min(str_size, MAX_STRTAB)) or b""
    names = set()
    for name, *_ in headers:
        if name < len(strtab):
            end = strtab.find(b"\0", name)
            names.add(strtab[name : end if end >= 0 else None].decode("latin-1"))
    return frozenset(names)
