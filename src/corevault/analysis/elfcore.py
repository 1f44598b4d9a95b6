"""Reading an ELF core file without a debugger: threads, signal, mappings and build-ids.

The kernel writes a core as an ELF file of type ET_CORE: a PT_NOTE segment, then one
PT_LOAD per memory mapping (empty where it dumped nothing). The notes hold what matters
for triage and for finding the right binaries:

- NT_PRSTATUS, one per thread, the thread that took the signal first: tid, signal and
  general registers;
- NT_PRPSINFO: pid, uid, command name and arguments;
- NT_SIGINFO: signal number, code and the faulting address;
- NT_FILE: every file-backed mapping with its path and file offset;
- NT_AUXV: the auxiliary vector (AT_ENTRY, AT_PHDR, AT_EXECFN…).

The build-id of each mapped ELF object is read from the core itself: the kernel dumps the
first page of every ELF mapping (coredump_filter bit 4), which holds its program headers
and, nearly always, its build-id note.

The ELF header, the program headers and the notes are parsed here with ``struct`` and hard
bounds (importing pyelftools cost the sandboxed worker more than reading a small core
does), because a core is untrusted input: a truncated, bit-flipped or hand-made file
gives a :class:`CoreError` with a reason, never an exception from deep inside a parser
and never an allocation the size of a lying length field.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from corevault import elf, objectid

ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
#: e_phnum of a core with more segments than 16 bits count: the count is section 0's sh_info
PN_XNUM = 0xFFFF
NT_PRSTATUS = 1
NT_PRPSINFO = 3
NT_AUXV = 6
AT_ENTRY = 9
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45
MAX_NOTE_BYTES = 256 << 20
MAX_SEGMENTS = 1 << 20

# user_regs_struct, in the order the kernel stores it in NT_PRSTATUS.
X86_64_REGS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()
AARCH64_REGS = [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate"]
_MACHINES = {
    62: ("x86_64", X86_64_REGS, "rip"),
    183: ("aarch64", AARCH64_REGS, "pc"),
}  # EM_X86_64, EM_AARCH64
_PRSTATUS_REG_OFFSET = 112  # 64-bit: siginfo, cursig, sigpend, sighold, pids, four timevals


class CoreError(Exception):
    """The file cannot be read as a core; the message says why."""


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str


@dataclass(frozen=True, slots=True)
class ThreadState:
    tid: int
    signal: int
    registers: dict[str, int]

    def pc(self, machine: str) -> int | None:
        return self.registers.get("rip" if machine == "x86_64" else "pc")


@dataclass
class Core:
    path: str
    machine: str
    size: int
    #: bytes the core's headers promise; more than ``size`` means the file was cut
    expected_size: int
    threads: list[ThreadState] = field(default_factory=list)
    signal: int | None = None
    signal_code: int | None = None
    fault_address: int | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    command: str | None = None
    args: str | None = None
    mappings: list[Mapping] = field(default_factory=list)
    auxv: dict[int, int] = field(default_factory=dict)
    #: build-id of each mapped ELF object (by path), read from the core's own memory
    build_ids: dict[str, str] = field(default_factory=dict)
    #: the key each object claims (GNU build-id, or Go's as ``go-…``), see corevault.objectid
    keys: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _segments: list[tuple[int, int, int, int]] = field(default_factory=list, repr=False)
    _by_address: tuple | None = field(default=None, repr=False)

    @property
    def is_snapshot(self) -> bool:
        """A core of a live process (gdb's gcore): no thread took a signal, which a kernel dump never is."""
        return bool(self.threads) and all(t.signal == 0 for t in self.threads)

    @property
    def truncated(self) -> bool:
        return self.size < self.expected_size

    def objects(self) -> list[Mapping]:
        """The first mapping (file offset 0) of each mapped file, in address order."""
        seen: dict[str, Mapping] = {}
        for m in sorted(self.mappings, key=lambda m: m.start):
            if m.offset == 0 and m.path not in seen:
                seen[m.path] = m
        return list(seen.values())

    @property
    def executable(self) -> str | None:
        """The path of the program itself: the mapped file that holds the auxv's entry point."""
        entry = self.auxv.get(AT_ENTRY)
        return self.module_at(entry)[0] if entry is not None else None

    def extent(self, path: str) -> tuple[int, int]:
        """Lowest and highest address mapped from ``path``."""
        return self._index()[1][path]

    def module_at(self, pc: int) -> tuple[str, int] | tuple[None, None]:
        """The mapped file ``pc`` falls in and its offset from that file's load address."""
        starts, extents, ordered = self._index()
        i = bisect.bisect_right(starts, pc) - 1
        if i >= 0 and pc < ordered[i].end:
            path = ordered[i].path
            return path, pc - extents[path][0]
        return None, None

    def _index(self) -> tuple[list[int], dict[str, tuple[int, int]], list[Mapping]]:
        if self._by_address is None:
            ordered = sorted(self.mappings, key=lambda m: m.start)
            extents: dict[str, tuple[int, int]] = {}
            for m in ordered:
                lo, hi = extents.get(m.path, (m.start, m.end))
                extents[m.path] = (min(lo, m.start), max(hi, m.end))
            self._by_address = ([m.start for m in ordered], extents, ordered)
        return self._by_address

    def read_memory(self, address: int, size: int) -> bytes | None:
        """Bytes of the process's memory as dumped, or None where the core holds none."""
        for vaddr, memsz, offset, filesz in self._segments:
            if vaddr <= address < vaddr + memsz:
                inside = address - vaddr
                if inside >= filesz:
                    return None
                size = min(size, filesz - inside, 1 << 20)
                with open(self.path, "rb") as f:
                    f.seek(offset + inside)
                    return f.read(size)
        return None


def read(path: str) -> Core:
    """Read a core's notes and layout; raises :class:`CoreError` for anything unreadable."""
    try:
        return _read(path)
    except CoreError:
        raise
    except OSError as e:
        raise CoreError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:  # a parser's error on hostile input: report it, don't escape
        raise CoreError(f"malformed ELF: {type(e).__name__}: {e}") from None


def _read(path: str) -> Core:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise CoreError("not an ELF file")

        def read_at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        ident = elf.header(read_at)
        if ident is None:
            raise CoreError("the ELF header is cut short or names no known class and byte order")
        head, e = ident
        endian = e
        is64 = head[4] == 2
        # ELF header fields after e_ident, as both classes lay them out
        e_type, e_machine = struct.unpack_from(e + "HH", head, 16)
        if is64:
            phoff, shoff = struct.unpack_from(e + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 54)
        else:
            phoff, shoff = struct.unpack_from(e + "II", head, 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 42)
        if e_type != ET_CORE:
            raise CoreError(f"an ELF file of type {e_type}, not a core")
        count = _segment_count(read_at, e, is64, phnum=phnum, shoff=shoff, shentsize=shentsize)
        if count > MAX_SEGMENTS:
            raise CoreError(f"{count} segments is more than a core can have")
        machine, reg_names, _ = _MACHINES.get(e_machine, (f"EM_{e_machine}", [], ""))
        # The program header table is read with struct: pyelftools' per-segment parsing
        # costs 0.14 s for the 2000 segments of a 1000-thread core.
        fmt, fields = (e + "IIQQQQQQ", (0, 2, 3, 5, 6)) if is64 else (e + "IIIIIIII", (0, 1, 2, 4, 5))
        if phentsize < struct.calcsize(fmt):
            raise CoreError(f"program headers of {phentsize} bytes are too small")
        table = read_at(phoff, count * phentsize)
        if len(table) < count * phentsize:
            raise CoreError("the program header table is cut short")
        segments = []  # (type, offset, vaddr, filesz, memsz)
        for i in range(count):
            values = struct.unpack_from(fmt, table, i * phentsize)
            segments.append(tuple(values[k] for k in fields))
        expected = max(
            [offset + filesz for _, offset, _, filesz, _ in segments]
            + [phoff + count * phentsize, shoff + shnum * shentsize]
        )
        core = Core(path, machine, size, expected)
        core._segments = [
            (vaddr, memsz, offset, filesz) for t, offset, vaddr, filesz, memsz in segments if t == PT_LOAD
        ]
        word = "Q" if is64 else "I"
        for p_type, offset, _, filesz, _ in segments:
            if p_type != PT_NOTE:
                continue
            if filesz > MAX_NOTE_BYTES:
                raise CoreError(f"a note segment of {filesz} bytes is more than a core has")
            f.seek(offset)
            data = f.read(filesz)
            if len(data) < filesz:
                core.warnings.append("the notes are cut short: the core is truncated")
            for name, ntype, desc in elf.parse_notes(data, endian, 4):
                _note(core, name, ntype, desc, endian, word, reg_names)
    if not core.threads:
        raise CoreError("no thread status (NT_PRSTATUS) in the core")
    for m in core.objects():
        try:
            ids = elf.build_ids(lambda off, n, base=m.start: core.read_memory(base + off, n), in_memory=True)
        except (struct.error, OSError):
            ids = None
        bid, go = ids or (None, None)
        if bid:
            core.build_ids[m.path] = bid
        key = objectid.key_for(bid, go, None)
        if key:
            core.keys[m.path] = key
    return core


def _segment_count(
    read_at: Callable[[int, int], bytes], e: str, is64: bool, *, phnum: int, shoff: int, shentsize: int
) -> int:
    """e_phnum, or where a core has more than 65,534 segments, section 0's sh_info."""
    if phnum != PN_XNUM:
        return phnum
    # sh_info follows sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size and sh_link
    fmt = e + ("44xI" if is64 else "28xI")
    first = read_at(shoff, shentsize) if shoff and shentsize >= struct.calcsize(fmt) else b""
    if len(first) < struct.calcsize(fmt):
        raise CoreError("the core has more than 65,534 segments but no section header to count them")
    return struct.unpack_from(fmt, first)[0]


def _note(core: Core, name: bytes, ntype: int, desc: bytes, e: str, word: str, reg_names: list[str]) -> None:  # noqa: PLR0917
    if name not in (b"CORE\0", b"LINUX\0"):
        return
    if ntype == NT_PRSTATUS and name == b"CORE\0" and len(desc) >= _PRSTATUS_REG_OFFSET:
        signo, _code, _errno, cursig = struct.unpack_from(e + "iiih", desc, 0)
        (pid,) = struct.unpack_from(e + "i", desc, 32)
        n = min(len(reg_names), (len(desc) - _PRSTATUS_REG_OFFSET) // 8)
        values = struct.unpack_from(e + f"{n}Q", desc, _PRSTATUS_REG_OFFSET) if n else ()
        core.threads.append(ThreadState(pid, cursig or signo, dict(zip(reg_names, values, strict=False))))
    elif ntype == NT_PRPSINFO and name == b"CORE\0" and len(desc) >= 136:
        uid, gid, pid = struct.unpack_from(e + "IIi", desc, 16)
        core.uid, core.gid, core.pid = uid, gid, pid
        core.command = desc[40:56].split(b"\0", 1)[0].decode(errors="replace")
        core.args = desc[56:136].split(b"\0", 1)[0].decode(errors="replace").strip()
    elif ntype == NT_SIGINFO and len(desc) >= 12:
        core.signal, _, core.signal_code = struct.unpack_from(e + "iii", desc, 0)
        if core.signal in (4, 5, 7, 8, 11) and len(desc) >= 24:  # SIGILL SIGTRAP SIGBUS SIGFPE SIGSEGV
            (core.fault_address,) = struct.unpack_from(e + "Q", desc, 16)
    elif ntype == NT_AUXV:
        size = struct.calcsize(e + word)
        for i in range(0, len(desc) - 2 * size + 1, 2 * size):
            key, value = struct.unpack_from(e + word + word, desc, i)
            if key == 0:
                break
            core.auxv[key] = value
    elif ntype == NT_FILE:
        _nt_file(core, desc, e, word)


def _nt_file(core: Core, desc: bytes, e: str, word: str) -> None:
    size = struct.calcsize(e + word)
    if len(desc) < 2 * size:
        return
    count, page_size = struct.unpack_from(e + word + word, desc, 0)
    table_end = 2 * size + count * 3 * size
    if count > len(desc) // (3 * size) or table_end > len(desc):
        core.warnings.append("the file mapping note (NT_FILE) is malformed; mapped files are unknown")
        return
    names = desc[table_end:].split(b"\0")
    for i in range(count):
        start, end, page = struct.unpack_from(e + word * 3, desc, 2 * size + i * 3 * size)
        path = names[i].decode(errors="replace") if i < len(names) else "?"
        core.mappings.append(Mapping(start, end, page * page_size, path))
