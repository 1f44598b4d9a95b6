"""Where a small crash's full analysis spends its time, step by step, in one run.

    python -m bench.analysis_cost [--runs 9]

The checked-in SIGFPE crash (tests/fixtures/spool) is analysed as the agent analyses it
(:func:`corevault.analysis.runner.analyze`: a sandboxed worker with the crash's record),
and beside it, each in the same sandbox, the steps a worker goes through: the sandbox alone
(bubblewrap, setpriv and the seccomp filter running ``/bin/true``), the interpreter
(``python -c pass``), and the worker's imports. What is left of the full analysis is reading
the core and its binaries, unwinding and rendering. Medians of ``--runs`` interleaved runs,
wall time on a shared machine, so the load average is printed with them.

A storm is drained by matching (docs/vault.md); only each group's first ``match_after``
crashes are analysed in full, so this cost bounds how soon matching starts, not the drain.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

from corevault import bounded, spool
from corevault.analysis import runner, sandbox, seccomp

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "spool")


def in_sandbox(argv: list[str]) -> None:
    filter_fd = seccomp.filter_fd()
    try:
        cmd = sandbox.command(argv, [], sandbox.DEFAULT_UID, filter_fd)
        fds = () if filter_fd is None else (filter_fd,)
        _, err, code = bounded.run(cmd, timeout=60, limits={resource.RLIMIT_DATA: 4 << 30}, pass_fds=fds)
    finally:
        if filter_fd is not None:
            os.close(filter_fd)
    if code != 0:
        raise SystemExit(f"{argv} failed in the sandbox: {err.decode(errors='replace')[-300:]}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.analysis_cost")
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    ready = spool.ready_dir(FIXTURE)
    [entry] = [
        e for e in os.listdir(ready) if spool.read_meta(FIXTURE, e)["process"]["exe"] == "/app/crasher"
    ]
    record = spool.read_meta(FIXTURE, entry)["modules"]
    core = os.path.join(ready, entry, spool.CORE_NAME)
    store = os.path.join(FIXTURE, "store")
    py = sys.executable
    steps: dict[str, Callable[[], object]] = {
        "sandbox alone (bwrap, setpriv, seccomp: /bin/true)": lambda: in_sandbox(["/bin/true"]),
        "+ the interpreter (python -c pass)": lambda: in_sandbox([py, "-c", "pass"]),
        "+ the worker's imports (drgn, pyelftools, corevault.analysis)": lambda: in_sandbox(
            [py, "-c", "import corevault.analysis.worker"]
        ),
        "the full analysis, as the agent runs it": lambda: runner.analyze(core, [store], record=record),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.runs):
        for name, step in steps.items():
            started = time.monotonic()
            step()
            times[name].append(time.monotonic() - started)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    full = medians["the full analysis, as the agent runs it"]
    print(f"a small crash's full analysis, medians of {a.runs} runs (load average {os.getloadavg()[0]:.1f}):")
    for name, ms in medians.items():
        print(f"  {name:<64} {ms:6.0f} ms  {ms / full:5.0%}")
    imports = medians["+ the worker's imports (drgn, pyelftools, corevault.analysis)"]
    print(f"  {'left: reading the core and binaries, unwinding, rendering':<64} {full - imports:6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
