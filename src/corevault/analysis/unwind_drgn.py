"""The primary unwinder: drgn, in-process, over the core and the binaries found for it.

drgn's own debug-info finders are turned off, so it sees only the files handed to it here
(:mod:`.binaries`: the crash's own stored objects and the host's build-id keyed debug tree);
``Module.try_file`` refuses a file whose build-id differs from the module's. Every thread
is unwound, inline frames included, with file:line where debug info exists and ELF
symbols where it does not; Go's signal frames are crossed by :mod:`.stackwalk`. Where
drgn finds no function in the DWARF at a pc (a language it does not read, such as Rust),
the inline chain is read from that DWARF by :mod:`corevault.analysis.inlines`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

from corevault.analysis import inlines, stackwalk
from corevault.analysis.binaries import Found
from corevault.analysis.elfcore import Core
from corevault.model import Frame, Thread


def unwind(
    core: Core, found: dict[str, Found], max_frames: int, crashed_depth: int | None = None
) -> tuple[list[Thread], dict[str, bool], list[str]]:
    """``(threads, debug info loaded per module path, warnings)``; ``found`` is by object path.

    Each stack is unwound to at most ``max_frames`` frames, the crashed thread's to
    ``crashed_depth`` (a stack overflow's whole depth; :func:`.deepstack.collapse` then
    keeps what a report shows of it). Other threads keep the smaller bound, so a process
    of many deep threads costs no more than one.
    """
    # No drgn plugins: they would be found through entry points (0.15 s per core) and run
    # third-party code inside the analysis of an untrusted core.
    os.environ["DRGN_DISABLE_PLUGINS"] = "*"
    os.environ.pop("DRGN_PLUGINS", None)
    import drgn

    prog = drgn.Program()
    prog.set_core_dump(core.path)
    prog.set_enabled_debug_info_finders([])
    warnings: list[str] = []
    debug: dict[str, bool] = {}
    for module, _ in prog.loaded_modules():
        where = _where(core, found, module)
        if where is None:
            continue
        # drgn checks a file against the module's GNU build-id; an object without one (Go,
        # or no notes at all) was matched by its key or the crash's record instead.
        force = module.build_id is None
        for path in dict.fromkeys(p for p in (where.executable, where.debuginfo) if p):
            try:
                module.try_file(path, force=force)
            except Exception as e:  # drgn reports unusable files with several error types
                warnings.append(f"{module.name}: drgn could not use {path}: {e}")
        debug[module.name] = module.debug_file_status == drgn.ModuleFileStatus.HAVE
    crashed = _crashed_tid(prog)
    go = stackwalk.is_go(prog)
    scopes = _Scopes(prog, core, found)
    threads = []
    # Threads of one program share most of their frames (a thousand workers waiting in the
    # same place): what a pc resolves to is looked up once. Inline frames share a pc, so
    # the key includes the frame's place in that pc's inline chain.
    seen: dict[tuple[int, int], Frame] = {}
    at_index: dict[tuple[tuple[int, int], int], Frame] = {}
    for t in prog.threads():
        frames: list[Frame] = []
        incomplete = False
        limit = max(max_frames, crashed_depth or 0) if t.tid == crashed else max_frames
        try:
            trace = list(itertools.islice(stackwalk.frames(prog, t, go), limit + 1))
        except Exception as e:
            warnings.append(f"thread {t.tid}: cannot unwind: {e}")
            trace = []
        chain = (0, 0)
        inline = False
        for index, f in enumerate(trace):
            if index >= limit:
                incomplete = True
                break
            try:
                pc = f.pc
            except LookupError:  # the outermost frame's pc is often unknown
                break
            # the frames of one pc's inline chain follow an inline one; a recursion's do not
            chain = (pc, chain[1] + 1 if inline and chain[0] == pc else 0)
            inline = f.is_inline
            known = seen.get(chain)
            if known is None:
                known = seen[chain] = _frame(core, f, 0, pc)
                scopes.want(known, f)
            placed = at_index.get((chain, index))
            if placed is None:  # frozen frames: threads waiting in one place share the objects
                placed = at_index[chain, index] = _placed(known, index)
            frames.append(placed)
        threads.append(
            Thread(tid=t.tid, crashed=t.tid == crashed, frames=tuple(frames), incomplete=incomplete)
        )
    threads = scopes.expand(threads, max(max_frames, crashed_depth or 0))
    threads.sort(key=lambda t: (not t.crashed, t.tid))
    return threads, debug, warnings


class _Scopes:
    """Inline chains from DWARF for the frames drgn found no DWARF function for."""

    def __init__(self, prog: object, core: Core, found: dict[str, Found]) -> None:
        self._prog = prog
        self._core = core
        self._found = found
        #: pc -> (debug file, file address to ask about)
        self._wanted: dict[int, tuple[str, int]] = {}

    def want(self, frame: Frame, f: object) -> None:
        """Note ``frame`` for :meth:`expand` if drgn could not read its function's DWARF."""
        if f.function_name is not None or frame.file is None or frame.pc in self._wanted:  # type: ignore[attr-defined]
            return  # drgn read this DWARF itself (or there is none)
        try:
            module = self._prog.module(frame.pc)  # type: ignore[attr-defined]
        except LookupError:
            return
        where = _where(self._core, self._found, module)
        bias = module.debug_file_bias
        if where is not None and where.debuginfo is not None and bias is not None:
            # a caller's pc is a return address, which may lie just past a call at a function's end
            self._wanted[frame.pc] = (where.debuginfo, frame.pc - bias - (0 if f.interrupted else 1))  # type: ignore[attr-defined]

    def expand(self, threads: list[Thread], max_frames: int) -> list[Thread]:
        """``threads`` with each wanted frame replaced by the chain of functions inlined at its pc."""
        if not self._wanted:
            return threads  # C and C++ only: drgn did it all
        by_file: dict[str, list[int]] = {}
        for path, address in self._wanted.values():
            by_file.setdefault(path, []).append(address)
        found = {path: inlines.chains(path, addresses) for path, addresses in by_file.items()}
        chains = {pc: found[path].get(address) for pc, (path, address) in self._wanted.items()}
        out = []
        for t in threads:
            frames: list[Frame] = []
            for frame in t.frames:
                chain = chains.get(frame.pc) if not frame.inline else None
                if not chain:
                    frames.append(dataclasses.replace(frame, index=len(frames)))
                    continue
                for k, scope in enumerate(chain):  # innermost first; drgn's column is the innermost's
                    frames.append(
                        dataclasses.replace(
                            frame, index=len(frames), function=scope.name, file=scope.file or frame.file,
                            line=scope.line, column=frame.column if k == 0 else None, inline=scope.inline,
                        )
                    )  # fmt: skip
            incomplete = t.incomplete or len(frames) > max_frames
            out.append(dataclasses.replace(t, frames=tuple(frames[:max_frames]), incomplete=incomplete))
        return out


def _placed(f: Frame, index: int) -> Frame:
    """``f`` at ``index`` (a stack overflow places tens of thousands: dataclasses.replace is slow)."""
    return Frame(index, f.pc, f.function, f.file, f.line, f.column, f.inline, f.module, f.offset)


def _where(core: Core, found: dict[str, Found], module: object) -> Found | None:
    """The files found for a drgn module, by where it is mapped: drgn names shared libraries
    as the loader's list does (``/lib/x86_64-linux-gnu/libc.so.6``), the core's file note as
    the kernel does (``/usr/lib/…`` in a merged-/usr image)."""
    try:
        start = module.address_range[0]  # type: ignore[attr-defined]
    except (TypeError, ValueError, LookupError):
        return found.get(module.name)  # type: ignore[attr-defined]
    path, _ = core.module_at(start)
    return found.get(path or "") or found.get(module.name)  # type: ignore[attr-defined]


def _crashed_tid(prog: object) -> int | None:
    try:
        return prog.crashed_thread().tid  # type: ignore[attr-defined]
    except Exception:
        return None


def _frame(core: Core, f: object, index: int, pc: int) -> Frame:
    # drgn decodes names as strict UTF-8, and a binary's names are whatever bytes it holds: one
    # that is not UTF-8 is left to the symbol table reader, which replaces what is not
    # (corevault.analysis.symtab); it ended the whole unwind before
    try:
        name = f.function_name or f.name  # type: ignore[attr-defined]
    except UnicodeDecodeError:
        name = None
    if name is None or name.startswith("0x"):  # drgn names an unknown function by its address
        try:
            name = f.symbol().name  # type: ignore[attr-defined]
        except (LookupError, UnicodeDecodeError):
            name = None
    try:
        file, line, column = f.source()  # type: ignore[attr-defined]
    except (LookupError, UnicodeDecodeError):
        file = line = column = None
    module, offset = core.module_at(pc)
    return Frame(
        index=index, pc=pc, function=name, file=file, line=line or None, column=column or None,
        inline=bool(f.is_inline), module=module, offset=offset,  # type: ignore[attr-defined]
    )  # fmt: skip
