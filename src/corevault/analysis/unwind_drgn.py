"""The primary unwinder: drgn, in-process, over the core and the binaries found by build-id.

drgn's own debug-info finders are turned off, so it sees only the files handed to it here
(the build-id store and the host's build-id keyed debug tree); ``Module.try_file`` refuses
a file whose build-id differs from the module's. Every thread is unwound, inline frames
included, with file:line where debug info exists and ELF symbols where it does not.
"""

from __future__ import annotations

import dataclasses
import os

from corevault.analysis.binaries import Found
from corevault.analysis.elfcore import Core
from corevault.model import Frame, Thread


def unwind(
    core: Core, found: dict[str, Found], max_frames: int
) -> tuple[list[Thread], dict[str, bool], list[str]]:
    """``(threads, debug info loaded per module path, warnings)``."""
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
        bid = module.build_id.hex() if module.build_id else None
        where = found.get(bid) if bid else None
        if where is None:
            continue
        for path in dict.fromkeys(p for p in (where.executable, where.debuginfo) if p):
            try:
                module.try_file(path)
            except Exception as e:  # drgn reports unusable files with several error types
                warnings.append(f"{module.name}: drgn could not use {path}: {e}")
        debug[module.name] = module.debug_file_status == drgn.ModuleFileStatus.HAVE
    crashed = _crashed_tid(prog)
    threads = []
    # Threads of one program share most of their frames (a thousand workers waiting in the
    # same place): what a pc resolves to is looked up once. Inline frames share a pc, so
    # the key includes the frame's place in that pc's inline chain.
    seen: dict[tuple[int, int], Frame] = {}
    for t in prog.threads():
        frames: list[Frame] = []
        incomplete = False
        try:
            trace = t.stack_trace()
        except Exception as e:
            warnings.append(f"thread {t.tid}: cannot unwind: {e}")
            trace = []
        chain = (0, 0)
        for index, f in enumerate(trace):
            if index >= max_frames:
                incomplete = True
                break
            try:
                pc = f.pc
            except LookupError:  # the outermost frame's pc is often unknown
                break
            chain = (pc, chain[1] + 1 if chain[0] == pc else 0)
            known = seen.get(chain)
            if known is None:
                known = seen[chain] = _frame(core, f, 0, pc)
            frames.append(dataclasses.replace(known, index=index))
        threads.append(
            Thread(tid=t.tid, crashed=t.tid == crashed, frames=tuple(frames), incomplete=incomplete)
        )
    threads.sort(key=lambda t: (not t.crashed, t.tid))
    return threads, debug, warnings


def _crashed_tid(prog: object) -> int | None:
    try:
        return prog.crashed_thread().tid  # type: ignore[attr-defined]
    except Exception:
        return None


def _frame(core: Core, f: object, index: int, pc: int) -> Frame:
    name = f.function_name or f.name  # type: ignore[attr-defined]
    if name is None or name.startswith("0x"):  # drgn names an unknown function by its address
        try:
            name = f.symbol().name  # type: ignore[attr-defined]
        except LookupError:
            name = None
    try:
        file, line, column = f.source()  # type: ignore[attr-defined]
    except LookupError:
        file = line = column = None
    module, offset = core.module_at(pc)
    return Frame(
        index=index, pc=pc, function=name, file=file, line=line or None, column=column or None,
        inline=bool(f.is_inline), module=module, offset=offset,  # type: ignore[attr-defined]
    )  # fmt: skip
