"""Runs inside gdb (``gdb -x``), not in corevault: every thread's frames as JSON.

gdb is started by :mod:`corevault.analysis.unwind_gdb` with ``-nx``, auto-load off and
debuginfod off, a private sysroot holding only build-id-checked files, and the output
path and frame limit in the environment.
"""

import json
import os

import gdb  # type: ignore[import-not-found]

out = os.environ["COREVAULT_GDB_OUT"]
max_frames = int(os.environ.get("COREVAULT_MAX_FRAMES", "256"))


def text(obj, attribute):
    """``obj``'s ``attribute`` (called if a method), or None where it is a name that is not UTF-8
    (gdb's Python decodes strictly); the symbol table reader names that frame then, with what
    is not UTF-8 replaced."""
    try:
        value = getattr(obj, attribute)
        return value() if callable(value) else value
    except UnicodeDecodeError:
        return None


selected = gdb.selected_thread()
result = {"crashed": selected.ptid[1] if selected else None, "threads": []}
for thread in gdb.selected_inferior().threads():
    thread.switch()
    frames = []
    frame = gdb.newest_frame()
    while frame is not None and len(frames) < max_frames:
        sal = frame.find_sal()
        frames.append(
            {
                "pc": frame.pc(),
                "function": text(frame, "name"),
                "file": text(sal.symtab, "filename") if sal.symtab else None,
                "line": sal.line or None,
                "inline": frame.type() == gdb.INLINE_FRAME,
            }
        )
        try:
            frame = frame.older()
        except gdb.error:
            frame = None
    result["threads"].append({"tid": thread.ptid[1], "frames": frames, "incomplete": frame is not None})
with open(out, "w") as f:
    json.dump(result, f)
