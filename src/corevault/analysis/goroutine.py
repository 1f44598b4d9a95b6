"""A Go crash on a thread's system stack, attributed to the goroutine that thread was running.

Go's runtime throws its fatal errors (a goroutine's stack overflow, concurrent map writes,
running out of memory) on the thread's system stack, g0, which it enters from the
goroutine's stack through ``runtime.morestack``, ``runtime.systemstack`` or
``runtime.mcall``. The CFI of those switches does not lead back to the goroutine, so an
unwinder stops there or wanders into stale memory, and the program's own frames are lost:
every such crash of a binary would share one signature made of runtime frames.

The goroutine is found as Go's own traceback finds it: the thread's ``g`` at ``%fs:-8`` is
``m.g0`` (the thread is on its system stack), and ``m.curg`` is the goroutine, the one ``g``
in ``m`` that is neither ``g0`` nor ``gsignal`` and whose ``m`` is this ``m``. When it
left its stack, the runtime saved its ``pc``, ``sp`` and frame pointer in ``g.sched``;
its frames are that ``pc``, the return address at ``sp`` (morestack and systemstack are
entered before the caller sets up a frame), and then the frame-pointer chain, which Go
keeps on amd64. Every frame pointer must lie in the goroutine's stack and grow, every pc
must be inside a function of the executable. The frames after the stack switch are
replaced by the goroutine's.

Offsets are Go 1.17+ on linux/amd64 (``g.m`` +48, ``g.sched`` +56 as ``{sp, pc, g, ctxt,
ret, lr, bp}``, ``m.gsignal`` +80); a wrong one fails the checks and changes nothing.
"""

from __future__ import annotations

import dataclasses

from corevault.analysis import signature, symtab
from corevault.analysis.elfcore import Core
from corevault.analysis.procmem import Memory, images
from corevault.model import Frame, Thread

SWITCHES = frozenset({"runtime.morestack", "runtime.systemstack", "runtime.mcall"})
M_SCAN = 512  # bytes of runtime.m searched for curg


def _curg(mem: Memory, g: int) -> int | None:
    m = mem.word(g + 48)
    if not m or mem.word(m) != g:  # not on this thread's g0: no switch to undo
        return None
    gsignal = mem.word(m + 80)
    for off in range(8, M_SCAN, 8):
        p = mem.word(m + off)
        if p and p not in (g, gsignal) and mem.word(p + 48) == m:
            return p
    return None


def _goroutine_pcs(mem: Memory, curg: int, functions: symtab.Symbols, limit: int) -> tuple[list[int], bool]:
    lo, hi = mem.word(curg), mem.word(curg + 8)
    sp, pc, bp = mem.word(curg + 56), mem.word(curg + 64), mem.word(curg + 104)
    if lo is None or hi is None or sp is None or pc is None or not lo <= sp < hi or hi - lo > 1 << 30:
        return [], False
    pcs = [pc, mem.word(sp) or 0]
    while bp and lo <= bp < hi and len(pcs) < limit + 1:
        ret, up = mem.word(bp + 8), mem.word(bp)
        if ret is None or up is None:
            break
        pcs.append(ret)
        if up <= bp:
            break
        bp = up
    good = []
    for p in pcs:
        _, offset = mem.core.module_at(p)
        if offset is None or functions.name_at(offset if not good else offset - 1) is None:
            break  # not code of the executable (a return address is just past its call)
        good.append(p)
    return good[:limit], len(good) > limit or len(pcs) > limit


def attribute(
    core: Core, files: dict[str, str | None], exe_path: str | None, threads: list[Thread], max_frames: int
) -> list[Thread]:
    """``threads`` with the crashed one's frames past a Go stack switch replaced by its goroutine's."""
    crashed = next((t for t in threads if t.crashed), None)
    if crashed is None or core.machine != "x86_64" or exe_path is None or not files.get(exe_path):
        return threads
    names = [f.function for f in crashed.frames]
    cut = next((i for i, n in enumerate(names) if n and n.removesuffix(".abi0") in SWITCHES), None)
    if cut is None or any(signature.in_app(f) for f in crashed.frames[:cut]):
        return threads
    state = next((t for t in core.threads if t.tid == crashed.tid), None)
    fs_base = state.registers.get("fs_base") if state else None
    mem = Memory(core, images(core, {exe_path: files[exe_path]}))
    g = mem.word(fs_base - 8) if fs_base else None
    curg = _curg(mem, g) if g else None
    if curg is None:
        return threads
    functions = symtab.read(files[exe_path] or "")
    if functions is None:
        return threads
    pcs, incomplete = _goroutine_pcs(mem, curg, functions, max_frames - cut - 1)
    if not pcs:
        return threads
    kept = list(crashed.frames[: cut + 1])
    for i, pc in enumerate(pcs):
        module, offset = core.module_at(pc)
        name = functions.name_at(offset if i == 0 else offset - 1) if offset is not None else None
        kept.append(Frame(index=len(kept), pc=pc, function=name, module=module, offset=offset))
    replaced = dataclasses.replace(crashed, frames=tuple(kept), incomplete=incomplete)
    return [replaced if t is crashed else t for t in threads]
