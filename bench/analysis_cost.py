"""Where a small crash's full analysis spends its time, step by step, in one run.

    python -m bench.analysis_cost [--runs 9]

The checked-in SIGFPE crash (tests/fixtures/spool) is analysed as the agent analyses it
(:func:`corevault.analysis.runner.analyze`: a sandboxed worker with the crash's record),
and beside it, each in the same sandbox, the steps a worker goes through: the sandbox alone
(bubblewrap, setpriv and the seccomp filter running ``/bin/true``), the interpreter as the
worker starts it (``python -I -S -B -c pass``), and the imports a small C crash's analysis
makes (the worker and drgn). What is left of the full analysis is reading the core and its
binaries, unwinding and rendering. The baseline beside them, in the same sandbox and run, is
how the worker started before: ``python -c`` with ``site``, and the modules it imported
before it deferred them to the crashes that use them (pyelftools, subprocess, tempfile).
Medians of ``--runs`` interleaved runs, wall time on a shared machine, so the load average
is printed with them.

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
SANDBOX = "sandbox alone (bwrap, setpriv, seccomp: /bin/true)"
INTERPRETER = "+ the interpreter (python -I -S -B -c pass)"
IMPORTS = "+ the analysis's imports (corevault.analysis.worker, drgn)"
FULL = "the full analysis, as the agent runs it"
BEFORE = "baseline"


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
    worker_imports = "import corevault.analysis.worker, drgn"
    before = f"{worker_imports}, elftools.elf.elffile, subprocess, tempfile"
    steps: dict[str, Callable[[], object]] = {
        SANDBOX: lambda: in_sandbox(["/bin/true"]),
        INTERPRETER: lambda: in_sandbox(sandbox.python("pass")),
        IMPORTS: lambda: in_sandbox(sandbox.python(worker_imports)),
        FULL: lambda: runner.analyze(core, [store], record=record),
        BEFORE: lambda: in_sandbox([sys.executable, "-c", before]),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.runs):
        for name, step in steps.items():
            started = time.monotonic()
            step()
            times[name].append(time.monotonic() - started)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    full = medians[FULL]
    print(f"a small crash's full analysis, medians of {a.runs} runs (load average {os.getloadavg()[0]:.1f}):")
    for name in (SANDBOX, INTERPRETER, IMPORTS, FULL):
        print(f"  {name:<66} {medians[name]:6.0f} ms  {medians[name] / full:5.0%}")
    print(
        f"  {'left: reading the core and binaries, unwinding, rendering':<66} {full - medians[IMPORTS]:6.0f} ms"
    )
    print(
        f"  {'baseline: the start-up before (site, deferred modules imported)':<66} {medians[BEFORE]:6.0f} ms"
        f"  start-up now / before {medians[IMPORTS] / medians[BEFORE]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
