"""A dump cut short because its process was killed meanwhile is journaled as truncated.

Tenant A's process (256 MiB of memory) crashes; while the kernel writes its core, whoever
reads the core (the pipe handler, or the agent's coredump listener) is stopped so the kernel
blocks on a full pipe or socket, A's process gets a SIGKILL (the kernel then stops dumping),
and the reader goes on. Tenant B's pod (another namespace) crashes next: its core is whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from corevault import config, hostsetup, spool
from testbed import runc, sysctl
from tests.conftest import Capture
from tests.tenants import of_namespace, pod, processes
from tests.waiting import wait_for

pytestmark = pytest.mark.crash
SIZE = "257"  # MiB; an unusual number, so that /proc finds this test's process only
ARGS = ["/app/crasher", "alloc", SIZE]


def kill_while_dumping(rootfs: str, volume: str, spool_dir: str, reader: Callable[[], int]) -> None:
    """Crash tenant A and SIGKILL it in the middle of its dump, with the core's reader held still;
    return once the reader, let go, has journaled what it got of A's core.

    Each step waits for what the next needs, not for a time (under load a step takes any time):
    the reader streaming, then held still while the kernel is still dumping (``CoreDumping`` in
    the process's status) and unable to finish; the kernel's dump stopped once the process is gone
    (nothing is written after a SIGKILL: the kernel checks for it before each write, and wakes a
    write that waits); the reader done with A before B crashes (so B's record is never the only one).
    """
    a = runc.Container(rootfs, ARGS, volume=volume, annotations=pod("tenant-a", "a-0"))
    run = threading.Thread(target=a.run)
    run.start()
    try:
        tmp = spool.tmp_dir(spool_dir)
        wait_for(lambda: os.path.isdir(tmp) and os.listdir(tmp))  # the reader is streaming the core
        held = reader()
        os.kill(held, signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(held))  # held still: none of its threads reads any more
            [crashed] = processes(b"\0".join(a.encode() for a in ARGS) + b"\0")
            # still dumping, and cannot finish: the kernel wrote less than the core (its writes count in
            # the process's wchar) and the reader, which would make room for the rest, is held
            assert _status(crashed).get("CoreDumping") == "1" and _written(crashed) < int(SIZE) << 20, (
                "the dump ended before its reader was held"
            )
            os.kill(crashed, signal.SIGKILL)
            wait_for(lambda: _status(crashed).get("State", "Z")[0] in "ZX")  # the dump stopped
        finally:
            os.kill(held, signal.SIGCONT)
    finally:
        run.join(120)
    wait_for(lambda: of_namespace(spool.read_journal(spool_dir), "tenant-a"))


def _stopped(pid: int) -> bool:
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(_status(int(t)).get("State", "").startswith("T") for t in tasks)


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f)["wchar"])


def _status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as its fields; empty once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def check_journal(records: list[dict]) -> None:
    a, b = of_namespace(records, "tenant-a"), of_namespace(records, "tenant-b")
    [cut] = [r for r in a if r["event"] == "truncated"]
    assert "the kernel stopped the dump" in cut["reason"] and "killed" in cut["reason"], cut
    assert cut["size"] < int(SIZE) << 20
    assert [r["event"] for r in b] == ["captured"], b


def test_a_killed_dump_is_truncated_not_captured_pipe(capture: Capture, rootfs: str) -> None:
    def handler() -> int:
        [pid] = processes(capture.handler.encode())
        return pid

    kill_while_dumping(rootfs, capture.volume, capture.spool, handler)
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
    check_journal(capture.journal())
    metas = {m["pod"]["namespace"]: m["core"] for m in capture.entries()}
    assert metas["tenant-a"]["truncated"] and metas["tenant-a"]["expected_size"] > metas["tenant-a"]["size"]
    assert metas["tenant-b"]["truncated"] is False


LISTENER = """
import sys, time
from corevault import config
from corevault.agent.coredumps import for_this_kernel
for_this_kernel(config.load(sys.argv[1])).listen().start()
print("ready", flush=True)
time.sleep(3600)
"""


@contextmanager
def listener_process(volume: str) -> Iterator[tuple[config.Settings, subprocess.Popen]]:
    """The agent's coredump listener in a process of its own (so it can be stopped), installed."""
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/state"\n')
    settings = config.load(cfg)
    with sysctl.core_settings():
        proc = subprocess.Popen([sys.executable, "-c", LISTENER, cfg], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            hostsetup.install(None, config_path=cfg, socket=hostsetup.socket_path(settings.state_dir),
                              requests=hostsetup.kernel_socket_mode() == "@@")  # fmt: skip
            try:
                yield settings, proc
            finally:
                hostsetup.uninstall(hostsetup.state_path(settings))
        finally:
            proc.kill()
            proc.wait()
            subprocess.run(["rm", "-rf", d], check=False)


@pytest.mark.skipif(hostsetup.kernel_socket_mode() is None, reason="the coredump socket needs Linux 6.16+")
def test_a_killed_dump_is_truncated_not_captured_socket(rootfs: str, tmp_path) -> None:
    volume = str(tmp_path)
    with listener_process(volume) as (settings, proc):
        kill_while_dumping(rootfs, volume, settings.spool_dir, lambda: proc.pid)
        runc.Container(
            rootfs, ["/app/crasher", "segv"], volume=volume, annotations=pod("tenant-b", "b-0")
        ).run()
        wait_for(lambda: of_namespace(spool.read_journal(settings.spool_dir), "tenant-b"))
        check_journal(spool.read_journal(settings.spool_dir))
