"""Socket mode, the forwarder and pipe mode, with real crashes of this kernel, measured in one run.

    python -m bench.socketmode [--size-mib 1024] [--runs 10] [--big-runs 3] [--forward-pipe-kib 64]

For each mode, a host process opted in by a host rule crashes and the time from its start
to its end (``waitpid``) is taken. The kernel holds a crashed process until its core has
been taken (``core_pipe_limit`` for pipes, ``COREDUMP_WAIT`` for the socket), so that time
covers the whole capture, both targets written:

- per-crash fixed cost: a small process (``crasher segv``), median of ``--runs``;
- a ``--size-mib`` MiB process (``crasher alloc``), median of ``--big-runs``;
- a rejected crash of that size in socket mode (the process did not opt in), for what a
  REJECT saves.

The modes take turns crash by crash (pipe, forwarder, socket, pipe, …).

Three modes: ``pipe``, the kernel starts the Python handler (``corevault install``'s launcher)
per crash; ``forward``, the kernel starts the static ``corevault-forward``, which hands the core's
pipe, the pidfd and the arguments to the agent's receiver (the DaemonSet's pipe path, for
kernels before 6.16); ``socket``, the kernel connects to the agent's coredump socket. The
receiver and the listener run in this process, as they run in the agent. Printed as ratios to
socket mode: the forwarder's goal is to cost no more than the socket (≤ 1.0).

Beside the wall time of a big crash, the CPU seconds of the crashing task (the kernel writing
the core) and of this process (the capture) for the forwarder and the socket: on a loaded
machine the wall time also says how the scheduler shared the CPUs, the CPU time what the
transport costs. ``--forward-pipe-kib`` sets the buffer the receiver gives a forwarded core's
pipe (:data:`corevault.agent.receiver.FORWARDED_PIPE` by default), to compare sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from corevault import config, hostsetup, spool
from corevault.agent.coredumps import CoredumpListener
from corevault.agent.receiver import FORWARDED_PIPE, Receiver
from testbed import build, sysctl

MODES = ("pipe", "forward", "socket")


def _unlimited() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def crash(args: list[str]) -> tuple[float, bool, float]:
    """Crash ``args``: the seconds to reaped, whether it dumped, and the CPU seconds of the
    crashing task (the kernel writing its core) and of this process (the receiver and the
    listener capture in it, as in the agent) meanwhile."""
    before = _cpu(resource.getrusage(resource.RUSAGE_SELF))
    started = time.perf_counter()
    child = subprocess.Popen(args, preexec_fn=_unlimited, stderr=subprocess.DEVNULL)  # noqa: PLW1509
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    cpu = _cpu(usage) + _cpu(resource.getrusage(resource.RUSAGE_SELF)) - before
    return seconds, os.WCOREDUMP(status), cpu


def once(args: list[str], state: str) -> tuple[float, float]:
    """Crash ``args`` once; the seconds to reaped and the CPU seconds (see :func:`crash`).
    Empties the spool and the volume after it."""
    seconds, dumped, cpu = crash(args)
    if not dumped:
        raise SystemExit(f"{args[0]} was not dumped: see {state}/spool/journal.jsonl")
    for entry in spool.entries(os.path.join(state, "spool")):  # keep the spool from filling
        shutil.rmtree(os.path.join(spool.ready_dir(os.path.join(state, "spool")), entry))
    for name in os.listdir(os.path.join(os.path.dirname(state), "vol")):
        os.unlink(os.path.join(os.path.dirname(state), "vol", name))
    return seconds, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--big-runs", type=int, default=3)
    ap.add_argument("--forward-pipe-kib", type=int, default=FORWARDED_PIPE >> 10,
                    help="the buffer the receiver gives a forwarded core's pipe (more than 1024 needs CAP_SYS_RESOURCE)")  # fmt: skip
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
        forwarder = os.path.join(d, "f")
        os.symlink(build.forwarder(), forwarder)
        other = os.path.join(d, "not-opted-in")
        shutil.copy(crasher, other)
        small, big = [crasher, "segv"], [crasher, "alloc", str(a.size_mib)]
        times: dict[str, dict[str, list[float]]] = {
            m: {"small": [], "big": [], "rejected": [], "big_cpu": []} for m in MODES
        }
        with sysctl.core_settings(), contextlib.ExitStack() as servers:
            listener = CoredumpListener(settings, hostsetup.socket_path(state)).listen().start()
            servers.callback(listener.close)
            receiver = Receiver(settings, os.path.join(d, "a.sock"), pipe_size=a.forward_pipe_kib << 10)
            receiver.listen()
            servers.callback(receiver.close)
            threading.Thread(target=receiver.serve, daemon=True).start()
            where = {
                "pipe": {"handler": handler},
                "forward": {"handler": forwarder, "forward_to": receiver.path},
                "socket": {"handler": None, "socket": listener.path},
            }
            # The modes take turns crash by crash, so a burst of load on this shared machine
            # falls on all three alike.
            for size, args, n in (("small", small, a.runs), ("big", big, a.big_runs)):
                for _ in range(n):
                    for mode in MODES:
                        hostsetup.install(config_path=cfg, **where[mode])  # type: ignore[arg-type]
                        try:
                            seconds, cpu = once(args, state)
                            times[mode][size].append(seconds)
                            if size == "big":
                                times[mode]["big_cpu"].append(cpu)
                            if mode == "socket" and size == "big":
                                times[mode]["rejected"].append(crash([other, "alloc", str(a.size_mib)])[0])
                        finally:
                            hostsetup.uninstall(hostsetup.state_path(settings))
        results = {m: {k: statistics.median(v) for k, v in by.items() if v} for m, by in times.items()}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    p, f, s = results["pipe"], results["forward"], results["socket"]
    print(f"\ncrash to reaped, median; both targets (volume and spool) written; {os.uname().release}; "
          f"forwarded pipe {a.forward_pipe_kib} KiB")  # fmt: skip
    print(f"  per-crash fixed cost (crasher segv, {a.runs} runs): socket {s['small'] * 1000:.0f} ms, "
          f"forwarder {f['small'] * 1000:.0f} ms, pipe {p['small'] * 1000:.0f} ms")  # fmt: skip
    print(f"    forwarder ÷ socket = {f['small'] / s['small']:.2f} (goal <= 1.0); "
          f"pipe ÷ socket = {p['small'] / s['small']:.2f}; socket ÷ pipe = {s['small'] / p['small']:.2f}")  # fmt: skip
    print(f"  {a.size_mib} MiB process ({a.big_runs} runs): socket {s['big']:.2f} s, forwarder {f['big']:.2f} s, "
          f"pipe {p['big']:.2f} s")  # fmt: skip
    print(f"    forwarder ÷ socket = {f['big'] / s['big']:.2f} (goal <= 1.0); "
          f"pipe ÷ socket = {p['big'] / s['big']:.2f}; socket ÷ pipe = {s['big'] / p['big']:.2f}")  # fmt: skip
    print(f"    CPU seconds of the crashing task and the agent (not the pipe handler's): "
          f"socket {s['big_cpu']:.2f}, forwarder {f['big_cpu']:.2f}; "
          f"forwarder ÷ socket = {f['big_cpu'] / s['big_cpu']:.2f}")  # fmt: skip
    print(f"  {a.size_mib} MiB process rejected by the socket (did not opt in): {s['rejected']:.2f} s, "
          f"{s['rejected'] / s['big']:.2f} of capturing it")  # fmt: skip
    print(f"  load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
