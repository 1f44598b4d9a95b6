"""A pod's volume that stops answering writes never holds what the node shares, in every transport.

Tenant A's pod asks its plain core into a volume that is a bucket mounted through FUSE
(``rclone mount`` of a SeaweedFS bucket, as an OSS volume is) whose object store stops answering
(SIGSTOP) before A crashes: rclone takes the request for A's core and waits on the store, and
the writer waits on rclone. That wait is the kernel's uninterruptible one (tried here: a
process so blocked and sent SIGKILL stays, in state D, until the store answers), so the pipe
handler's process cannot end while it lasts. The node has one slot for a dump being read: a
``core_pipe_limit`` of 1 for the pipe handler and the forwarder (the kernel skips every other
dump while one is held), one core reader for the coredump socket and the forwarder's receiver.
A's copy into the volume must be given up after the stall rule (``STALL`` seconds without
progress), its process let go, its core kept whole in the spool with a record that says the
volume failed, while its writer stays stuck and counted; tenant B's crash meanwhile is captured
whole, and A's next crash skips the volume at once. Once the server answers, the stuck writer
ends and gives its count back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import pytest
import zstandard
from botocore.config import Config

from corevault import config, hostsetup, spool
from corevault.agent.receiver import Receiver
from corevault.capture import stream, stuckwriters
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import build, fusefs, runc, servers, sysctl
from testbed.capture import installed_capture
from tests.conftest import starts_servers
from tests.tenants import of_namespace, pod, processes
from tests.test_socket_mode import socket_capture
from tests.waiting import wait_for

pytestmark = [pytest.mark.crash, pytest.mark.servers]

#: the dump's deadline here: longer than the waits below, so that a dump held until it would fail them
TIMEOUT = 90


@dataclass
class Node:
    spool: str
    state: str
    volume: str  # tenant B's volume, on local disk
    #: the forwarder's receiver, which captures on after the kernel has let the process go
    receiver: Receiver | None = None

    def journal(self, namespace: str) -> list[dict]:
        return of_namespace(spool.read_journal(self.spool), namespace)

    def entries(self, namespace: str) -> list[tuple[str, dict]]:
        found = [(e, spool.read_meta(self.spool, e)) for e in spool.entries(self.spool)]
        return [(e, m) for e, m in found if m["pod"]["namespace"] == namespace]


@contextmanager
def pipe_node() -> Iterator[Node]:
    with installed_capture() as cap:
        cap.configure(f"[capture]\ntimeout = {TIMEOUT}\n")
        write_sysctl(SYSCTLS["core_pipe_limit"], "1")  # restored with the host's other settings
        yield Node(cap.spool, cap.state_dir, cap.volume)


@contextmanager
def socket_node() -> Iterator[Node]:
    with socket_capture(parallel=1) as s:
        s.settings.timeout = TIMEOUT
        yield Node(s.settings.spool_dir, s.settings.state_dir, s.volume)


@contextmanager
def forwarder_node() -> Iterator[Node]:
    d = tempfile.mkdtemp(prefix="cv-", dir="/tmp")
    try:
        os.mkdir(os.path.join(d, "vol"))
        cfg = os.path.join(d, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{d}/s"\n[capture]\ntimeout = {TIMEOUT}\n')
        link = os.path.join(d, "corevault-forward")
        os.symlink(build.forwarder(), link)
        settings = config.load(cfg)
        receiver = Receiver(settings, os.path.join(d, "a.sock"), parallel=1)
        receiver.listen()
        threading.Thread(target=receiver.serve, daemon=True).start()
        try:
            with sysctl.core_settings() as saved:
                hostsetup.install(link, config_path=cfg, forward_to=receiver.path)
                write_sysctl(SYSCTLS["core_pipe_limit"], "1")
                try:
                    yield Node(settings.spool_dir, settings.state_dir, os.path.join(d, "vol"), receiver)
                finally:
                    hostsetup.uninstall(hostsetup.state_path(settings))
                    assert hostsetup.read_sysctls() == saved
        finally:
            receiver.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


NODES = {"pipe": pipe_node, "socket": socket_node, "forwarder": forwarder_node}


@pytest.fixture(scope="module")
@starts_servers
def weed() -> Iterator[servers.Seaweed]:
    with servers.seaweed() as w:
        yield w


@contextmanager
def hanging_bucket(weed: servers.Seaweed) -> Iterator[fusefs.Mount]:
    """A new bucket mounted with ``rclone mount`` (no cache: it uploads as the file is written); the
    store is let go on again on the way out, also when the test fails."""
    s3 = boto3.client(
        "s3", endpoint_url=weed.endpoint, aws_access_key_id=servers.KEY, aws_secret_access_key=servers.SECRET,
        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
    )  # fmt: skip
    bucket = f"stall-{os.urandom(6).hex()}"
    s3.create_bucket(Bucket=bucket)
    try:
        with fusefs.mounted("rclone", weed, bucket) as mount:
            yield mount
    finally:
        assert weed.proc is not None
        os.kill(weed.proc.pid, signal.SIGCONT)


def stuck_writers(state_dir: str) -> list[str]:
    """The stuck-writer slots held now (pod, namespace and node ones), by file name."""
    d = os.path.join(state_dir, stuckwriters.KIND)
    held = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(name)
        finally:
            os.close(fd)
    return held


def assert_whole(node: Node, entry: str, meta: dict) -> None:
    """The spool's copy is the whole core the kernel wrote, and its record says so."""
    assert meta["core"]["truncated"] is False and "expected_size" not in meta["core"]
    with open(os.path.join(spool.ready_dir(node.spool), entry, spool.CORE_NAME), "rb") as f:
        plain = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    assert len(plain) == meta["core"]["size"] > 0 and plain[:4] == b"\x7fELF"
    assert hashlib.sha256(plain).hexdigest() == meta["core"]["sha256"]


@pytest.mark.parametrize("transport", list(NODES))
def test_a_volume_that_stops_answering_writes_holds_nothing_of_the_node(
    transport: str, rootfs: str, weed: servers.Seaweed
) -> None:
    if transport == "socket" and hostsetup.kernel_socket_mode() != "@@":
        pytest.skip("the coredump socket with requests needs Linux 6.17+")
    assert weed.proc is not None
    with NODES[transport]() as node, hanging_bucket(weed) as served:
        # (processes that touch nothing on the volume: one blocked on it would never get the signal)
        a = runc.Container(rootfs, ["/bin/sh", "-c", "sleep 86399 & sleep 86398 & echo ready; wait"],
                           volume=served.path, annotations=pod("tenant-a", "a-0"))  # fmt: skip
        with a.running():
            [first] = wait_for(lambda: processes(b"sleep\x0086399"), "A's first process", 30)
            [second] = wait_for(lambda: processes(b"sleep\x0086398"), "A's second process", 30)
            os.kill(weed.proc.pid, signal.SIGSTOP)  # the bucket's store answers no more
            os.kill(first, signal.SIGSEGV)

            # The copy into the volume is given up after the stall rule: the process is let go
            # (the node's one dump slot with it) and the core is kept whole in the spool.
            wait_for(lambda: not os.path.exists(f"/proc/{first}"), "A's crashed process let go", 40)
            [(entry, meta)] = wait_for(lambda: node.entries("tenant-a"), "A's spool entry", 30)
            assert_whole(node, entry, meta)
            assert meta["volume"]["written"] is False
            assert "stopped answering" in meta["volume"]["error"]
            assert f"no progress for {stream.STALL}s" in meta["volume"]["error"]
            wait_for(lambda: len(node.journal("tenant-a")) >= 2, "A's records", 30)
            events = sorted((r["event"], r.get("reason", "")) for r in node.journal("tenant-a"))
            assert [e for e, _ in events] == ["captured", "dropped"]
            assert (
                events[1][1].startswith("volume: the volume stopped answering") and "repair" in events[1][1]
            )
            # its writer is still stuck there, and counted: once for the pod, namespace and node
            assert len(stuck_writers(node.state)) == 3 and "node.0" in stuck_writers(node.state)

            # Another tenant's crash meanwhile: captured whole, nothing of it dropped.
            b = runc.Container(
                rootfs, ["/app/crasher", "segv"], volume=node.volume, annotations=pod("tenant-b", "b-0")
            )
            b.run()
            wait_for(lambda: node.journal("tenant-b"), "B's record", 30)
            assert [r["event"] for r in node.journal("tenant-b")] == ["captured"]
            [(b_entry, b_meta)] = node.entries("tenant-b")
            assert_whole(node, b_entry, b_meta)
            [b_core] = [os.path.join(dp, f) for dp, _, fs in os.walk(node.volume) for f in fs]
            assert os.path.getsize(b_core) == b_meta["core"]["size"] and b_meta["volume"]["written"]

            # A's next crash skips its volume at once (no second writer), its core kept.
            os.kill(second, signal.SIGSEGV)
            wait_for(lambda: len(node.entries("tenant-a")) == 2, "A's second spool entry", 30)
            [(entry2, meta2)] = [(e, m) for e, m in node.entries("tenant-a") if e != entry]
            assert_whole(node, entry2, meta2)
            assert "still stuck on its volume" in meta2["volume"]["error"]
            skipped = wait_for(  # journaled once the entry is in the spool
                lambda: [r for r in node.journal("tenant-a") if "still stuck" in r.get("reason", "")],
                "A's skipped volume in the journal", 30,
            )  # fmt: skip
            assert [r["event"] for r in skipped] == ["dropped"]
            assert len(stuck_writers(node.state)) == 3

        # The store answers again: the stuck writer ends and gives its count back; nothing of the
        # given-up copy is published under a core's name.
        os.kill(weed.proc.pid, signal.SIGCONT)
        wait_for(lambda: not stuck_writers(node.state), "the stuck writer's end", 90)
        assert [n for n in os.listdir(served.path) if not n.startswith(".corevault-")] == []
