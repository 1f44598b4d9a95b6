"""State pruning benchmark: one pass over a state directory a churn of pods filled, bounded and not.

    python -m bench.stateprune [--files 200000] [--runs 5]

``--files`` dump-slot files nobody holds, all made now (young: none is removed, as with the files
of pods that still run), under a fresh state directory on the disk that holds the temporary
directory. Taking turns, each run times one pass of :class:`corevault.capture.stateprune.Pruner`
(at most ``SCAN_MAX`` entries looked at) and one look at every entry (``lstat`` each: what a pass
cost before it was bounded). Printed: the medians of ``--runs`` wall-clock times and their ratio
(goal <= 2 * SCAN_MAX / files: a pass costs what it looks at, not what the directory holds, give
or take its fixed cost). No root needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from corevault.capture import policy, stateprune


def _look_at_all(directory: str) -> int:
    seen = 0
    with os.scandir(directory) as entries:
        for e in entries:
            e.stat(follow_symlinks=False)
            seen += 1
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    state = tempfile.mkdtemp(prefix="cv-bench-stateprune-")
    try:
        dumps = os.path.join(state, policy.DUMPS)
        os.makedirs(dumps)
        for i in range(a.files):
            os.close(os.open(os.path.join(dumps, f"p-{i:032x}.0"), os.O_CREAT | os.O_WRONLY, 0o600))
        took: dict[str, list[float]] = {"all": [], "pass": []}
        pruner = stateprune.Pruner(state, 600)
        try:
            for _ in range(a.runs):
                start = time.perf_counter()
                assert _look_at_all(dumps) == a.files
                took["all"].append(time.perf_counter() - start)
                start = time.perf_counter()
                done = pruner.prune()
                took["pass"].append(time.perf_counter() - start)
                assert done.removed == 0 and done.looked == min(stateprune.SCAN_MAX, a.files), done
        finally:
            pruner.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    every, one = statistics.median(took["all"]), statistics.median(took["pass"])
    goal = 2 * stateprune.SCAN_MAX / a.files
    print(f"state pruning over {a.files:,} slot files, median of {a.runs} runs")
    print(f"  lstat of every entry (a pass before)   {every * 1e3:8.1f} ms")
    print(f"  one pass (at most {stateprune.SCAN_MAX:,} entries)   {one * 1e3:8.1f} ms")
    print(f"  ratio {one / every:.3f} (goal <= {goal:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
