"""A program's last words, read from its core: why it died, as its runtime said it.

Each runtime leaves the reason for a deliberate death in its own memory, in a place its
ABI fixes; this module reads it from the core at those places and nowhere else:

- **glibc** keeps the message of a failed ``assert``, a fortify or a malloc check in
  ``__abort_msg`` (a pointer to ``{uint32 size; char msg[]}``), an exported symbol of libc
  (or of a static executable).
- **C++** (libstdc++): ``std::terminate`` for an uncaught exception runs after
  ``__cxa_begin_catch``, so the exception heads the crashing thread's ``caughtExceptions``
  list in its ``__cxa_eh_globals``. That thread-local block is found the way
  ``__cxa_get_globals`` finds it (its two instructions are decoded: a general-dynamic
  ``__tls_get_addr`` call, or an initial-exec ``%fs`` offset), from the thread's ``fs_base``.
  The header's ``exception_class`` must read ``GNUCC++\\0`` and the type's name comes from its
  ``std::type_info``; ``what()`` is read only for types derived (by single inheritance) from
  ``std::logic_error`` or ``std::runtime_error``, whose message is their first member.
- **Rust** (``panic=abort``): the ``PanicInfo`` on the panicking thread's stack, see
  :mod:`corevault.analysis.rustpanic`.
- **Go** (1.17 and later): the panicking goroutine's ``g`` sits at ``%fs:-8``;
  ``g._panic`` (which must lie on that goroutine's own stack) holds the panic value. It is
  put in words only when its type is one whose text is its own bytes: ``string``,
  ``runtime.plainError`` and ``runtime.errorString`` (which Go prints after ``runtime
  error:``), named by its type descriptor, which must lie between the executable's
  ``runtime.types`` and ``runtime.etypes`` and be of kind string.

Everything read here is the crashed program's data, and a hostile one can forge any of it:
reads are bounded (:data:`MAX_TEXT`), every pointer is followed at most a fixed number of
times, text has its control characters replaced, and the result is plain text, never
markup. Where a structure does not validate, the answer is None: nothing rather than a guess.
"""

from __future__ import annotations

import os
import re
import struct

from corevault.analysis import demangle, rustpanic
from corevault.analysis.elfcore import Core
from corevault.analysis.procmem import MAX_TEXT, Image, Memory, clean, file_bytes, images, symbols
from corevault.model import Thread

_GXX_CLASS = b"\x00++CCUNG"  # "GNUCC++\0" as a little-endian uint64
_STD_MESSAGE_BASES = ("St11logic_error", "St13runtime_error")
# lea tls_index(%rip),%rdi; call __tls_get_addr; add $8,%rsp; [add $imm32,%rax]
_TLS_GD = re.compile(rb"\x48\x8d\x3d(.{4})\xe8.{4}\x48\x83\xc4\x08(?:\x48\x05(.{4}))?", re.DOTALL)
# mov x@gottpoff(%rip),%rax; add %fs:0,%rax
_TLS_IE = re.compile(rb"\x48\x8b\x05(.{4})\x64\x48\x03\x04\x25\x00\x00\x00\x00", re.DOTALL)


def abort_message(mem: Memory, exe_path: str | None) -> str | None:
    """glibc's ``__abort_msg``: an assert, fortify or malloc check's message."""
    libc = [i for i in mem.images if os.path.basename(i.path).startswith("libc.so")]
    # A dynamically linked program's is libc's own (a private symbol no program refers to);
    # only a static executable holds one. Not scanning a large program's symbol table for
    # it spares seconds (Node's 110,000 symbols: 7 s).
    for img in libc or [i for i in mem.images if i.path == exe_path]:
        value = symbols(img.file, {"__abort_msg"}).get("__abort_msg")
        msg = mem.word(img.bias + value) if value else None
        if msg:
            size_bytes = mem.read(msg, 4)
            if not size_bytes or len(size_bytes) != 4:
                return None
            (size,) = struct.unpack("<I", size_bytes)
            data = mem.read(msg + 4, min(max(size - 4, 0), MAX_TEXT))
            return clean(data.split(b"\0", 1)[0]) if data else None
    return None


def _eh_globals(mem: Memory, img: Image, fs_base: int) -> int | None:
    value = symbols(img.file, {"__cxa_get_globals"}).get("__cxa_get_globals")
    code = file_bytes(img.file, value, 48) if value else None
    if not code or value is None:
        return None
    if m := _TLS_GD.search(code):
        (disp,) = struct.unpack("<i", m.group(1))
        index = img.bias + value + m.end(1) + disp  # rip-relative: from the end of the lea
        module, offset = mem.word(index), mem.word(index + 8)
        dtv = mem.word(fs_base + 8)  # tcbhead_t: {tcb, dtv, ...}
        if module is None or offset is None or dtv is None or not 0 < module < 1 << 16:
            return None
        block = mem.word(dtv + 16 * module)  # dtv_t is {void *val; void *to_free}
        if not block or block == (1 << 64) - 1:  # TLS_DTV_UNALLOCATED
            return None
        extra = struct.unpack("<i", m.group(2))[0] if m.group(2) else 0
        return (block + offset + extra) % (1 << 64)
    if m := _TLS_IE.search(code):
        (disp,) = struct.unpack("<i", m.group(1))
        tpoff = mem.word(img.bias + value + m.end(1) + disp)
        return None if tpoff is None else (fs_base + tpoff) % (1 << 64)
    return None


def cxx_exception(mem: Memory, fs_base: int | None) -> str | None:
    """An uncaught C++ exception's type and, for the standard's message-carrying ones, ``what()``."""
    lib = next((i for i in mem.images if os.path.basename(i.path).startswith("libstdc++.so")), None)
    if lib is None or not fs_base:
        return None
    globals_at = _eh_globals(mem, lib, fs_base)
    header = mem.word(globals_at) if globals_at else None  # caughtExceptions
    if not header or mem.read(header + 80, 8) != _GXX_CLASS:
        return None
    type_info = mem.word(header)
    name = mem.cstring(mem.word(type_info + 8)) if type_info else None
    if not name:
        return None
    mangled = name.lstrip(b"*").decode("ascii", errors="replace")
    readable = demangle.demangle_type(mangled) or mangled
    vtables = symbols(lib.file, {"_ZTVN10__cxxabiv120__si_class_type_infoE"})
    si_vptr = lib.bias + vtables["_ZTVN10__cxxabiv120__si_class_type_infoE"] + 16 if vtables else None
    what = None
    ti, names = type_info, [mangled]
    for _ in range(16):  # walk single-inheritance bases, bounded
        if ti is None or mem.word(ti) != si_vptr:
            break
        ti = mem.word(ti + 16)
        base = mem.cstring(mem.word(ti + 8)) if ti else None
        if base is None:
            break
        names.append(base.decode("ascii", errors="replace"))
    if any(n in _STD_MESSAGE_BASES for n in names):
        message = mem.cstring(mem.word(header + 112 + 8))  # the object follows its header
        what = clean(message) if message is not None else None
    return f"uncaught {clean(readable.encode())}" + (f": {what}" if what else "")


_GO_VERSION = re.compile(rb"^go1\.(\d+)")
_GO_KIND_STRING = 24
# the types whose value is a string Go prints as is, with the prefix Go's runtime prints
_GO_STRING_TYPES = {"string": "", "runtime.plainError": "", "runtime.errorString": "runtime error: "}


def _go_type_name(mem: Memory, types: int, etypes: int, typ: int) -> str | None:
    """The name of a Go type descriptor of kind string (``abi.Type.Str``, a name offset at +40)."""
    if not types <= typ < etypes:
        return None
    head = mem.read(typ, 48)
    if not head or len(head) < 48:
        return None
    tflag, kind = head[20], head[23] & 0x1F
    (name_off,) = struct.unpack_from("<i", head, 40)
    if kind != _GO_KIND_STRING or not 0 <= name_off < etypes - types:
        return None
    raw = mem.read(types + name_off, 1 + 2 + 256)  # a flags byte, a varint length, the bytes
    if not raw or len(raw) < 3:
        return None
    length, at = raw[1] & 0x7F, 2
    if raw[1] & 0x80:
        length, at = length | (raw[2] & 0x7F) << 7, 3
    name = raw[at : at + length]
    if len(name) != length or length == 0:
        return None
    text = name.decode("utf-8", errors="replace")
    return text[1:] if tflag & 2 and text.startswith("*") else text  # tflagExtraStar


def go_panic(mem: Memory, exe: Image | None, fs_base: int | None) -> str | None:
    """The value of a Go panic, when its type is one whose text is its own bytes."""
    if exe is None or not fs_base:
        return None
    syms = symbols(exe.file, {"runtime.types", "runtime.etypes", "runtime.buildVersion"})
    if len(syms) != 3:
        return None
    version = mem.read(mem.word(exe.bias + syms["runtime.buildVersion"]) or 0, 16)
    m = _GO_VERSION.match(version or b"")
    if not m or int(m.group(1)) < 17:  # type names are varint-prefixed since Go 1.17
        return None
    g = mem.word(fs_base - 8)  # Go keeps the running goroutine's g at -8(%fs)
    lo, hi, panic = (mem.word(g), mem.word(g + 8), mem.word(g + 32)) if g else (None, None, None)
    # g._panic is gopanic's local, on the goroutine's own stack: a real g passes this
    if lo is None or hi is None or panic is None or not lo <= panic < hi or hi - lo > 1 << 30:
        return None
    typ, data = mem.word(panic + 8), mem.word(panic + 16)  # _panic.arg, an interface value
    types, etypes = exe.bias + syms["runtime.types"], exe.bias + syms["runtime.etypes"]
    name = _go_type_name(mem, types, etypes, typ) if typ and data else None
    if name not in _GO_STRING_TYPES:
        return None
    ptr, length = mem.word(data), mem.word(data + 8)
    if ptr is None or length is None:
        return None
    text = mem.read(ptr, min(length, MAX_TEXT)) if length else b""
    if text is None:
        return None
    return "panic: " + _GO_STRING_TYPES[name] + (clean(text) or "")


_GO_BACKLOG = 512  # len(runtime.printBacklog), fixed in runtime/print.go
_GO_FATAL = b"fatal error: "


def go_fatal(mem: Memory, exe: Image | None) -> str | None:
    """The ``fatal error:`` line the Go runtime printed last, from its print ring."""
    if exe is None:
        return None
    syms = symbols(exe.file, {"runtime.printBacklog", "runtime.printBacklogIndex"})
    if len(syms) != 2:
        return None
    ring = mem.read(exe.bias + syms["runtime.printBacklog"], _GO_BACKLOG)
    index = mem.word(exe.bias + syms["runtime.printBacklogIndex"])
    if ring is None or len(ring) != _GO_BACKLOG or index is None or not 0 <= index < _GO_BACKLOG:
        return None
    text = ring[index:] + ring[:index]  # oldest first
    at = text.rfind(_GO_FATAL)
    if at < 0:
        return None
    line = text[at:].split(b"\n", 1)[0]
    return clean(line)


def read(
    core: Core,
    files: dict[str, str | None],
    exe_path: str | None,
    crashed: Thread | None,
) -> str | None:
    """The crashed program's last words, or None where its runtime left none that validate.

    ``files`` maps each mapped object's path in the core to its identity-checked file;
    ``crashed`` is the crashing thread as unwound, with its frames named.
    """
    if core.machine != "x86_64":
        return None
    tid = crashed.tid if crashed else None
    state = next((t for t in core.threads if t.tid == tid), core.threads[0] if core.threads else None)
    fs_base = state.registers.get("fs_base") if state else None
    sp = state.registers.get("rsp") if state else None
    frames = [(f.function, f.pc) for f in crashed.frames] if crashed else []
    names = {name for name, _ in frames}
    # Each reader runs only where its runtime's death path is in the crashed thread's stack:
    # reading symbol tables costs more than the rest of a small report.
    go = names & {"runtime.fatalpanic", "runtime.gopanic"}
    thrown = names & {"runtime.fatalthrow", "runtime.throw", "runtime.fatal"}
    rust = rustpanic.PANIC_FMT in names
    aborted = bool(names & {"abort", "__GI_abort"})
    if not (go or thrown or rust or aborted):
        return None
    mem = Memory(core, images(core, files))
    exe = next((i for i in mem.images if i.path == exe_path), None)
    return (
        (go_panic(mem, exe, fs_base) if go else None)
        or (go_fatal(mem, exe) if thrown else None)
        or (rustpanic.read(mem, exe, frames, sp) if rust else None)
        or (cxx_exception(mem, fs_base) if aborted else None)
        or (abort_message(mem, exe_path) if aborted else None)
    )
