"""What the first bytes of a core say: the signal and the crashing thread.

Through the coredump socket the kernel passes no ``%s`` or ``%i``: the server learns the
process from its pidfd, and on kernels before 6.19 the pidfd does not tell the signal. The
core itself does, early: its ELF header, program headers and PT_NOTE segment come before
any memory, and the first NT_PRSTATUS note is the crashing thread's (the kernel writes it
first), with its tid and signal. So the socket transport reads the core up to the end of
its notes into memory (bounded), learns those values, and only then opens the targets,
whose names may depend on them; the bytes read are written to the targets first.

The program headers also say how long the core is: the kernel writes every segment in
full (zero pages as zeros, into a pipe or a socket), so a stream that ends before the last
segment does was cut short by the kernel, which stops dumping when the process is killed
meanwhile. Both transports read the head for that reason.

The same note holds the crashing thread's registers: its program counter and stack pointer,
and where in the core the memory at the stack pointer will stream past, are what the
crash's :mod:`fingerprint <corevault.fingerprint>` is made of.
"""

from __future__ import annotations

import os
import struct

from corevault import elf
from corevault.fingerprint import STACK_BYTES

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Callable

NT_PRSTATUS = 1
PN_XNUM = 0xFFFF
NT_SIGINFO = 0x53494749
PT_LOAD = 1
_PRSTATUS_REGS = 112  # 64-bit elf_prstatus: siginfo, cursig, sigpend, sighold, pids, four timevals
#: e_machine: the indices of the program counter and the stack pointer in pr_reg
_PC_SP = {62: (16, 19), 183: (32, 31)}  # EM_X86_64 (rip, rsp), EM_AARCH64 (pc, sp)
#: the notes of a core with thousands of threads and mappings fit well within this
MAX_HEAD = 64 << 20


class Head:
    __slots__ = ("code", "data", "pc", "signal", "size", "stack", "tid")

    def __init__(self, data: bytes, signal: int | None, tid: int | None, size: int | None = None) -> None:
        #: every byte read so far, to be written to the targets before the rest of the stream
        self.data = data
        self.signal = signal
        self.tid = tid
        #: the size the program headers promise (the end of the last segment), or None
        self.size = size
        #: the signal's si_code, and the crashing thread's program counter
        self.code: int | None = None
        self.pc: int | None = None
        #: where in the core the memory at the crashing thread's stack pointer is, or None
        self.stack: int | None = None


def _read_until(fd: int, buf: bytearray, size: int, stalled: Callable[[], object] | None = None) -> None:
    while len(buf) < size:
        try:
            chunk = os.read(fd, min(size - len(buf), 1 << 20))
        except BlockingIOError:  # a socket's receive timeout: see read_head
            if stalled is None:
                raise
            stalled()
            continue
        if not chunk:
            return
        buf += chunk


def read_head(fd: int, stalled: Callable[[], object] | None = None) -> Head:
    """Read the core from ``fd`` through its notes; values it cannot find are None.

    With ``stalled``, a read that times out (a socket's ``SO_RCVTIMEO``) calls it and reads on.
    """
    buf = bytearray()
    _read_until(fd, buf, 64, stalled)
    if len(buf) < 64 or buf[:4] != b"\x7fELF" or buf[4] != 2 or buf[5] not in (1, 2):
        return Head(bytes(buf), None, None)  # not a 64-bit ELF core: stream it as it is
    e = "<" if buf[5] == 1 else ">"
    (phoff,) = struct.unpack_from(e + "Q", buf, 32)
    phentsize, phnum = struct.unpack_from(e + "HH", buf, 54)
    # Up to PN_XNUM (a process with more mappings keeps its count in a section header at the
    # end): a core's program headers are as many as its mappings, often more than elf.MAX_PHNUM.
    if not 0 < phnum < PN_XNUM or phentsize < 56 or phoff + phentsize * phnum > MAX_HEAD:
        return Head(bytes(buf), None, None)
    _read_until(fd, buf, phoff + phentsize * phnum, stalled)
    notes = None
    loads: list[tuple[int, int, int]] = []
    end = 0 if len(buf) >= phoff + phentsize * phnum else None
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(buf):
            break
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from(e + "IIQQQQ", buf, at)
        if end is not None:
            end = max(end, offset + filesz)
        if p_type == elf.PT_NOTE and notes is None:
            notes = (offset, filesz)
        elif p_type == PT_LOAD:
            loads.append((vaddr, offset, filesz))
    if notes is None or notes[0] + notes[1] > MAX_HEAD:
        return Head(bytes(buf), None, None, end)
    offset, size = notes
    _read_until(fd, buf, offset + size, stalled)
    signal = tid = code = pc = sp = None
    pc_sp = _PC_SP.get(struct.unpack_from(e + "H", buf, 18)[0])
    for name, ntype, desc in elf.parse_notes(bytes(buf[offset : offset + size]), e):
        if name != b"CORE\0":
            continue
        if ntype == NT_PRSTATUS and tid is None and len(desc) >= 36:
            # struct elf_prstatus: elf_siginfo (12), pr_cursig (2), pad, two sigsets (16), pr_pid
            cursig = struct.unpack_from(e + "h", desc, 12)[0]
            tid = struct.unpack_from(e + "i", desc, 32)[0]
            signal = signal or cursig or None
            if pc_sp is not None and len(desc) >= _PRSTATUS_REGS + 8 * (max(pc_sp) + 1):
                pc, sp = (struct.unpack_from(e + "Q", desc, _PRSTATUS_REGS + 8 * i)[0] for i in pc_sp)
        elif ntype == NT_SIGINFO and len(desc) >= 12:
            signal = struct.unpack_from(e + "i", desc, 0)[0] or signal
            code = struct.unpack_from(e + "i", desc, 8)[0]
    head = Head(bytes(buf), signal, tid, end)
    head.code, head.pc = code, pc
    if sp is not None:
        head.stack = next((o + sp - v for v, o, n in loads if v <= sp and sp + STACK_BYTES <= v + n), None)
    return head
