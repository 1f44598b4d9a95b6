"""A crashed process's memory as the core and its mapped files hold it, read defensively.

The kernel dumps the pages a process wrote (stacks, heap, data) and only the first page of a
file-backed read-only mapping; the rest (code, rodata) is read from the identity-checked
file that was mapped there. Every read is bounded, and every pointer a caller follows comes
from untrusted memory: reads outside what the core and the files hold answer None.

pyelftools is imported by the functions that parse a file, not by this module: most
crashes (no runtime's death path, no Go stack switch) never read memory this way, and
importing it cost the sandboxed worker more than reading a small core.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from corevault.analysis.elfcore import Core

MAX_TEXT = 1024
MAX_SYMBOLS = 1 << 21
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class Image:
    """A mapped ELF object: its path in the core, its build-id-checked file and load bias."""

    path: str
    file: str
    bias: int


def clean(raw: bytes) -> str | None:
    """Untrusted bytes as one bounded line of text (newlines kept, control characters not)."""
    text = raw[:MAX_TEXT].decode("utf-8", errors="replace").strip()
    text = _CONTROL.sub("\ufffd", text.replace("\r", ""))
    return text or None


def images(core: Core, files: dict[str, str | None]) -> list[Image]:
    """The mapped objects whose files were found (``files``: path in the core -> checked file)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    out = []
    for path, file in files.items():
        if file is None:
            continue
        try:
            with open(file, "rb") as f:
                loads = [s["p_vaddr"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        except (OSError, ELFError, struct.error, ValueError):
            continue
        if loads:
            out.append(Image(path, file, core.extent(path)[0] - (min(loads) & ~0xFFF)))
    return out


def symbols(file: str, wanted: set[str]) -> dict[str, int]:
    """The values of the ``wanted`` symbols (versions ignored) in ``file``'s symbol tables.

    Exported symbols are looked up through the dynamic symbol hash table (libc has
    thousands: scanning them in Python costs tens of milliseconds per report); the rest,
    and files without one (static and Go executables), by a bounded scan of ``.symtab``.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.hash import ELFHashSection, GNUHashSection
    from elftools.elf.sections import SymbolTableSection

    out: dict[str, int] = {}
    try:
        with open(file, "rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                if isinstance(section, (GNUHashSection, ELFHashSection)):
                    for name in wanted - set(out):
                        sym = section.get_symbol(name)
                        if sym is not None and sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF":
                            out[name] = sym["st_value"]
                    break
            if len(out) == len(wanted):
                return out
            table = elf.get_section_by_name(".symtab")
            if not isinstance(table, SymbolTableSection):
                return out
            for seen, sym in enumerate(table.iter_symbols()):
                if seen > MAX_SYMBOLS or len(out) == len(wanted):
                    break
                name = sym.name.split("@", 1)[0]
                if name in wanted and sym["st_value"] and name not in out:
                    out[name] = sym["st_value"]
    except (OSError, ELFError, struct.error, ValueError, UnicodeDecodeError):
        return out
    return out


def file_bytes(file: str, value: int, size: int) -> bytes | None:
    """``size`` bytes at virtual address ``value`` of an ELF file, from its loadable segments."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(file, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= value < seg["p_vaddr"] + seg["p_filesz"]:
                    f.seek(seg["p_offset"] + value - seg["p_vaddr"])
                    return f.read(min(size, seg["p_vaddr"] + seg["p_filesz"] - value))
    except (OSError, ELFError, struct.error, ValueError):
        return None
    return None


class Memory:
    """The crashed process's memory: the core's pages, and read-only pages from the mapped files.

    The kernel dumps only the first page of a file-backed read-only mapping (rodata, code),
    so those are read from the build-id-checked file that was mapped there.
    """

    def __init__(self, core: Core, imgs: list[Image]) -> None:
        self.core = core
        self.images = imgs

    def read(self, address: int, size: int) -> bytes | None:
        if not 0 < address < 1 << 64:
            return None
        data = self.core.read_memory(address, size)
        if data:
            return data
        path, _ = self.core.module_at(address)
        img = next((i for i in self.images if i.path == path), None)
        return file_bytes(img.file, address - img.bias, size) if img else None

    def word(self, address: int | None) -> int | None:
        data = self.read(address, 8) if address else None
        return struct.unpack("<Q", data)[0] if data and len(data) == 8 else None

    def cstring(self, address: int | None) -> bytes | None:
        data = self.read(address, MAX_TEXT + 1) if address else None
        if not data:
            return None
        end = data.find(b"\0")
        return data if end < 0 else data[:end]
