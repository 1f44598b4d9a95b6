"""Socket mode, the forwarder and pipe mode, with real crashes of this kernel, measured in one run.

    python -m bench.socketmode [--size-mib 1024] [--runs 10] [--big-runs 3] [--forward-pipe-kib 64]

For each mode, a host process opted in by a host rule crashes and the time from its start
to its end (``waitpid``) is taken. The kernel holds a crashed process until its core has
been taken (``core_pipe_limit`` for pipes, ``COREDUMP_WAIT`` for the socket), so that time
covers the whole capture, both targets written:

- per-crash fixed cost: a small process (``crasher segv``), ``--runs`` rounds;
- a ``--size-mib`` MiB process (``crasher alloc``), ``--big-runs`` rounds (0 skips them);
- a rejected crash of that size in socket mode (the process did not opt in), for what a
  REJECT saves.

The modes take turns crash by crash, and each round starts with the next mode (pipe,
forwarder, socket; forwarder, socket, pipe; …), so none always follows another. On a shared
machine one crash's time varies by more than the modes differ, so each figure is printed as
its median with its quartiles, and the forwarder is compared with the socket round by round:
the median of the rounds' forwarder ÷ socket ratios, with their quartiles, is the figure the
goal is held against (a burst of load falls on both crashes of a round alike). The CPU
seconds of the crashing task and of this process (the receiver's and the listener's capture)
are printed beside the wall time: what the transport costs, whatever the scheduler did; the
forwarder's own few system calls and the pipe handler are not in them.

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
    Then waits for its spool entry, which every mode finishes after the process is let go, so
    that no capture's end overlaps the next crash, and empties the spool and the volume."""
    seconds, dumped, cpu = crash(args)
    if not dumped:
        raise SystemExit(f"{args[0]} was not dumped: see {state}/spool/journal.jsonl")
    deadline = time.monotonic() + 60
    while not spool.entries(os.path.join(state, "spool")):
        if time.monotonic() > deadline:
            raise SystemExit(f"{args[0]} was dumped but never spooled: see {state}/spool/journal.jsonl")
        time.sleep(0.005)
    for entry in spool.entries(os.path.join(state, "spool")):  # keep the spool from filling
        shutil.rmtree(os.path.join(spool.ready_dir(os.path.join(state, "spool")), entry))
    for name in os.listdir(os.path.join(os.path.dirname(state), "vol")):
        os.unlink(os.path.join(os.path.dirname(state), "vol", name))
    return seconds, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--big-runs", type=int, default=3)
    ap.add_argument("--forward-pipe-kib", type=int, default=FORWARDED_PIPE >> 10,
                    help="the buffer the receiver gives a forwarded core's pipe (more than 1024 needs CAP_SYS_RESOURCE)")  # fmt: skip
    a = ap.parse_args()
    if hostsetup.kernel_socket_mode() != "@@":
        print(f"this kernel ({os.uname().release}) has no coredump socket with requests (6.17+)")
        return 1
    if a.runs < 2 or a.big_runs == 1:
        ap.error("quartiles need --runs >= 2 and --big-runs 0 or >= 2")
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
            m: {"small": [], "big": [], "rejected": [], "small_cpu": [], "big_cpu": []} for m in MODES
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
            # falls on all three alike, and each round starts with the next one.
            for size, args, n in (("small", small, a.runs), ("big", big, a.big_runs)):
                for round_ in range(n):
                    for mode in MODES[round_ % 3 :] + MODES[: round_ % 3]:
                        hostsetup.install(config_path=cfg, **where[mode])  # type: ignore[arg-type]
                        try:
                            seconds, cpu = once(args, state)
                            times[mode][size].append(seconds)
                            times[mode][f"{size}_cpu"].append(cpu)
                            if mode == "socket" and size == "big":
                                times[mode]["rejected"].append(crash([other, "alloc", str(a.size_mib)])[0])
                        finally:
                            hostsetup.uninstall(hostsetup.state_path(settings))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    report(times, a)
    return 0


def spread(values: list[float], scale: float = 1.0, fmt: str = ".0f") -> str:
    """``median [first quartile to third quartile]`` of ``values`` times ``scale``."""
    q1, q2, q3 = (q * scale for q in statistics.quantiles(values, n=4, method="inclusive"))
    return f"{q2:{fmt}} [{q1:{fmt}} to {q3:{fmt}}]"


def paired(times: dict[str, dict[str, list[float]]], key: str) -> list[float]:
    """Forwarder ÷ socket, round by round."""
    return [f / s for f, s in zip(times["forward"][key], times["socket"][key], strict=True)]


def report(times: dict[str, dict[str, list[float]]], a: argparse.Namespace) -> None:
    p, f, s = ({k: statistics.median(v) for k, v in times[m].items() if v} for m in MODES)
    print(f"\ncrash to reaped, median [quartiles]; both targets (volume and spool) written; "
          f"{os.uname().release}; forwarded pipe {a.forward_pipe_kib} KiB")  # fmt: skip
    print(f"  per-crash fixed cost (crasher segv, {a.runs} rounds), ms: socket {spread(times['socket']['small'], 1000)}, "
          f"forwarder {spread(times['forward']['small'], 1000)}, pipe {spread(times['pipe']['small'], 1000)}")  # fmt: skip
    print(f"    forwarder ÷ socket, round by round = {spread(paired(times, 'small'), fmt='.2f')} (goal <= 1.0); "
          f"of the medians {f['small'] / s['small']:.2f}; pipe ÷ socket = {p['small'] / s['small']:.2f}")  # fmt: skip
    print(f"    CPU ms of the crashing task and the agent: socket {spread(times['socket']['small_cpu'], 1000, '.1f')}, "
          f"forwarder {spread(times['forward']['small_cpu'], 1000, '.1f')}; "
          f"forwarder ÷ socket = {f['small_cpu'] / s['small_cpu']:.2f}")  # fmt: skip
    if a.big_runs:
        print(f"  {a.size_mib} MiB process ({a.big_runs} rounds), s: socket {spread(times['socket']['big'], fmt='.2f')}, "
              f"forwarder {spread(times['forward']['big'], fmt='.2f')}, pipe {spread(times['pipe']['big'], fmt='.2f')}")  # fmt: skip
        print(f"    forwarder ÷ socket, round by round = {spread(paired(times, 'big'), fmt='.2f')} (goal <= 1.0); "
              f"pipe ÷ socket = {p['big'] / s['big']:.2f}; socket ÷ pipe = {s['big'] / p['big']:.2f}")  # fmt: skip
        print(f"    CPU seconds of the crashing task and the agent (not the pipe handler's): "
              f"socket {s['big_cpu']:.2f}, forwarder {f['big_cpu']:.2f}; "
              f"forwarder ÷ socket = {f['big_cpu'] / s['big_cpu']:.2f}")  # fmt: skip
        print(f"  {a.size_mib} MiB process rejected by the socket (did not opt in): {s['rejected']:.2f} s, "
              f"{s['rejected'] / s['big']:.2f} of capturing it")  # fmt: skip
    print(f"  load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    sys.exit(main())
