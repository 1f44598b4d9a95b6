"""A Rust panic's message and location, read from the core of a ``panic=abort`` program.

With ``panic=abort`` nothing outlives the panic but the stack: ``core::panicking::panic_fmt``
builds a ``PanicInfo`` (the message as ``fmt::Arguments`` and a ``&'static Location``) as a
local and hands it down the panic machinery, which aborts while that frame still exists.
The layouts of ``PanicInfo``, ``Location`` and ``Arguments`` are not stable across Rust
versions, so they are read from the executable's own DWARF: the ``panic_fmt`` subprogram that
holds the frame's pc (found through ``.debug_aranges``, one compilation unit parsed), its
``PanicInfo`` local and the member offsets of the types it reaches.

The ``PanicInfo`` is then looked for in the panicking thread's stack, above its stack
pointer and below the frames of the program that called ``panic_fmt``, and only a record
that validates as a whole is taken: its location must point into the executable, name a
``.rs`` file of sane length with a non-zero line and column, and its message must point
into that stack with at most :data:`MAX_PIECES` pieces. The message is put together from
the literal pieces and the arguments whose formatter is the standard library's
``Display`` for an integer (found by the formatter's address in the symbol table); with
any other argument, or with format specs, only the location is given.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from corevault.analysis import demangle, symtab
from corevault.analysis.procmem import Image, Memory, clean

if TYPE_CHECKING:
    from elftools.dwarf.die import DIE

PANIC_FMT = "core::panicking::panic_fmt"
MAX_PIECES = 16
MAX_DIES = 200_000
STACK_WINDOW = 64 << 10
_INT_DISPLAY = re.compile(
    r"^core::fmt::num::imp::<impl core::fmt::Display for ([iu](8|16|32|64|size))>::fmt$"
)


def _member_offsets(struct_die: DIE) -> dict[str, tuple[int, DIE | None]]:
    out = {}
    for child in struct_die.iter_children():
        if child.tag != "DW_TAG_member" or "DW_AT_name" not in child.attributes:
            continue
        loc = child.attributes.get("DW_AT_data_member_location")
        if loc is None or not isinstance(loc.value, int):
            continue
        target = child.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in child.attributes else None
        out[child.attributes["DW_AT_name"].value.decode(errors="replace")] = (loc.value, target)
    return out


def _pointee(die: DIE | None) -> DIE | None:
    """The struct a reference type points to (through typedefs), or None."""
    for _ in range(8):
        if die is None or die.tag == "DW_TAG_structure_type":
            return die
        if "DW_AT_type" not in die.attributes:
            return None
        die = die.get_DIE_from_attribute("DW_AT_type")
    return None


def _find_struct(start: DIE | None, name: bytes, budget: int = 5000) -> DIE | None:
    """A struct named ``name`` reachable from ``start`` through types and children, breadth first."""
    queue, seen = [start], set()
    while queue and budget > 0:
        die = queue.pop(0)
        if die is None or die.offset in seen:
            continue
        seen.add(die.offset)
        budget -= 1
        named = die.attributes.get("DW_AT_name")
        if die.tag == "DW_TAG_structure_type" and named is not None and named.value == name:
            return die
        if "DW_AT_type" in die.attributes:
            queue.append(die.get_DIE_from_attribute("DW_AT_type"))
        queue.extend(die.iter_children())
    return None


def _panic_info_layout(file: str, vaddr: int) -> dict[str, int] | None:
    """Offsets of the fields read here, from the DWARF of the ``panic_fmt`` holding ``vaddr``."""
    # imported here: only a Rust panic's analysis pays for pyelftools
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(file, "rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info():
                return None
            dwarf = elf.get_dwarf_info()
            aranges = dwarf.get_aranges()
            cu_offset = aranges.cu_offset_at_addr(vaddr) if aranges else None
            if cu_offset is None:
                return None
            cu = dwarf.get_CU_at(cu_offset)
            sub = None
            for n, die in enumerate(cu.iter_DIEs()):
                if n > MAX_DIES:
                    return None
                lo, hi = die.attributes.get("DW_AT_low_pc"), die.attributes.get("DW_AT_high_pc")
                if die.tag == "DW_TAG_subprogram" and lo is not None and hi is not None:
                    end = hi.value if hi.form == "DW_FORM_addr" else lo.value + hi.value
                    if lo.value <= vaddr < end:
                        sub = die
                        break
            info = _find_struct(sub, b"PanicInfo") if sub is not None else None
            if info is None:
                return None
            fields = _member_offsets(info)
            location, message = _pointee(fields.get("location", (0, None))[1]), fields.get("message")
            arguments = _find_struct(message[1], b"Arguments") if message else None
            if location is None or arguments is None or "location" not in fields:
                return None
            loc, args = _member_offsets(location), _member_offsets(arguments)
            if not {"file", "line", "col"} <= set(loc) or not {"pieces", "fmt", "args"} <= set(args):
                return None
            return {
                "message": fields["message"][0], "location": fields["location"][0],
                "file": loc["file"][0], "line": loc["line"][0], "col": loc["col"][0],
                "pieces": args["pieces"][0], "fmt": args["fmt"][0], "args": args["args"][0],
            }  # fmt: skip
    except (OSError, ELFError, DWARFError, struct.error, ValueError, KeyError, AttributeError):
        return None


def _formatter_name(mem: Memory, exe: Image, functions: symtab.Symbols | None, address: int | None) -> str:
    """The readable name of the function a formatter pointer points at (its entry), or ""."""
    path, offset = mem.core.module_at(address or 0)
    if functions is None or path != exe.path or offset is None:
        return ""
    name = functions.name_at(offset)
    return (demangle.readable(name, demangle.demangle_all([name])) or "") if name else ""


def _str(mem: Memory, at: int) -> bytes | None:
    ptr, length = mem.word(at), mem.word(at + 8)
    if ptr is None or length is None or length > 4096:
        return None
    data = mem.read(ptr, length) if length else b""
    return data if data is not None and len(data) == length else None


def _message(mem: Memory, exe: Image, arguments: int, layout: dict[str, int]) -> str | None:
    pieces_at, count = mem.word(arguments + layout["pieces"]), mem.word(arguments + layout["pieces"] + 8)
    args_at, nargs = mem.word(arguments + layout["args"]), mem.word(arguments + layout["args"] + 8)
    if pieces_at is None or count is None or args_at is None or nargs is None:
        return None
    if not 0 < count <= MAX_PIECES or nargs not in (count, count - 1) or mem.word(arguments + layout["fmt"]):
        return None
    functions = symtab.read(exe.file) if nargs else None
    if nargs and functions is None:
        return None
    out = b""
    for i in range(count):
        piece = _str(mem, pieces_at + 16 * i)
        if piece is None:
            return None
        out += piece
        if i < nargs:
            value, formatter = mem.word(args_at + 16 * i), mem.word(args_at + 16 * i + 8)
            m = _INT_DISPLAY.match(_formatter_name(mem, exe, functions, formatter))
            if value is None or m is None:
                return None
            kind = m.group(1)
            size = {"8": 1, "16": 2, "32": 4, "64": 8, "size": 8}[m.group(2)]
            raw = mem.read(value, size)
            if raw is None or len(raw) != size:
                return None
            out += str(int.from_bytes(raw, "little", signed=kind.startswith("i"))).encode()
    return clean(out) or ""


def read(mem: Memory, exe: Image | None, frames: list[tuple[str | None, int]], sp: int | None) -> str | None:
    """``panicked at 'MESSAGE', FILE:LINE:COL`` for a Rust panic in ``frames`` (name, pc)."""
    pcs = [pc for name, pc in frames if name == PANIC_FMT]
    if exe is None or not pcs or sp is None:
        return None
    layout = _panic_info_layout(exe.file, pcs[0] - 1 - exe.bias)  # a return address: step into the call
    if layout is None:
        return None
    lo, hi = mem.core.extent(exe.path)
    window = mem.read(sp, STACK_WINDOW) or b""
    for off in range(0, len(window) - 8 * 5 + 1, 8):
        at = sp + off
        location, message = mem.word(at + layout["location"]), mem.word(at + layout["message"])
        if (
            location is None
            or not lo <= location < hi
            or not message
            or not sp <= message < sp + STACK_WINDOW
        ):
            continue
        file = _str(mem, location + layout["file"])
        numbers = mem.read(location + layout["line"], 4), mem.read(location + layout["col"], 4)
        if file is None or not file.endswith(b".rs") or None in numbers:
            continue
        line, col = (int.from_bytes(n or b"", "little") for n in numbers)
        if not line or not col:
            continue
        where = f"{clean(file)}:{line}:{col}"
        text = _message(mem, exe, message, layout)
        return f"panicked at '{text}', {where}" if text is not None else f"panicked at {where}"
    return None
