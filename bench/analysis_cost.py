"""Where a small crash's full analysis spends its time, step by step, in one run.

    python -m bench.analysis_cost [--runs 9]

The checked-in SIGFPE crash (tests/fixtures/spool) is analysed as the agent analyses it
(:func:`corevault.analysis.runner.analyze` with the crash's record: a child of the
pre-imported template, :mod:`corevault.analysis.template`), and as it was analysed before
the template, in a bubblewrap worker of its own, with the steps such a worker goes through:
the sandbox alone (bubblewrap, setpriv and the seccomp filter running ``/bin/true``), the
interpreter as the worker starts it (``python -I -S -B -c pass``), and the imports a small
C crash's analysis makes (the worker and drgn); what is left of that is reading the core and
its binaries, unwinding and rendering. A second baseline, in the same sandbox and run, is how
a worker started before its start-up was cut: ``python -c`` with ``site``, and the modules
it imported before it deferred them to the crashes that use them (pyelftools, subprocess,
tempfile).
Medians of ``--runs`` interleaved runs: wall time, which on a shared machine follows its load
(printed with them), and CPU time of this process and all it starts, sandboxed workers
included (a cpuacct cgroup of its own: bubblewrap's PID namespace keeps a worker's CPU
out of ``getrusage``), which is what bounds how many analyses two cores drain per second.

A storm is drained by matching (docs/vault.md); only each group's first ``match_after``
crashes are analysed in full, so this cost bounds how soon matching starts, not the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator

from corevault import bounded, spool
from corevault.analysis import runner, sandbox, seccomp, template

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "spool")
SANDBOX = "sandbox alone (bwrap, setpriv, seccomp: /bin/true)"
INTERPRETER = "+ the interpreter (python -I -S -B -c pass)"
IMPORTS = "+ the analysis's imports (corevault.analysis.worker, drgn)"
FULL = "the full analysis, as the agent runs it (a child of the template)"
ALONE = "the full analysis in a worker of its own"
BEFORE = "baseline"


@contextlib.contextmanager
def cpu_meter() -> Iterator[Callable[[], float] | None]:
    """Seconds of CPU used so far by this process and everything it starts (a cgroup v1
    cpuacct group of its own, left on exit); None without such a hierarchy."""
    root = "/sys/fs/cgroup/cpuacct"
    mine = os.path.join(root, f"corevault-bench-{os.getpid()}")
    try:
        os.mkdir(mine)
    except OSError:
        yield None
        return
    try:
        with open(os.path.join(mine, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(mine, "cpuacct.usage")) as usage:
            yield lambda: int(os.pread(usage.fileno(), 64, 0)) / 1e9
    finally:
        # this process and what still runs of it (the analysis template) go back
        with open(os.path.join(mine, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            with open(os.path.join(root, "cgroup.procs"), "w") as f, contextlib.suppress(ProcessLookupError):
                f.write(pid)
        os.rmdir(mine)


def alone(analysis: Callable[[], object]) -> object:
    """``analysis`` run as without the template: in a bubblewrap worker of its own."""
    shared = template.shared
    template.shared = lambda uid, processes=0: None
    try:
        return analysis()
    finally:
        template.shared = shared


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
        ALONE: lambda: alone(lambda: runner.analyze(core, [store], record=record)),
        FULL: lambda: runner.analyze(core, [store], record=record),
        BEFORE: lambda: in_sandbox([sys.executable, "-c", before]),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    with cpu_meter() as used:
        for _ in range(a.runs):
            for name, step in steps.items():
                started, cpu_started = time.monotonic(), used() if used else 0.0
                step()
                times[name].append(time.monotonic() - started)
                cpu[name].append(used() - cpu_started if used else float("nan"))
    wall = {name: statistics.median(t) * 1000 for name, t in times.items()}
    cpu_ms = {name: statistics.median(t) * 1000 for name, t in cpu.items()}
    print(f"a small crash's full analysis, medians of {a.runs} runs (load average {os.getloadavg()[0]:.1f}):")
    print(f"  {'':<66} {'wall':>9} {'':>5} {'CPU':>9}")
    print(f"  {FULL:<66} {wall[FULL]:6.0f} ms {'':>5} {cpu_ms[FULL]:6.0f} ms")
    print(f"  baseline, {ALONE}, step by step:")
    for name in (SANDBOX, INTERPRETER, IMPORTS, ALONE):
        print(f"    {name:<64} {wall[name]:6.0f} ms {wall[name] / wall[ALONE]:5.0%} {cpu_ms[name]:6.0f} ms")
    left = "left: reading the core and binaries, unwinding, rendering"
    print(
        f"    {left:<64} {wall[ALONE] - wall[IMPORTS]:6.0f} ms {'':>5} {cpu_ms[ALONE] - cpu_ms[IMPORTS]:6.0f} ms"
    )
    ratio = f"wall {wall[FULL] / wall[ALONE]:.2f}, CPU {cpu_ms[FULL] / cpu_ms[ALONE]:.2f}"
    print(f"  the template's child / a worker of its own: {ratio} (goal: below 1)")
    before = "baseline: a worker's start-up before it was cut (site, deferred modules imported)"
    print(f"  {before:<66} {wall[BEFORE]:6.0f} ms {'':>5} {cpu_ms[BEFORE]:6.0f} ms")
    now_before = f"wall {wall[IMPORTS] / wall[BEFORE]:.2f}, CPU {cpu_ms[IMPORTS] / cpu_ms[BEFORE]:.2f}"
    print(f"  a worker's start-up now / before: {now_before} (goal: below 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
