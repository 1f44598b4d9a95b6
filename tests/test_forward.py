"""Two-stage capture: the kernel runs the static corevault-forward, the agent captures warm."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from elftools.elf.elffile import ELFFile

from corevault import config, hostsetup, spool
from corevault.agent.procevents import ProcEvents
from corevault.agent.receiver import Receiver
from testbed import build, sysctl

pytestmark = pytest.mark.crash


@pytest.fixture(scope="module")
def forwarder() -> str:
    out = build.forwarder()
    with open(out, "rb") as f:  # static: no program interpreter, nothing needed from the host
        assert not [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_INTERP"]
    return out


@pytest.fixture
def node(forwarder: str, short_dir: str) -> Iterator[dict]:
    d = short_dir
    os.mkdir(os.path.join(d, "vol"))
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n')
    link = os.path.join(d, "corevault-forward")
    os.symlink(forwarder, link)
    settings = config.load(cfg)
    receiver = Receiver(settings, os.path.join(d, "a.sock"))
    receiver.listen()
    thread = threading.Thread(target=receiver.serve, daemon=True)
    thread.start()
    with sysctl.core_settings() as saved:
        hostsetup.install(link, config_path=cfg, forward_to=receiver.path)
        try:
            yield {"dir": d, "settings": settings, "receiver": receiver, "volume": os.path.join(d, "vol")}
        finally:
            hostsetup.uninstall(os.path.join(d, "s", hostsetup.STATE_NAME))
            assert hostsetup.read_sysctls() == saved
            receiver.close()


def test_a_forwarded_crash_is_captured_by_the_agent(node: dict, rootfs: str) -> None:
    from testbed import runc

    pattern = open("/proc/sys/kernel/core_pattern").read()  # noqa: SIM115
    assert pattern.startswith(f"|{node['dir']}/corevault-forward {node['receiver'].path} %P")
    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    assert c.run().returncode != 0
    assert node["receiver"].wait_idle(60)  # the entry is finished after the process is let go
    [name] = os.listdir(node["volume"])
    [entry] = spool.entries(node["settings"].spool_dir)
    meta = spool.read_meta(node["settings"].spool_dir, entry)
    assert name == f"core-!app!crasher-1-{meta['time']}"
    assert meta["pod"]["container_id"] == c.id and meta["signal"]["name"] == "SIGSEGV"


def test_a_forwarded_core_of_tens_of_mib_arrives_whole_through_the_small_pipe(
    node: dict, rootfs: str
) -> None:
    """The forwarded core's pipe keeps the kernel's 64 KiB: the kernel and the agent take turns
    at every 64 KiB, and every byte the program headers promise still arrives, in both copies."""
    import hashlib

    from testbed import runc

    c = runc.Container(rootfs, ["/app/crasher", "alloc", "48"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    assert c.run().returncode != 0
    assert node["receiver"].wait_idle(60)
    [name] = os.listdir(node["volume"])
    [entry] = spool.entries(node["settings"].spool_dir)
    meta = spool.read_meta(node["settings"].spool_dir, entry)
    assert meta["core"]["size"] > 48 << 20 and not meta["core"]["truncated"]
    digest = hashlib.sha256()
    with open(os.path.join(node["volume"], name), "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert os.path.getsize(os.path.join(node["volume"], name)) == meta["core"]["size"]
    assert digest.hexdigest() == meta["core"]["sha256"]  # the plain copy is the compressed copy's input


def test_the_crashed_process_is_let_go_once_its_core_is_read_not_when_the_capture_ends(
    node: dict, rootfs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder hands the core's pipe over and exits: the agent's copy is then the pipe's
    only reader, and the capture lets the process go once it has read the core, as in socket
    mode, while it goes on storing the binaries and the spool entry. Here that later work is
    held until the crashed container has been reaped (when the forwarder waited for the agent's
    answer, the process was held until the capture ended: this run timed out)."""
    from corevault.capture import buildid
    from testbed import runc

    stored = buildid.store_modules
    go_on, holding = threading.Event(), threading.Event()

    def held(*args: object, **kwargs: object) -> object:
        holding.set()
        go_on.wait(60)
        return stored(*args, **kwargs)

    monkeypatch.setattr(buildid, "store_modules", held)
    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    # the agent's watch of core-signal deaths: no handler process is left for this crash once the
    # forwarder has exited, and the watch must not take it for a dump nobody captured
    events = ProcEvents(node["settings"], grace=2.0)
    assert events.start(), "the kernel's process events connector could not be had"
    try:
        assert c.run(timeout=30).returncode != 0  # reaped while the capture is held
        assert holding.is_set() and not node["receiver"].wait_idle(0)
        assert spool.entries(node["settings"].spool_dir) == []  # not finished yet
        later = time.monotonic() + 20
        events.reconcile()
        events.reconcile(later)
        events.reconcile(later + 20)  # past the grace period twice over, the capture still held
        dropped = [r for r in spool.read_journal(node["settings"].spool_dir) if r.get("event") == "dropped"]
        assert dropped == [], dropped
    finally:
        go_on.set()
        events.close()
    assert node["receiver"].wait_idle(60)
    [entry] = spool.entries(node["settings"].spool_dir)
    meta = spool.read_meta(node["settings"].spool_dir, entry)
    assert meta["pod"]["container_id"] == c.id and not meta["core"]["truncated"]
    assert meta["modules"] and os.listdir(node["settings"].buildid_dir)  # stored after the let-go


def test_with_the_agent_away_the_crash_is_not_held(node: dict, rootfs: str) -> None:
    from testbed import runc

    node["receiver"].close()
    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node["volume"],
                       annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
    assert c.run(timeout=60).returncode != 0  # raises TimeoutExpired if the forwarder held the crash
    assert os.listdir(node["volume"]) == []


@pytest.mark.parametrize("mode", ["pipe", "socket"])
def test_the_agent_installs_captures_and_restores_the_host(
    forwarder: str, rootfs: str, mode: str, short_dir: str
) -> None:
    """``corevault agent --install MODE``: what the DaemonSet runs, for one crash, then SIGTERM.

    In pipe mode the kernel runs the static forwarder, which hands the crash to the agent; in
    socket mode the kernel connects to the agent itself.
    """
    import signal
    import sys

    from testbed import runc

    if mode == "socket" and hostsetup.kernel_socket_mode() != "@@":
        pytest.skip("the coredump socket with requests needs Linux 6.17+")
    install = ["--install", "pipe", "--forwarder", forwarder] if mode == "pipe" else ["--install", "socket"]

    d = short_dir
    os.mkdir(os.path.join(d, "vol"))
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n[agent]\nmetrics = ""\npoll_interval = 0.2\n')
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")

    def start_agent() -> subprocess.Popen:
        agent = subprocess.Popen([cli, "-c", cfg, "agent", *install], stderr=subprocess.PIPE, text=True)
        assert agent.stderr is not None
        watchdog = threading.Timer(60, agent.kill)  # an agent that neither installs nor exits
        watchdog.start()
        for line in agent.stderr:  # EOF if the agent dies first
            if "installed: core_pattern" in line:
                break
        watchdog.cancel()
        assert agent.poll() is None, "the agent exited before installing"
        return agent

    with sysctl.core_settings() as saved:
        killed = start_agent()  # an agent that dies without cleaning up leaves the forwarder installed
        killed.kill()
        killed.wait(timeout=60)
        left = hostsetup.read_sysctls()["core_pattern"]
        assert (
            left.startswith("|") and "corevault-forward" in left if mode == "pipe" else left.startswith("@@")
        )
        agent = start_agent()  # the next one takes over
        try:
            c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=os.path.join(d, "vol"),
                               annotations={"corevault.io/core-pattern": "/data/dump-a/core-%e"})  # fmt: skip
            assert c.run().returncode != 0
            assert os.listdir(os.path.join(d, "vol")) == ["core-crasher"]
            # the agent finishes the entry (after the crashed process is let go), then ships it
            # and its journal line (the spool's journal is emptied as it is shipped)
            deadline, sp = time.monotonic() + 60, os.path.join(d, "s", "spool")
            while time.monotonic() < deadline and (spool.entries(sp) or not _crashes_in(d)):
                time.sleep(0.2)
            assert _crashes_in(d) == 1, "the agent never shipped the crash"

        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        # the host's own values come back, not the ones the killed agent left behind
        assert hostsetup.read_sysctls() == saved
    assert os.path.exists(os.path.join(d, "s", "catalog.db"))
    assert spool.entries(os.path.join(d, "s", "spool")) == []
    assert not os.path.exists(os.path.join(d, "s", "agent.sock"))


def _crashes_in(d: str) -> int:
    """Crashes in the catalog of the agent whose state is ``d/s`` (0 before it made one)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{d}/s/catalog.db?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM crashes").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_only_root_can_hand_the_agent_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """The socket is root-only; should its directory be opened up, the agent still checks the peer."""
    import shutil
    import socket
    import struct

    from corevault.pattern import SPECIFIERS

    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    os.chmod(d, 0o755)  # reachable by the attacker, like a host path someone opened up
    settings = config.Settings(os.path.join(d, "s"))
    receiver = Receiver(settings, os.path.join(d, "run", "a.sock"))
    receiver.listen()
    assert os.stat(receiver.path).st_mode & 0o077 == 0  # nobody but root
    os.chmod(os.path.dirname(receiver.path), 0o777)
    os.chmod(receiver.path, 0o666)  # the attack: a misconfigured host path
    threading.Thread(target=receiver.serve, daemon=True).start()
    args = b"\0".join(a.encode() for a in ["1"] * len(SPECIFIERS)) + b"\0"
    caplog.set_level("WARNING", logger="corevault.agent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the unprivileged attacker
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(receiver.path)
            socket.send_fds(s, [struct.pack("=I", len(args)) + args], [r])
            with contextlib.suppress(ConnectionResetError):  # closed with the message unread
                s.recv(1)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(r)
    os.write(w, b"not a core")
    os.close(w)
    try:
        assert os.waitpid(pid, 0)[1] == 0  # it connected, and was sent away
        assert "uid 65534: not root" in caplog.text
        assert [f for _, _, files in os.walk(settings.state_dir) for f in files] == []
    finally:
        receiver.close()
        shutil.rmtree(d)


RECEIVE_THEN_CRASH = """
import os, sys, threading
from corevault import config
from corevault.agent.receiver import Receiver
receiver = Receiver(config.load(sys.argv[1]), sys.argv[2])
receiver.listen()
threading.Thread(target=receiver.serve, daemon=True).start()
print("listening", flush=True)
sys.stdin.readline()
os.abort()
"""


def test_the_receivers_own_crash_ends_it_and_a_new_receiver_captures_the_next_crash(
    forwarder: str, rootfs: str, short_dir: str
) -> None:
    """core_pattern runs the forwarder, which hands the core to the receiver's socket; a crash
    of the receiver's own process would be handed to itself, with no thread left to read it
    (measured without the defence: the process waited in the kernel, its pipe full, the
    forwarder waiting on it, until SIGKILL). The receiver runs in a child here, as in the agent."""
    from testbed import runc
    from tests.test_socket_mode import crash_own_listener

    d = short_dir
    os.mkdir(os.path.join(d, "vol"))
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/s"\n')
    link = os.path.join(d, "corevault-forward")
    os.symlink(forwarder, link)
    path = os.path.join(d, "a.sock")
    with sysctl.core_settings():
        hostsetup.install(link, config_path=cfg, forward_to=path)
        try:
            status, err = crash_own_listener(
                [sys.executable, "-c", RECEIVE_THEN_CRASH, cfg, path], "receiver"
            )
            assert status == -signal.SIGABRT
            assert "Fatal Python error" in err  # its stacks, in its log
            # As the restarted agent: a new receiver on the same path captures the next crash.
            settings = config.load(cfg)
            receiver = Receiver(settings, path)
            receiver.listen()
            threading.Thread(target=receiver.serve, daemon=True).start()
            try:
                c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=os.path.join(d, "vol"),
                                   annotations={"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"})  # fmt: skip
                assert c.run().returncode != 0
                assert receiver.wait_idle(60)
            finally:
                receiver.close()
            [entry] = spool.entries(settings.spool_dir)
            assert spool.read_meta(settings.spool_dir, entry)["pod"]["container_id"] == c.id
        finally:
            hostsetup.uninstall(os.path.join(d, "s", hostsetup.STATE_NAME))
