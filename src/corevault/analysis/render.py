"""A report for people, in the spirit of ``coredumpctl info``.

Every line is made printable (:mod:`corevault.printable`): names come from the crashed process.
A line break inside a value (a symbol name, a path, an argument) is escaped like any other
control character, so no value can start a line of its own and pass for a frame, a module
or a warning; only the last words a process left keep their lines, each indented.
"""

from __future__ import annotations

import os

from corevault import printable
from corevault.model import Frame, Report, Run, Thread

MAX_OTHER_FRAMES = 8


def frame_line(f: Frame) -> str:
    where = f"{f.file}:{f.line}" if f.file and f.line else ""
    name = f.function or "??"
    module = f" ({os.path.basename(f.module)}+0x{f.offset:x})" if f.module and f.offset is not None else ""
    inline = " [inlined]" if f.inline else ""
    return f"#{f.index:<3} 0x{f.pc:016x} {name}{inline}" + (f" at {where}" if where else module)


def run_line(r: Run) -> str:
    """A run of frames a deep stack's report leaves out: ``… recurse x 30,585``."""
    return f"… {r.function} x {r.count:,}" if r.function else f"… {r.count:,} frames of several functions"


def stack_lines(t: Thread) -> list[str]:
    """A thread's frames, the runs a deep stack leaves out shown where they were."""
    if not t.omitted:
        return [frame_line(f) for f in t.frames]
    top = [frame_line(f) for f in t.frames[: t.omitted_at]]
    return top + [run_line(r) for r in t.omitted] + [frame_line(f) for f in t.frames[t.omitted_at :]]


def text(report: Report, all_threads: bool = True) -> str:
    s = report.signal
    lines = [
        f"       Title: {report.title or '?'}",
        f"   Signature: {report.signature or '?'}",
        f"      Signal: {s.number} ({s.name or '?'})"
        + (f", code {s.code} ({s.code_name})" if s.code_name else "")
        if s.number
        else "      Signal: none: a snapshot of a live process",
    ]
    if s.description and s.number:
        lines.append(f"        What: {s.description}")
    if s.fault_address is not None:
        lines.append(f"       Fault: address 0x{s.fault_address:x}")
    if report.last_words:
        first, *more = report.last_words.split("\n")
        lines.append(f"  Last words: {first}")
        lines += ["              " + line for line in more]
    lines += [
        f"  Executable: {report.exe or '?'}",
        f"Command line: {report.args or '?'}",
        f"         PID: {report.pid}"
        + (f"    crashed thread: {report.crashed_tid}" if s.number else "")
        + f"    threads: {len(report.threads)}",
        f"        Core: {report.core_size} bytes" + ("  (TRUNCATED)" if report.truncated else ""),
        f"    Analysed: by {report.backend}",
        "",
    ]
    crashed = report.crashed_thread
    if crashed is not None:
        deep = f", {crashed.depth:,} frames deep" if crashed.omitted else ""
        lines.append(f"Stack trace of thread {crashed.tid} (crashed{deep}):")
        lines += ["  " + line for line in stack_lines(crashed)]
        if crashed.incomplete:
            lines.append("  … (more frames not shown)")
    if all_threads:
        for t in report.threads:
            if t.crashed:
                continue
            if lines[-1]:
                lines.append("")
            lines.append(f"Stack trace of thread {t.tid}:")
            lines += ["  " + frame_line(f) for f in t.frames[:MAX_OTHER_FRAMES]]
            if len(t.frames) > MAX_OTHER_FRAMES or t.incomplete:
                lines.append("  …")
    lines += ["", "Modules:"]
    for m in report.modules:
        state = "debug info" if m.debuginfo else ("symbols only" if m.found else "MISSING")
        lines.append(f"  0x{m.start:x} {m.path}  build-id {m.build_id}  [{state}]")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    # Symbol names, paths and arguments are the crashed process's: shown, never obeyed,
    # and each stays on its line.
    return "\n".join(printable.printable(line) for line in lines)
