"""A writer stuck on a pod's own FUSE volume is ended by the agent past the dump's deadline.

Tenant A (:mod:`testbed.podfuse`: /dev/fuse and CAP_SYS_ADMIN in its namespaces) mounts its own
FUSE filesystem over the directory its core pattern names in its volume, stops its server
(SIGSTOP) and crashes. Under the forwarder and the coredump socket, the agent copies A's core: its
writer, a thread of the agent's, waits on the server (the ``opendir`` of the mount's root) and is given up
after the stall rule, but stays, holding stuck-writer slots of A's pod, namespace and node, for
as long as the server sleeps. (A pipe handler's writer of it ended here with the handler's
process: the stopped server never read the request, and a wait for an unread request ends on a
fatal signal.) Seven writers stuck elsewhere (slots held by the test) fill the node's eight with
A's: without the agent, every other pod's copy into its volume is skipped. Past ``[capture]
timeout`` since the give-up, the agent aborts A's connection: A's writer ends, its slots come
back, and tenant B's copy is written. A FUSE mount the host lists (a node's mount, served into
the pod as its volume) is never aborted: the agent says why and leaves it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from corevault import config, hostsetup, spool
from corevault.agent import stuckdumps
from corevault.agent.loop import Agent
from corevault.capture import policy, stream, stuckwriters
from testbed import fusefs, podfuse, runc
from tests import test_volume_stall
from tests.tenants import pod, processes
from tests.test_volume_stall import stuck_writers
from tests.waiting import wait_for

pytestmark = pytest.mark.crash

#: the dump's deadline, [capture] timeout: longer than the stall rule (the handler finishes A's
#: entry first); past it, counted from the give-up, the agent aborts
DEADLINE = 8
#: the directory A's core pattern names, on which A mounts its own FUSE filesystem
OWN = f"{runc.VOLUME_PATH}/own"
#: writers stuck on other pods' volumes: with A's, the node's NODE_MAX
OTHERS = stuckwriters.NODE_MAX - 1


@pytest.fixture(scope="module")
def fuse_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return podfuse.rootfs(str(tmp_path_factory.mktemp("podfuse") / "root"))


@contextmanager
def others_stuck(state_dir: str) -> Iterator[None]:
    """``OTHERS`` node slots of stuck writers, held as other pods' writers would hold them."""
    held = [
        policy.take_slot(state_dir, "node", stuckwriters.NODE_MAX, stuckwriters.KIND) for _ in range(OTHERS)
    ]
    try:
        assert None not in held
        yield
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)


def aborts(spool_dir: str, agent: Agent) -> list[dict]:
    records = agent.shipped + spool.read_journal(spool_dir)  # type: ignore[attr-defined]
    return [r for r in records if r.get("source") == "stuck volume writers"]


def of_pod(spool_dir: str, uid: str) -> list[dict]:
    entries = [spool.read_meta(spool_dir, e) for e in spool.entries(spool_dir)]
    return [m for m in entries if m["pod"]["uid"] == uid]


def given_up(spool_dir: str, uid: str) -> list[dict]:
    """The pod's spool entry, once its copy into the volume was given up."""
    return [m for m in of_pod(spool_dir, uid) if "stopped answering" in m["volume"].get("error", "")]


@pytest.mark.parametrize("transport", ["forwarder", "socket"])
def test_the_agent_aborts_a_pods_own_fuse_volume_its_stuck_writer_waits_on(
    transport: str, monkeypatch: pytest.MonkeyPatch, fuse_rootfs: str, rootfs: str, tmp_path
) -> None:
    """The agent's receiver (under the forwarder) or its coredump socket's listener copies A's
    core into A's volume: its writer is a thread of the agent's, which nothing but an answer or
    an abort ends."""
    if transport == "socket" and hostsetup.kernel_socket_mode() != "@@":
        pytest.skip("the coredump socket with requests needs Linux 6.17+")
    monkeypatch.setattr(test_volume_stall, "TIMEOUT", DEADLINE)
    with test_volume_stall.NODES[transport]() as node, others_stuck(node.state):
        agent = agent_in(node)
        agent.settings.timeout = DEADLINE  # (the socket node's is set on its listener's settings)
        a_volume = tmp_path / "a"
        a_volume.mkdir()
        annotations = pod("tenant-a", "a-0", f"{OWN}/core-%p")
        a = podfuse.container(fuse_rootfs, str(a_volume), annotations, victim="busybox sleep 1000", mount=OWN)
        with a.running():
            conns = wait_for(lambda: podfuse.connections(a.pid()), "A's FUSE mount")
            try:
                podfuse.go(str(a_volume))  # A stops its server and crashes
                [meta] = wait_for(lambda: given_up(node.spool, a.pod_uid), "A's copy given up", 30)
                assert f"no progress for {stream.STALL}s" in meta["volume"]["error"]
                assert meta["core"]["truncated"] is False and meta["core"]["size"] > 0
                # A's writer waits on, counted for its pod, its namespace and the node's last slot
                wait_for(lambda: len(stuck_writers(node.state)) == OTHERS + 3, "A's stuck writer")
                assert stuckwriters.blocked(agent.settings, ("p-other", "n-other")) is not None

                agent.pass_once()
                assert aborts(node.spool, agent) == [], "aborted before the deadline"
                # without the agent, A's writer and its slots stay for as long as A's server sleeps
                wait_for(lambda: agent.pass_once() is not None and aborts(node.spool, agent), "the abort", 30)
                wait_for(
                    lambda: stuck_writers(node.state) == [f"node.{i}" for i in range(OTHERS)],
                    "A's stuck slots back", 30,
                )  # fmt: skip

                b_annotations = pod("tenant-b", "b-0", f"{runc.VOLUME_PATH}/core-%p")
                b = runc.Container(
                    rootfs, ["/app/crasher", "segv"], volume=node.volume, annotations=b_annotations
                )
                assert b.run().returncode != 0
                [b_meta] = wait_for(lambda: of_pod(node.spool, b.pod_uid), "B's entry", 30)
                assert b_meta["volume"]["written"] is True, b_meta["volume"]
                [b_core] = os.listdir(node.volume)
                assert os.path.getsize(os.path.join(node.volume, b_core)) == b_meta["core"]["size"]
            finally:
                podfuse.abort_connections(conns)
        [record] = aborts(node.spool, agent)
        assert record["event"] == "dropped" and record["pod"]["uid"] == a.pod_uid
        assert f"own FUSE server of its volume {OWN} stopped answering" in record["reason"]
        assert agent.metrics.registry.get_sample_value("corevault_stuck_fuse_aborted_total") == 1
        agent.pass_once()  # the writer ended: its record goes
        assert os.listdir(os.path.join(node.state, stuckwriters.MOUNTS)) == []


def test_a_fuse_volume_the_host_lists_is_never_aborted(
    monkeypatch: pytest.MonkeyPatch, rootfs: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pod's volume is a FUSE mount of the node's (the host's mount namespace lists it, as a
    CSI driver's bucket): its server stops, the pod's writer is stuck past the deadline, and the
    agent says why it leaves it, and aborts nothing."""
    monkeypatch.setattr(test_volume_stall, "TIMEOUT", DEADLINE)
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    server = subprocess.Popen([podfuse.FUSE_OVERLAYFS, "-f", "-o", f"lowerdir={lower}", str(mnt)])
    try:
        wait_for(lambda: os.path.ismount(mnt), "the host's FUSE mount")
        with test_volume_stall.forwarder_node() as node:
            agent = agent_in(node)
            annotations = pod("tenant-c", "c-0", f"{runc.VOLUME_PATH}/core-%p")
            c = runc.Container(rootfs, ["/bin/sh", "-c", "sleep 86397 & echo ready; wait"], volume=str(mnt),
                               annotations=annotations)  # fmt: skip
            with c.running(), caplog.at_level(logging.WARNING, logger="corevault.agent"):
                [victim] = wait_for(lambda: processes(b"sleep\x0086397"), "C's process", 30)
                os.kill(server.pid, signal.SIGSTOP)
                os.kill(victim, signal.SIGSEGV)
                wait_for(lambda: given_up(node.spool, c.pod_uid), "C's copy given up", 30)
                wait_for(lambda: len(stuck_writers(node.state)) == 3, "C's stuck writer")
                deadline = time.monotonic() + DEADLINE + 2
                while time.monotonic() < deadline:
                    agent.pass_once()
                    time.sleep(0.5)
                assert aborts(node.spool, agent) == []
                assert len(stuck_writers(node.state)) == 3
                [said] = [
                    r.getMessage() for r in caplog.records if "stuck on the FUSE volume" in r.getMessage()
                ]
                assert "not its pod's alone (the host's mount namespace lists it): not aborted" in said
                assert stuckdumps.connection(_device(mnt)) in stuckdumps.live_connections()
                os.kill(server.pid, signal.SIGCONT)
                wait_for(lambda: not stuck_writers(node.state), "C's writer's end", 30)
    finally:
        server.send_signal(signal.SIGCONT)
        fusefs.unmount(str(mnt))
        server.kill()
        server.wait()


def agent_in(node: test_volume_stall.Node) -> Agent:
    """The node's agent, its journal records shipped kept in ``agent.shipped``."""
    shipped: list[dict] = []
    agent = Agent(config.load(os.path.join(os.path.dirname(node.state), "c.toml")), on_record=shipped.append)
    agent.shipped = shipped  # type: ignore[attr-defined]
    return agent


def _device(mount_point) -> bytes:
    """``major:minor`` of the host's mount at ``mount_point``, from the host's mountinfo."""
    with open("/proc/self/mountinfo", "rb") as f:
        [dev] = [line.split()[2] for line in f if line.split()[4] == str(mount_point).encode()]
    return dev
