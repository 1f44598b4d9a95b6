"""The analysis of one core, as run inside the sandboxed worker process.

``python -m corevault.analysis.worker CORE --store DIR [--backend drgn|gdb]`` prints one
JSON document: the report, or ``{"error": "..."}`` when the core is unreadable
(``--list-keys``: only the keys the core claims). It parses untrusted input, so
:mod:`corevault.analysis.runner` starts it sandboxed, with a timeout and a memory cap, and
never imports it into a long-lived process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from corevault import objectid
from corevault.analysis import (
    binaries,
    deepstack,
    demangle,
    elfcore,
    goroutine,
    lastwords,
    signals,
    signature,
    symtab,
    unwind_drgn,
)
from corevault.model import MAX_REPORT_BYTES, Frame, Module, Report, Thread

BACKENDS = ("drgn", "gdb")
#: frames of the crashed thread unwound by drgn: a stack overflow's whole depth (gdb showed
#: 30,831 for an 8 MiB stack), of which the report keeps the top and the bottom
MAX_DEPTH = 1 << 16
#: characters of a function's or a source file's name kept in a report (the bound the ELF symbol
#: tables and the demangler read names within)
MAX_NAME = symtab.MAX_NAME
#: what the frames of a report may weigh in all (as JSON): the rest of the report (modules,
#: registers, warnings, last words) has the other half of :data:`MAX_REPORT_BYTES`
FRAMES_BUDGET = MAX_REPORT_BYTES // 2
#: the frames each thread that did not crash keeps, tried in turn until the report fits
_KEEP = (64, 16, 8, signature.DEPTH, 1)


def analyze(
    core_path: str,
    stores: list[str],
    backend: str = "drgn",
    max_frames: int = 256,
    *,
    system_debuginfo: bool = False,
    debug_dirs: tuple[str, ...] = binaries.DEBUG_DIRS,
    record: list[dict] | None = None,
) -> Report:
    """The report for one core; ``record`` is the crash's list of mapped objects, if it has one.

    Without ``system_debuginfo``, the separate DWARF of system libraries (libc, libstdc++,
    the loader…) is not loaded: indexing libc's debug info is most of the cost of a report
    (0.28 s of 0.31 s at 1001 threads, measured with bench/analysis.py), and the program's
    own frames keep their file:line either way. Their frames are named from the symbol
    table of the same debug file instead (:mod:`corevault.analysis.symtab`), so
    ``__pthread_kill_implementation`` or ``start_thread`` keep their names, not their lines.
    """
    core = elfcore.read(core_path)
    warnings = list(core.warnings)
    if core.truncated:
        warnings.append(f"the core is truncated: {core.size} of {core.expected_size} bytes")
    found, more = binaries.resolve(core, stores, record, debug_dirs)
    warnings += more
    dwarf = found
    if not system_debuginfo:
        dwarf = {
            path: dataclasses.replace(f, debuginfo=None) if signature.is_system(path) else f
            for path, f in found.items()
        }
    exe_path = core.executable
    exe_found = found.get(exe_path or "")
    executable = exe_found.executable if exe_found else None

    threads: list[Thread] = []
    debug: dict[str, bool] = {}
    used = backend
    if backend == "drgn":
        try:
            threads, debug, more = unwind_drgn.unwind(core, dwarf, max_frames, MAX_DEPTH)
            warnings += more
        except Exception as e:
            warnings.append(f"drgn failed ({type(e).__name__}: {e}); used gdb instead")
            used = "gdb"
    if used == "gdb":
        from corevault.analysis import unwind_gdb  # its imports (tempfile, subprocess) only for gdb

        threads, more = unwind_gdb.unwind(core, dwarf, executable, max_frames)
        warnings += more
    threads = _demangle(_name_from_symtabs(threads, core, found))
    files = {path: f.executable for path, f in found.items()}
    threads = goroutine.attribute(core, files, exe_path, threads, MAX_DEPTH)
    threads = deepstack.collapse(_bounded(threads), max_frames)
    threads, more = _within_budget(threads, FRAMES_BUDGET)
    warnings += more

    modules = []
    for obj in core.objects():
        where = found.get(obj.path)
        if where is None:
            continue
        bid = core.build_ids.get(obj.path)
        start, end = core.extent(obj.path)
        modules.append(
            Module(
                path=obj.path, start=start, end=end, build_id=bid, file=where.executable,
                debuginfo=debug.get(obj.path, False) or where.debuginfo is not None,
                key=where.key, sha256=where.sha256,
            )
        )  # fmt: skip
        if where.executable is None and not obj.path.startswith("[vdso"):
            claim = core.keys.get(obj.path)
            named = f"{objectid.kind(claim)} {claim}" if claim else "no build-id"
            warnings.append(
                f"missing: {obj.path} ({named}) is not in the binary store; its frames show as module+offset"
            )
    if core.is_snapshot:  # no thread crashed: each is shown alike
        threads = [dataclasses.replace(t, crashed=False) for t in threads]
    crashed = next((t for t in threads if t.crashed), None) or (threads[0] if threads else None)
    state = core.threads[0]
    pc = state.pc(core.machine)
    if core.is_snapshot:
        sig = signals.snapshot()
    else:
        sig = signals.describe(
            core.signal if core.signal is not None else state.signal,
            core.signal_code,
            core.fault_address,
            core.read_memory(pc, 1) if pc is not None else None,
            [f.function or "" for f in (crashed.frames if crashed else ())],
        )
    report = Report(
        signal=sig,
        crashed_tid=crashed.tid if crashed else state.tid,
        threads=tuple(threads),
        modules=tuple(modules),
        backend=used,
        core_size=core.size,
        truncated=core.truncated,
        pid=core.pid,
        exe=exe_path,
        args=core.args,
        registers=dict(state.registers),
        warnings=tuple(warnings),
    )
    sig_id, frames, title = signature.compute(report)
    words = lastwords.read(core, files, exe_path, report.crashed_thread)
    return dataclasses.replace(
        report, signature=sig_id, signature_frames=frames, title=title, last_words=words
    )


def _name_from_symtabs(
    threads: list[Thread], core: elfcore.Core, found: dict[str, binaries.Found]
) -> list[Thread]:
    """Name the frames the unwinder left unnamed from the ``.symtab`` of their module's files.

    The debug file's table first (a stripped library's local functions are only there),
    then the binary's own. A table is read only for a module that has an unnamed frame.
    """
    files = {}
    for path, where in found.items():
        files[path] = [p for p in dict.fromkeys((where.debuginfo, where.executable)) if p]
    tables: dict[str, list[symtab.Symbols]] = {}
    # A thousand threads waiting in one place share their unnamed frames: each is named once
    # (frames are frozen, so equal ones can be one object).
    renamed: dict[Frame, Frame] = {}

    def named(f: Frame) -> Frame:
        if f.function is not None or f.module is None or f.offset is None:
            return f
        known = renamed.get(f)
        if known is not None:
            return known
        if f.module not in tables:
            # a debug file's table holds the binary's symbols too: the binary's is read only without one
            readable = (t for p in files.get(f.module, ()) if (t := symtab.read(p)) is not None)
            tables[f.module] = [table] if (table := next(readable, None)) is not None else []
        # A caller's pc is a return address, which may lie just past a call at a function's end.
        offset = f.offset - 1 if f.index else f.offset
        name = next((n for t in tables[f.module] if (n := t.name_at(offset)) is not None), None)
        if name is None and offset != f.offset:
            # a signal frame's "return address" is the entry of the signal trampoline itself
            name = next((n for t in tables[f.module] if (n := t.name_at(f.offset)) is not None), None)
        renamed[f] = f if name is None else dataclasses.replace(f, function=name)
        return renamed[f]

    out = []
    for t in threads:
        frames = tuple(named(f) for f in t.frames)
        out.append(t if frames == t.frames else Thread(t.tid, t.crashed, frames, t.incomplete))
    return out


def _demangle(threads: list[Thread]) -> list[Thread]:
    """Frames named from ELF symbols rather than DWARF carry linker names: make them readable."""
    table = demangle.demangle_all(f.function for t in threads for f in t.frames if f.function)

    def frames(t: Thread) -> tuple[Frame, ...]:
        named = [(f, demangle.readable(f.function, table)) for f in t.frames]
        return tuple(f if name == f.function else dataclasses.replace(f, function=name) for f, name in named)

    return [dataclasses.replace(t, frames=frames(t)) for t in threads]


def _cut(name: str | None) -> str | None:
    return name if name is None or len(name) <= MAX_NAME else name[:MAX_NAME] + "…"


def _bounded(threads: list[Thread]) -> list[Thread]:
    """Every frame's function and file name cut to :data:`MAX_NAME` characters.

    A binary names its functions and source files as it likes (an assembler name of 1 MiB
    links, and drgn and gdb name a frame by it), and each name goes into the report, the
    crash's title, its group, alerts and every reader's page and terminal: one crash made a
    3 MiB report and a 1 MiB title before this bound.
    """
    if all(
        len(f.function or "") <= MAX_NAME and len(f.file or "") <= MAX_NAME for t in threads for f in t.frames
    ):
        return threads

    def frames(t: Thread) -> tuple[Frame, ...]:
        return tuple(dataclasses.replace(f, function=_cut(f.function), file=_cut(f.file)) for f in t.frames)

    return [dataclasses.replace(t, frames=frames(t)) for t in threads]


def _within_budget(threads: list[Thread], budget: int) -> tuple[list[Thread], list[str]]:
    """``threads`` whose frames weigh at most ``budget`` bytes of JSON, and the warning that says
    what was left out.

    A process decides how many threads it has and how deep and how long-named their stacks
    are: 64 threads waiting 240 calls deep in a function of a 4,000-character name made a
    64 MiB report. The crashed thread keeps its frames; every other thread keeps its top 64
    frames, else 16, 8, 3 (what a snapshot's signature reads) or 1, the most that fit; past
    that, the last threads are left out.
    """
    sizes: dict[str, int] = {}

    def size(text: str | None) -> int:
        return 0 if not text else sizes.get(text) or sizes.setdefault(text, len(json.dumps(text)))

    frames = [[160 + size(f.function) + size(f.file) + size(f.module) for f in t.frames] for t in threads]
    runs = [sum(40 + size(r.function) for r in t.omitted) for t in threads]

    def cost(i: int, keep: int) -> int:
        """Thread ``i``'s weight with its top ``keep`` frames (and its runs if none is cut)."""
        return sum(frames[i][:keep]) + (runs[i] if len(frames[i]) <= keep else 0)

    whole = max(map(len, frames), default=0)
    if sum(cost(i, whole) for i in range(len(threads))) <= budget:
        return threads, []
    crashed = next((i for i, t in enumerate(threads) if t.crashed), None)
    fixed = cost(crashed, whole) if crashed is not None else 0
    others = [i for i in range(len(threads)) if i != crashed]
    keep = next((k for k in _KEEP if fixed + sum(cost(i, k) for i in others) <= budget), 1)
    left, spent, out = 0, fixed, []
    for i, t in enumerate(threads):
        if i == crashed or len(t.frames) <= keep:
            kept = t
        else:
            kept = dataclasses.replace(t, frames=t.frames[:keep], incomplete=True, omitted=(), omitted_at=0)
        if i != crashed:
            spent += cost(i, keep)
            if spent > budget:
                left += 1
                continue
        out.append(kept)
    said = (
        f"the report's bound ({budget >> 20} MiB of frames): "
        f"the threads that did not crash keep their top {keep} frames"
    )
    return out, [said + (f", and {left} threads are left out" if left else "")]


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("DEBUGINFOD_URLS", None)  # gdb and drgn fetch nothing: the runner does
    ap = argparse.ArgumentParser(prog="corevault.analysis.worker")
    ap.add_argument("core")
    ap.add_argument("--store", action="append", default=[])
    ap.add_argument("--backend", choices=BACKENDS, default="drgn")
    ap.add_argument("--max-frames", type=int, default=256)
    ap.add_argument("--system-debuginfo", action="store_true")
    ap.add_argument("--debug-dirs", default=os.pathsep.join(binaries.DEBUG_DIRS), help="colon-separated")
    ap.add_argument("--list-keys", action="store_true", help="only the keys (build-ids) the core claims")
    ap.add_argument("--record", help="JSON file: the crash's mapped objects (meta.json's modules)")
    a = ap.parse_args(argv)
    debug_dirs = tuple(d for d in a.debug_dirs.split(os.pathsep) if d)
    record = None
    if a.record:
        with open(a.record, "rb") as f:
            loaded = json.load(f)
        record = [m for m in loaded if isinstance(m, dict)] if isinstance(loaded, list) else None
    try:
        if a.list_keys:
            doc = {"keys": sorted(set(elfcore.read(a.core).keys.values()))}
        else:
            doc = analyze(
                a.core,
                a.store,
                a.backend,
                a.max_frames,
                system_debuginfo=a.system_debuginfo,
                debug_dirs=debug_dirs,
                record=record,
            ).to_dict()
    except elfcore.CoreError as e:
        doc = {"error": f"unreadable: {e}"}
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
