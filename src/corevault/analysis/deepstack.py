"""A stack too deep to show whole: its top and bottom kept, the middle counted in runs.

A stack overflow is one function (or a few) repeated tens of thousands of times: gdb
printed 30,831 frames for the corpus's C recursion, and a user reads the top (where it
died), the bottom (how it got there: ``main``, the thread's entry) and how often the
middle repeats. So in a thread of more than ``keep`` frames, the longest run of one
function is left out but for its first and last :data:`EDGE` frames (``recurse x 30,833``
between them); when what is left is still more than ``keep`` frames, the thread keeps its
first ``keep // 2`` and last ``keep - keep // 2`` frames instead, and the frames between
become runs. Frames keep their own index. The signature reads the top, as for any crash.

Runs are bounded (:data:`MAX_RUNS`): past that many, the remaining frames are one run of
no single function, so a hostile stack of alternating functions costs a bounded report.
"""

from __future__ import annotations

import dataclasses

from corevault.model import Run, Thread

MAX_RUNS = 16
EDGE = 3  # frames of a collapsed run shown on either side of it


def runs(names: list[str | None]) -> tuple[Run, ...]:
    """``names`` run-length encoded, at most :data:`MAX_RUNS` runs."""
    out: list[Run] = []
    for i, name in enumerate(names):
        if out and out[-1].function == name:
            out[-1] = Run(name, out[-1].count + 1)
        elif len(out) == MAX_RUNS - 1:
            out.append(Run(None, len(names) - i))
            break
        else:
            out.append(Run(name, 1))
    return tuple(out)


def _longest_run(names: list[str | None]) -> tuple[int, int]:
    """``(start, end)`` of the longest run of one named function in ``names``."""
    best = (0, 0)
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            if names[start] is not None and i - start > best[1] - best[0]:
                best = (start, i)
            start = i
    return best


def collapse(threads: list[Thread], keep: int) -> list[Thread]:
    """``threads`` with each stack of more than ``keep`` frames cut as described above."""
    out = []
    for t in threads:
        if len(t.frames) <= keep or keep < 2 * EDGE + 2:
            out.append(t)
            continue
        names = [f.function for f in t.frames]
        start, end = _longest_run(names)
        start, end = start + EDGE, end - EDGE
        if end - start < 1 or len(names) - (end - start) > keep:
            start, end = keep // 2, len(names) - (keep - keep // 2)
        frames = t.frames[:start] + t.frames[end:]
        out.append(dataclasses.replace(t, frames=frames, omitted=runs(names[start:end]), omitted_at=start))
    return out
