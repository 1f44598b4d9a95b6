"""Socket mode: the kernel connects to the agent's listener (``core_pattern = @@SOCKET``).

Real crashes on this 6.18 kernel: host processes (opted in by a host rule) whose wait
status says whether the kernel dumped a core (WCOREDUMP), and runc containers with
Kubernetes cgroup paths. The listener runs in this process, as it runs in the agent.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from corevault import config, hostsetup, spool
from corevault.agent.coredumps import DECIDING, CoredumpListener
from testbed import sysctl
from tests.conftest import gdb_backtrace

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(
        hostsetup.kernel_socket_mode() != "@@", reason="the coredump socket with requests needs Linux 6.17+"
    ),
]
CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
SEED = "/data/dump-a/core-%E-%p-%t"


@dataclass
class Socketed:
    dir: str
    config: str
    settings: config.Settings
    listener: CoredumpListener
    volume: str

    def journal(self) -> list[dict]:
        return spool.read_journal(self.settings.spool_dir)

    def entries(self) -> list[dict]:
        return [spool.read_meta(self.settings.spool_dir, e) for e in spool.entries(self.settings.spool_dir)]

    def settle(self) -> None:
        """Wait until the listener has finished every connection it accepted."""
        assert self.listener.wait_idle(120), "a coredump connection is still being served"


@contextmanager
def socket_capture(requests: bool = True, parallel: int = 8) -> Iterator[Socketed]:
    """corevault in socket mode (``@@``, or plain ``@`` without ``requests``) with its own state; restored after."""
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    volume = os.path.join(d, "vol")
    os.mkdir(volume)
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(
            f'state_dir = "{d}/state"\n[capture]\nstorm_max = 20\n'
            f'[[rules]]\nexe = "*-crasher"\npattern = "{volume}/core-%e-%p-%s-%i"\n'
        )
    settings = config.load(cfg)
    try:
        with sysctl.core_settings() as saved:
            path = hostsetup.socket_path(settings.state_dir)
            listener = CoredumpListener(settings, path, requests, parallel).listen().start()
            hostsetup.install(None, config_path=cfg, socket=listener.path, requests=requests)
            try:
                yield Socketed(d, cfg, settings, listener, volume)
            finally:
                hostsetup.uninstall(hostsetup.state_path(settings))
                listener.close()
                assert hostsetup.read_sysctls() == saved
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def socketed(programs: dict[str, str]) -> Iterator[Socketed]:
    with socket_capture() as s:
        yield s


def _unlimited() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_unlimited, stderr=subprocess.DEVNULL)  # noqa: PLW1509


def crash_own_listener(argv: list[str], what: str) -> tuple[int, str]:
    """Run ``argv``, a listener of the agent's that prints "listening" and then crashes when
    told "crash" while core_pattern points at it; its exit status and its stderr. Fails the
    test when the crash leaves it waiting on its own socket (it would end only by SIGKILL)."""
    child = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_unlimited,  # noqa: PLW1509 (a core limit that would let the kernel dump it)
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "listening\n"
        child.stdin.write("crash\n")
        child.stdin.flush()
        try:
            status = child.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {what}'s crash left it waiting on its own socket (it ends only by SIGKILL)")
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate(timeout=30)
    return status, err


def host_crash(args: list[str]) -> tuple[int, bool, float]:
    """Run a host process that crashes; (pid, whether the kernel dumped a core, seconds to its end)."""
    started = time.monotonic()
    child = start(args)
    _, status = os.waitpid(child.pid, 0)
    assert os.WIFSIGNALED(status), status
    return child.pid, os.WCOREDUMP(status), time.monotonic() - started


def test_a_host_crash_is_captured_with_the_kernels_values(
    socketed: Socketed, programs: dict[str, str]
) -> None:
    pid, dumped, _ = host_crash([programs["crasher"], "segv"])
    socketed.settle()
    assert dumped
    [entry] = socketed.entries()
    assert entry["signal"] == {"number": 11, "name": "SIGSEGV"} and entry["process"]["pid"] == pid
    name = f"core-{os.path.basename(programs['crasher'])[:15]}-{pid}-11-{pid}"  # %e is comm: 15 characters
    assert os.listdir(socketed.volume) == [name]
    bt = gdb_backtrace(programs["crasher"], os.path.join(socketed.volume, name), "/")
    assert "crash_here" in bt
    [captured] = [r for r in socketed.journal() if r["event"] == "captured"]
    assert captured["transport"] == "socket" and captured["pid"] == pid


def test_a_process_that_did_not_opt_in_is_rejected_before_the_kernel_writes(
    socketed: Socketed, programs: dict[str, str]
) -> None:
    """REJECT in the ack: the kernel writes nothing, and says so in the wait status (no WCOREDUMP)."""
    mib = 512
    shutil.copy(programs["crasher"], os.path.join(socketed.dir, "not-opted-in"))
    _, dumped, rejected_s = host_crash([os.path.join(socketed.dir, "not-opted-in"), "alloc", str(mib)])
    socketed.settle()
    assert not dumped
    assert socketed.entries() == [] and os.listdir(socketed.volume) == []
    [skipped] = socketed.journal()
    assert skipped["event"] == "skipped" and "not opted in" in skipped["reason"]
    _, dumped, accepted_s = host_crash([programs["crasher"], "alloc", str(mib)])
    socketed.settle()
    assert dumped and len(socketed.entries()) == 1
    print(
        f"\n{mib} MiB process: {rejected_s:.2f} s to its end when rejected, {accepted_s:.2f} s when captured"
    )


def test_a_crash_storm_costs_at_most_the_configured_cores(
    socketed: Socketed, rootfs: str, programs: dict[str, str]
) -> None:
    """200 crashes of one container: 3 cores (storm_max), 197 rejected before the kernel wrote them."""
    from testbed import runc

    socketed.settings.storm_max = 3  # the listener's own settings object, as the agent would load it
    loop = "i=0; while [ $i -lt 200 ]; do /app/crasher segv; i=$((i+1)); done; exit 1"
    c = runc.Container(rootfs, ["/bin/sh", "-c", loop], volume=socketed.volume,
                       annotations={"corevault.io/core-pattern": SEED})  # fmt: skip
    c.run(timeout=300)
    socketed.settle()
    assert len(socketed.entries()) == 3
    assert len(os.listdir(socketed.volume)) == 3
    assert socketed.listener.outcomes == {"captured": 3, "rejected": 197}
    storms = [r for r in socketed.journal() if r["event"] == "dropped"]
    # a crash arriving while two earlier ones of the pod still finish (hash, binaries) is refused
    # for the pod's share of dump slots before the storm limit is asked; the three cores kept
    # (above) say the storm limit is what ended the loop's cores
    assert len(storms) == 197 and all(
        "crash storm" in r["reason"] or "dumps of this pod are being captured already" in r["reason"]
        for r in storms
    )
    [meta] = socketed.entries()[:1]
    assert meta["pod"]["container_id"] == c.id and meta["volume"]["path"].startswith(
        "/data/dump-a/core-!app!crasher-"
    )


def test_a_pod_that_did_not_opt_in_is_rejected(socketed: Socketed, rootfs: str) -> None:
    from testbed import runc

    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=socketed.volume)  # no annotation
    assert c.run().returncode != 0
    socketed.settle()
    assert socketed.listener.outcomes == {"rejected": 1}
    assert socketed.entries() == [] and os.listdir(socketed.volume) == []
    [skipped] = socketed.journal()
    assert skipped["event"] == "skipped" and skipped["pod"]["container_id"] == c.id


def test_several_crashes_at_once_are_served_in_parallel_within_a_bound(
    socketed: Socketed, programs: dict[str, str]
) -> None:
    procs = [start([programs["crasher"], "alloc", "64"]) for _ in range(4)]
    statuses = [os.waitpid(p.pid, 0)[1] for p in procs]
    socketed.settle()
    assert all(os.WCOREDUMP(s) for s in statuses)
    assert len(socketed.entries()) == 4 and len(os.listdir(socketed.volume)) == 4
    # Every core reader busy: the next crash is rejected at once instead of waiting for one.
    for _ in range(socketed.listener.parallel):
        socketed.listener.dumps.acquire()
    try:
        _, dumped, _ = host_crash([programs["crasher"], "segv"])
    finally:
        for _ in range(socketed.listener.parallel):
            socketed.listener.dumps.release()
    assert not dumped
    assert any("reads as many dumps as it may at once" in r.get("reason", "") for r in socketed.journal())
    # Every connection busy: the same, before the crash is even looked at.
    for _ in range(socketed.listener.parallel * DECIDING):
        socketed.listener.slots.acquire()
    try:
        _, dumped, _ = host_crash([programs["crasher"], "segv"])
    finally:
        for _ in range(socketed.listener.parallel * DECIDING):
            socketed.listener.slots.release()
    assert not dumped
    assert any("connections are being served already" in r.get("reason", "") for r in socketed.journal())


def test_only_the_kernel_is_served(socketed: Socketed) -> None:
    """A process that connects by itself (root: the socket is root-only) is not taken for a crash."""
    assert os.stat(socketed.listener.path).st_mode & 0o077 == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socketed.listener.path)
        try:
            s.sendall(b"\x10\x00\x00\x00\x10\x00\x00\x00\x0f\x00\x00\x00\x00\x00\x00\x00")
            answer = s.recv(16)
        except (BrokenPipeError, ConnectionResetError):  # refused before or after our request arrived
            answer = b""
        assert answer == b""  # no coredump_ack: it was not taken for the kernel
    socketed.settle()
    assert socketed.entries() == []
    [refused] = socketed.journal()
    assert refused["event"] == "refused" and refused["reason"] == "not a kernel coredump connection"


def test_install_mode_auto_and_status(socketed: Socketed) -> None:
    """With a listener, auto picks the socket; status names the mode and notices a dead listener."""

    handler = os.path.join(socketed.dir, "h")  # short: the pipe pattern must fit the kernel's 127 bytes
    os.symlink(hostsetup.default_handler(), handler)

    def cli(*args: str) -> subprocess.CompletedProcess:
        if args[0] == "install":
            args = (*args, "--handler", handler)
        return subprocess.run(
            [CLI, "-c", socketed.config, *args], capture_output=True, text=True, check=False
        )

    out = cli("install")
    assert out.returncode == 0 and "installed (socket mode): core_pattern = @@" in out.stdout, out.stderr
    status = cli("status")
    assert status.returncode == 0 and "yes (socket mode)" in status.stdout
    piped = cli("install", "--mode", "pipe")
    assert "installed (pipe mode): core_pattern = |" in piped.stdout, piped.stderr
    cli("install", "--mode", "socket")
    socketed.listener.close()
    dead = cli("status")
    assert dead.returncode == 1 and "where nothing listens: every crash is lost" in dead.stderr
    refused = cli("install", "--mode", "socket")
    assert refused.returncode == 1 and "nothing listens on" in refused.stderr
    assert "installed (pipe mode)" in cli("install").stdout  # auto falls back to the pipe


def test_a_host_agent_hands_over_to_the_pipe_while_it_is_away(programs: dict[str, str]) -> None:
    """``corevault install --mode socket`` on a host: stopping the agent leaves the pipe handler in its
    place (a crash then is still captured), starting it again takes the socket back."""
    import signal

    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    os.mkdir(os.path.join(d, "vol"))
    handler = os.path.join(d, "h")
    os.symlink(hostsetup.default_handler(), handler)
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[agent]\nmetrics = ""\nanalyze = false\n'
                f'[[rules]]\nexe = "*-crasher"\npattern = "{d}/vol/core-%p"\n')  # fmt: skip
    socket_pattern = "@@" + hostsetup.socket_path(f"{d}/s")

    def start_agent() -> subprocess.Popen:
        agent = subprocess.Popen([CLI, "-c", cfg, "agent", "--handler", handler], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not hostsetup.listening(hostsetup.socket_path(f"{d}/s")):
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start listening"
            time.sleep(0.05)
        return agent

    def stop(agent: subprocess.Popen) -> None:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0

    try:
        with sysctl.core_settings() as saved:
            agent = start_agent()
            try:
                out = subprocess.run(
                    [CLI, "-c", cfg, "install", "--mode", "socket"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert out.returncode == 0, out.stderr
                assert hostsetup.read_sysctls()["core_pattern"] == socket_pattern
            finally:
                stop(agent)
            assert hostsetup.read_sysctls()["core_pattern"].startswith(f"|{handler} ")
            pid, dumped, _ = host_crash([programs["crasher"], "segv"])  # the agent is away
            assert dumped and os.listdir(os.path.join(d, "vol")) == [f"core-{pid}"]
            agent = start_agent()
            try:
                deadline = time.monotonic() + 60
                while hostsetup.read_sysctls()["core_pattern"] != socket_pattern:
                    assert time.monotonic() < deadline, "the agent did not take the socket back"
                    time.sleep(0.05)
            finally:
                stop(agent)
            hostsetup.uninstall(os.path.join(d, "s", hostsetup.STATE_NAME))
            assert hostsetup.read_sysctls() == saved  # the host's own values, kept through both hand-overs
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_plain_socket_mode_of_linux_6_16(programs: dict[str, str]) -> None:
    """``@SOCKET``: no request, the kernel writes at once; a crash that did not opt in is cut off by
    closing the connection, and nothing of it is kept."""
    with socket_capture(requests=False) as s:
        assert hostsetup.read_sysctls()["core_pattern"] == "@" + s.listener.path
        pid, dumped, _ = host_crash([programs["crasher"], "segv"])
        s.settle()
        assert dumped
        [entry] = s.entries()
        assert entry["signal"]["number"] == 11 and entry["process"]["pid"] == pid
        shutil.copy(programs["crasher"], os.path.join(s.dir, "not-opted-in"))
        host_crash([os.path.join(s.dir, "not-opted-in"), "segv"])
        s.settle()
        assert len(s.entries()) == 1 and len(os.listdir(s.volume)) == 1
        assert s.listener.outcomes == {"captured": 1, "rejected": 1}
