"""Analysis benchmark: a full symbolized report against gdb's plain backtrace, in one run.

    python -m bench.analysis [--runs 3]

Real cores of a program with 1, 129 and 1001 threads, crashed in a runc container through
the installed capture handler (so the build-id store is the real one), then, medians of
``--runs`` runs each, interleaved:

- corevault's worker: the full report (every thread symbolized, signal, modules,
  signature), drgn back-end, as ``corevault analyze`` runs it;
- ``gdb -batch -ex 'thread apply all bt'`` with the container's root as sysroot.

Prints both times, the ratio (goal ≤ 0.5 at 1001 threads) and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from testbed import build, runc, sysctl

THREADS = (1, 129, 1001)


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed")
    return time.perf_counter() - started, usage.ru_maxrss


def make_cores(work: str) -> tuple[str, str, dict[int, str]]:
    """Crash the corpus program with each thread count; returns rootfs, store and cores."""
    from corevault import hostsetup

    rootfs = runc.build_rootfs(os.path.join(work, "rootfs"), build.build_all())
    volume = os.path.join(work, "vol")
    os.makedirs(volume)
    handler = os.path.join(work, "h")
    os.symlink(hostsetup.default_handler(), handler)
    config = os.path.join(work, "c.toml")
    with open(config, "w") as f:
        f.write(f'state_dir = "{work}/s"\n[capture]\ntargets = ["volume", "vault"]\n')
    cores = {}
    with sysctl.core_settings():
        hostsetup.install(handler, config_path=config)
        try:
            for n in THREADS:
                args = ["/app/crasher", "segv"] if n == 1 else ["/app/crasher", "threads", str(n - 2)]
                annotations = {"corevault.io/core-pattern": f"/data/dump-a/core-{n}"}
                runc.Container(rootfs, args, volume=volume, annotations=annotations).run()
                cores[n] = os.path.join(volume, f"core-{n}")
        finally:
            hostsetup.uninstall(os.path.join(work, "s", hostsetup.STATE_NAME))
    assert all(os.path.exists(c) for c in cores.values()), "a crash left no core"
    return rootfs, os.path.join(work, "s", "store"), cores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = "/tmp/cv-bench-analysis"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        rootfs, store, cores = make_cores(work)
        exe = os.path.join(rootfs, "app/crasher")
        print(f"{'threads':>8} {'corevault report':>17} {'gdb bt all':>11} {'ratio':>6} {'report RSS':>11}")
        for n, core in cores.items():
            ours, gdb, rss = [], [], 0
            for _ in range(a.runs):
                t, r = run([sys.executable, "-m", "corevault.analysis.worker", core, "--store", store])
                ours.append(t)
                rss = max(rss, r)
                gdb_cmd = [
                    "gdb",
                    "-batch",
                    "-nx",
                    "-iex",
                    "set auto-load off",
                    "-iex",
                    f"set sysroot {rootfs}",
                ]
                gdb.append(run([*gdb_cmd, "-ex", "thread apply all bt", exe, core])[0])
            o, g = statistics.median(ours), statistics.median(gdb)
            print(f"{n:>8} {o:>15.2f} s {g:>9.2f} s {o / g:>6.2f} {rss / 1024:>7.0f} MiB")
        print("\ngoal: ratio <= 0.5 at 1001 threads")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
