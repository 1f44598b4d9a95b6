"""Socket mode against pipe mode, with real crashes of this kernel, measured in one run.

    python -m bench.socketmode [--size-mib 1024] [--runs 10] [--big-runs 3]

For each mode, a host process opted in by a host rule crashes and the time from its start
to its end (``waitpid``) is taken. The kernel holds a crashed process until its core has
been taken (``core_pipe_limit`` for pipes, ``COREDUMP_WAIT`` for the socket), so that time
covers the whole capture, both targets written:

- per-crash fixed cost: a small process (``crasher segv``), median of ``--runs``;
- a ``--size-mib`` MiB process (``crasher alloc``), median of ``--big-runs``;
- a rejected crash of that size in socket mode (the process did not opt in), for what a
  REJECT saves.

Printed as socket ÷ pipe. In pipe mode the kernel starts ``corevault-capture`` per crash; in
socket mode the listener runs in this process, as it runs in the agent.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from corevault import config, hostsetup, spool
from corevault.agent.coredumps import CoredumpListener
from testbed import build, sysctl


def _unlimited() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def crash(args: list[str]) -> tuple[float, bool]:
    started = time.perf_counter()
    child = subprocess.Popen(args, preexec_fn=_unlimited, stderr=subprocess.DEVNULL)  # noqa: PLW1509
    _, status = os.waitpid(child.pid, 0)
    return time.perf_counter() - started, os.WCOREDUMP(status)


def run(args: list[str], n: int, state: str) -> float:
    times = []
    for _ in range(n):
        seconds, dumped = crash(args)
        if not dumped:
            raise SystemExit(f"{args[0]} was not dumped: see {state}/spool/journal.jsonl")
        times.append(seconds)
        for entry in spool.entries(os.path.join(state, "spool")):  # keep the spool from filling
            shutil.rmtree(os.path.join(spool.ready_dir(os.path.join(state, "spool")), entry))
        for name in os.listdir(os.path.join(os.path.dirname(state), "vol")):
            os.unlink(os.path.join(os.path.dirname(state), "vol", name))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--big-runs", type=int, default=3)
    a = ap.parse_args()
    if hostsetup.kernel_socket_mode() != "@@":
        print(f"this kernel ({os.uname().release}) has no coredump socket with requests (6.17+)")
        return 1
    crasher = build.build_all()["crasher"]
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    try:
        os.mkdir(os.path.join(d, "vol"))
        cfg = os.path.join(d, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{d}/state"\n[capture]\nstorm_max = 100000\n'
                    f'[[rules]]\nexe = "*-crasher"\npattern = "{d}/vol/core-%e-%p-%t"\n')  # fmt: skip
        settings = config.load(cfg)
        state = settings.state_dir
        handler = os.path.join(d, "h")
        os.symlink(hostsetup.default_handler(), handler)
        other = os.path.join(d, "not-opted-in")
        shutil.copy(crasher, other)
        small, big = [crasher, "segv"], [crasher, "alloc", str(a.size_mib)]
        results: dict[str, dict[str, float]] = {"pipe": {}, "socket": {}}
        with sysctl.core_settings():
            for mode in ("pipe", "socket"):
                listener = None
                if mode == "socket":
                    listener = CoredumpListener(settings, hostsetup.socket_path(state)).listen().start()
                hostsetup.install(handler if mode == "pipe" else None, config_path=cfg,
                                  socket=listener.path if listener else None)  # fmt: skip
                try:
                    results[mode]["small"] = run(small, a.runs, state)
                    results[mode]["big"] = run(big, a.big_runs, state)
                    if mode == "socket":
                        results[mode]["rejected"] = statistics.median(crash([other, "alloc", str(a.size_mib)])[0]
                                                                      for _ in range(a.big_runs))  # fmt: skip
                finally:
                    hostsetup.uninstall(hostsetup.state_path(settings))
                    if listener is not None:
                        listener.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    p, s = results["pipe"], results["socket"]
    print(f"\ncrash to reaped, median; both targets (volume and spool) written; {os.uname().release}")
    print(f"  per-crash fixed cost (crasher segv, {a.runs} runs): pipe {p['small'] * 1000:.0f} ms, "
          f"socket {s['small'] * 1000:.0f} ms: socket ÷ pipe = {s['small'] / p['small']:.2f}")  # fmt: skip
    print(f"  {a.size_mib} MiB process ({a.big_runs} runs): pipe {p['big']:.2f} s, socket {s['big']:.2f} s: "
          f"socket ÷ pipe = {s['big'] / p['big']:.2f}")  # fmt: skip
    print(f"  {a.size_mib} MiB process rejected by the socket (did not opt in): {s['rejected']:.2f} s, "
          f"{s['rejected'] / s['big']:.2f} of capturing it")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
