"""Analysis benchmark: corevault's report against gdb's plain backtrace, in one run.

    python -m bench.analysis [--runs 3]

Real cores, crashed in runc containers through the installed capture handler (so the
build-id store is the real one): every program and way to die of the corpus, and a
program with 1, 129 and 1001 threads. gdb gets the same files: the container's root as
its sysroot and the host's /usr/lib/debug, which is where corevault finds debug files too.

1. Frames named, per core: frames with a function name in corevault's report (drgn
   back-end, defaults: system frames named from their debug files' symbol tables) ÷
   frames with a name in ``gdb -batch -ex 'thread apply all bt'``. gdb stops each
   backtrace at ``main``; the "to main" column counts corevault's frames the same way.
   Goal: >= 1.0 on every core. Both unwind as deep as the stack goes here: the report,
   as users get it, keeps the top and the bottom of a stack overflow and counts the
   repeated middle, whose frames are counted here too.
2. Time, medians of ``--runs`` interleaved runs: the full report (every thread
   symbolized, signal, modules, signature) ÷ gdb's backtrace. Goal: <= 0.5 at 1001
   threads, with system frames named. Also the report's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from testbed import corpus, runc, sysctl

THREADS = (1, 129, 1001)
#: name: (argv, via a shell so the program is not the container's PID 1)
CORPUS = {
    "segv": (["/app/crasher", "segv"], False),
    "stack": (["/app/crasher", "stack"], False),
    "fpe": (["/app/crasher", "fpe"], False),
    "ill": (["/app/crasher", "ill"], False),
    "bus": (["/app/crasher", "bus"], False),
    "assert": (["/app/crasher assert; exit 1"], True),
    "abort": (["/app/crasher abort; exit 1"], True),
    "libc": (["/app/crasher", "libc"], False),
    "strlen": (["/app/crasher", "strlen"], False),
    "thread": (["/app/crasher", "thread"], False),
    "cxx": (["/app/thrower; exit 1"], True),
    "library": (["/app/libuser"], False),
    "stripped": (["/app/crasher-stripped", "segv"], False),
    # the runtimes of testbed/corpus.py
    "rust-index": (["/app/rustcrash index; exit 1"], True),
    "rust-unwrap": (["/app/rustcrash unwrap; exit 1"], True),
    "rust-v0-unwrap": (["/app/rustcrash-v0 unwrap; exit 1"], True),
    "cxx-thread": (["/app/workerthrow; exit 1"], True),
    "static-assert": (["/app/crasher-static assert; exit 1"], True),
    "go-nilmap": (["GOTRACEBACK=crash /app/goservice nilmap; exit 1"], True),
    "go-nilptr": (["GOTRACEBACK=crash /app/goservice nilptr; exit 1"], True),
    "go-mapwrites": (["GOTRACEBACK=crash /app/goservice mapwrites; exit 1"], True),
    "python-ctypes": (["/usr/bin/python3.11 -S /app/pyctypes.py; exit 1"], True),
    "node-abort": (["/usr/bin/node /app/nodecrash.js abort; exit 1"], True),
    "node-uncaught": (
        ["/usr/bin/node --abort-on-uncaught-exception /app/nodecrash.js uncaught; exit 1"],
        True,
    ),
    "node-segv": (["/usr/bin/node /app/nodecrash.js segv; exit 1"], True),
}
GDB_FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(")


def run(cmd: list[str]) -> tuple[float, int, bytes]:
    """Wall seconds, peak RSS (KiB) and stdout of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed")
    return time.perf_counter() - started, usage.ru_maxrss, out


def make_cores(work: str) -> tuple[str, str, dict[str, tuple[str, str]]]:
    """Crash the corpus; returns the rootfs, the build-id store and ``name: (executable, core)``."""
    from corevault import hostsetup

    rootfs = corpus.build_rootfs(os.path.join(work, "rootfs"))
    volume = os.path.join(work, "vol")
    os.makedirs(volume)
    handler = os.path.join(work, "h")
    os.symlink(hostsetup.default_handler(), handler)
    config = os.path.join(work, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{work}/s"\n[capture]\ntargets = ["volume", "vault"]\nstorm_max = 100\n')
    runs = {name: (["/bin/sh", "-c", *args] if shell else args) for name, (args, shell) in CORPUS.items()}
    for n in THREADS:
        runs[f"threads-{n}"] = ["/app/crasher", "segv"] if n == 1 else ["/app/crasher", "threads", str(n - 2)]
    cores = {}
    with sysctl.core_settings():
        hostsetup.install(handler, config_path=config)
        try:
            for name, args in runs.items():
                annotations = {"corevault.io/core-pattern": f"/data/dump-a/core-{name}"}
                runc.Container(rootfs, args, volume=volume, annotations=annotations).run()
                command = args[-1] if args[0] == "/bin/sh" else args[0]
                exe = next(w for w in command.split() if w.startswith("/")).rstrip(";")
                cores[name] = (os.path.join(rootfs, exe.lstrip("/")), os.path.join(volume, f"core-{name}"))
        finally:
            hostsetup.uninstall(os.path.join(work, "s", hostsetup.STATE_NAME))
    missing = [name for name, (_, core) in cores.items() if not os.path.exists(core)]
    assert not missing, f"no core from {missing}"
    return rootfs, os.path.join(work, "s", "store"), cores


def ours(core: str, store: str, max_frames: int = 256) -> list[str]:
    worker = [sys.executable, "-m", "corevault.analysis.worker", core, "--store", store]
    return [*worker, "--max-frames", str(max_frames)]


def gdb(exe: str, core: str, rootfs: str) -> list[str]:
    return [
        "gdb", "-batch", "-nx", "-iex", "set auto-load off", "-iex", f"set sysroot {rootfs}",
        "-ex", "thread apply all bt", exe, core,
    ]  # fmt: skip


def named_by_corevault(report: dict) -> tuple[int, int]:
    """Frames with a name: all of them, and up to each thread's ``main`` as gdb shows them.

    A deep stack's report leaves its repeated middle out as runs of one function
    (``recurse x 30,833``): those frames were unwound and named, and count as such.
    """
    total = to_main = 0
    for thread in report["threads"]:
        past_main = False
        frames = thread["frames"]
        at = thread.get("omitted_at", len(frames))
        runs = [{"function": r["function"], "count": r["count"]} for r in thread.get("omitted", ())]
        for frame in [*frames[:at], *runs, *frames[at:]]:
            count = frame.get("count", 1)
            if frame.get("function"):
                total += count
                to_main += 0 if past_main else count
            past_main = past_main or frame.get("function") == "main"
    return total, to_main


def named_by_gdb(output: bytes) -> int:
    """Named frames in the backtraces (not the frame gdb prints once when it loads the core)."""
    named, started = 0, False
    for line in output.decode(errors="replace").splitlines():
        started = started or line.startswith("Thread ")
        if started and (m := GDB_FRAME.match(line)):
            named += m.group(1) != "??"
    return named


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = "/tmp/cv-bench-analysis"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        rootfs, store, cores = make_cores(work)
        print("Frames named, corevault ÷ gdb (goal >= 1.0 on every core)")
        print(f"{'core':>14} {'corevault':>10} {'to main':>8} {'gdb':>5} {'ratio':>6} {'to main':>8}")
        worst = float("inf")
        for name, (exe, core) in cores.items():
            report = json.loads(run(ours(core, store))[2])
            total, to_main = named_by_corevault(report)
            theirs = named_by_gdb(run(gdb(exe, core, rootfs))[2])
            ratio, ratio_main = total / max(theirs, 1), to_main / max(theirs, 1)
            worst = min(worst, ratio)
            print(f"{name:>14} {total:>10} {to_main:>8} {theirs:>5} {ratio:>6.2f} {ratio_main:>8.2f}")
        print(f"{'lowest':>14} {worst:>37.2f}   goal >= 1.0\n")

        print("Time, full report ÷ gdb bt of all threads, system frames named (goal <= 0.5 at 1001 threads)")
        print(f"{'threads':>8} {'corevault report':>17} {'gdb bt all':>11} {'ratio':>6} {'report RSS':>11}")
        for n in THREADS:
            exe, core = cores[f"threads-{n}"]
            mine, theirs, rss = [], [], 0
            for _ in range(a.runs):
                t, r, _ = run(ours(core, store))
                mine.append(t)
                rss = max(rss, r)
                theirs.append(run(gdb(exe, core, rootfs))[0])
            o, g = statistics.median(mine), statistics.median(theirs)
            goal = "   goal <= 0.5" if n == THREADS[-1] else ""
            print(f"{n:>8} {o:>15.2f} s {g:>9.2f} s {o / g:>6.2f} {rss / 1024:>7.0f} MiB{goal}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
