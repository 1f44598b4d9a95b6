"""A thread's frames from drgn, past the places where drgn's unwinder stops (linux/amd64).

drgn unwinds one stack trace of at most 1,024 frames, and it cannot cross two frames of
Go's runtime. Each of these is continued the same way: a new drgn trace from a ``struct
pt_regs`` made of the registers where the last one stopped (its first frame is then
unwound as an interrupted one, at its exact pc).

**Deep stacks.** A stack overflow is tens of thousands of frames (gdb showed 30,831 for
the corpus's C recursion); drgn stops at 1,024 without saying so. When a trace ends at
exactly that many frames, the walk goes on from the registers drgn recovered for its last
frame, which is not shown twice. A return address's CFI is then looked up at the address
itself rather than the call before it, which is the same row of the table unless the call
was a function's last instruction.

**Go's signal frames.** A Go program that faults dies through its runtime's signal path,
and two frames on that path have no CFI that leads on. Go's own traceback
(``runtime/traceback.go``) and delve treat both specially; so does this module:

1. ``runtime.sigreturn`` (the restorer the kernel's signal frame returns into). glibc's
   ``__restore_rt`` carries CFI marking a signal frame; Go's has none, so drgn falls back to
   frame pointers, which lead back into frames already shown (a thread seemed to recurse
   through ``sigtrampgo``). Where the restorer's frame starts, the kernel's ``rt_sigframe``
   holds the interrupted state: the ``ucontext`` (``uc_flags``, ``uc_link``, ``uc_stack``,
   then ``uc_mcontext``: r8…r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip). Unwinding goes
   on from those registers as from an interrupted frame.
2. ``runtime.sigpanic``. On a fault in Go code (a nil pointer), the runtime's signal handler
   makes the goroutine call ``sigpanic`` as though the faulting instruction had called it: it
   pushes the faulting pc as a return address. An unwinder looks a return address's CFI up at
   pc - 1, which for a fault at a function's first instruction (a nil receiver's first load)
   is the end of the function before, and went round in circles (``main.sessionUser`` three
   times, its caller never shown). Go's traceback does not back that pc up; here the frame
   after ``sigpanic`` is unwound again as an interrupted one, at its exact pc.

A goroutine's stack ends at ``runtime.goexit``: what lies past it is not frames. The
caller bounds the whole walk (:func:`frames` is lazy), and Go's restarts are capped, so a
forged signal frame that points back at itself costs no more than a deep stack.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

# struct pt_regs on x86_64, the layout drgn reads initial registers from
PT_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "rflags", "rsp", "ss",
)  # fmt: skip
# struct sigcontext (uc_mcontext) up to rip, after the 40 bytes of uc_flags, uc_link and uc_stack
MCONTEXT = (
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx",
    "rsp", "rip",
)  # fmt: skip
UC_MCONTEXT = 40
MAX_RESTARTS = 8
OUTERMOST = "runtime.goexit"


DRGN_LIMIT = 1024  # frames in one drgn stack trace (libdrgn's stack_trace.c)


def frames(prog: Any, thread: Any, go: bool) -> Iterator[Any]:
    """The drgn frames of ``thread``, lazily, across drgn's frame limit and, for a Go
    program (:func:`is_go`), Go's signal frames."""
    import drgn

    trace = thread.stack_trace()
    if prog.platform.arch != drgn.Architecture.X86_64:
        yield from trace
        return
    restarts = 0
    skip = 0
    while True:
        regs = None
        for i, f in enumerate(trace):
            if i < skip:
                continue
            yield f
            if not go:
                continue
            # the restorer first: its "return address" is its own first instruction, so the
            # symbol before it (whatever the linker put there) names it at pc - 1
            restorer = _is_restorer(prog, f)
            name = None if restorer else _name(f)
            if name is not None and name.removesuffix(".abi0") == OUTERMOST:
                return
            if restarts >= MAX_RESTARTS:
                continue
            if restorer:
                regs = _signal_context(prog, f)
            elif name == "runtime.sigpanic" and not f.is_inline and i + 1 < len(trace):
                regs = _known(trace[i + 1])
            if regs is not None:
                restarts += 1
                skip = 0
                break
        else:
            # drgn stopped at its limit, not at the stack's end: go on from the last frame
            if len(trace) < DRGN_LIMIT:
                return
            regs, skip = _known(trace[len(trace) - 1]), 1
        if regs is None:
            return
        try:
            trace = prog.stack_trace(_pt_regs(prog, regs))
        except (LookupError, ValueError, drgn.FaultError):
            return


def is_go(prog: Any) -> bool:
    """Whether the program has Go's runtime (asked once per program: 0.1 ms a lookup)."""
    try:
        prog.symbol(OUTERMOST)
    except LookupError:
        try:
            prog.symbol(OUTERMOST + ".abi0")
        except LookupError:
            return False
    return True


def _name(f: Any) -> str | None:
    name = f.function_name
    if name is None:  # no DWARF (a binary built with -ldflags=-w): its symbol table
        try:
            name = f.symbol().name
        except LookupError:
            return None
    return name


def _is_restorer(prog: Any, f: Any) -> bool:
    """Whether ``f`` is the signal frame's return into ``runtime.sigreturn``: the kernel made
    its first instruction the "return address", so it is looked up at the pc itself, not
    at pc - 1 as a caller's frame is (which is the end of the function before)."""
    if f.function_name is not None:
        return False  # the restorer is assembly without a DWARF function
    try:
        return bool(prog.symbol(f.pc).name.startswith("runtime.sigreturn"))
    except LookupError:
        return False


def _known(f: Any) -> dict[str, int] | None:
    """The registers drgn recovered for frame ``f`` (pc, sp and frame pointer at least)."""
    regs = dict(f.registers())
    if "rip" not in regs or "rsp" not in regs:
        return None
    return regs


def _signal_context(prog: Any, f: Any) -> dict[str, int] | None:
    """The registers the kernel saved in the signal frame the restorer ``f`` returns from."""
    import drgn

    try:
        raw = prog.read(f.sp + UC_MCONTEXT, 8 * len(MCONTEXT))
    except (drgn.FaultError, ValueError, LookupError):
        return None
    return dict(zip(MCONTEXT, struct.unpack(f"<{len(MCONTEXT)}Q", raw), strict=True))


_types: dict[int, Any] = {}


def _pt_regs(prog: Any, regs: dict[str, int]) -> Any:
    import drgn

    kind = _types.get(id(prog))
    if kind is None or kind.prog is not prog:  # made once per program (7 ms each)
        word = prog.int_type("unsigned long", 8, False)
        members = [drgn.TypeMember(word, name, 64 * i) for i, name in enumerate(PT_REGS)]
        kind = _types[id(prog)] = prog.struct_type("pt_regs", 8 * len(PT_REGS), members)
    raw = struct.pack(f"<{len(PT_REGS)}Q", *(regs.get(name, 0) & (1 << 64) - 1 for name in PT_REGS))
    return drgn.Object.from_bytes_(prog, kind, raw)
