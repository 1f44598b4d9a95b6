"""A pod's own FUSE server that stops answering during the pod's dump holds nothing of the node.

The pod (:mod:`testbed.podfuse`: /dev/fuse and CAP_SYS_ADMIN in its namespaces) runs its own
FUSE server, runs an executable from it, stops the server (SIGSTOP) and dumps core. Every
``getattr``, ``open`` or ``read`` of that file now waits on the stopped server, uninterruptibly
once sent; the handler must never ask: the executable is listed as not read, with why, and the
core is captured whole. Each test aborts the pod's FUSE connections in a ``finally``, so that a
handler or a dump stuck on them (without the defence) ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from corevault import config, spool
from corevault.agent import stuckdumps
from corevault.agent.loop import Agent
from corevault.agent.receiver import Receiver
from corevault.capture import buildid, cgroup
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import fusefs, podfuse, runc
from testbed.capture import Capture
from tests import test_volume_stall
from tests.waiting import wait_for

pytestmark = pytest.mark.crash

PATTERN = {"corevault.io/core-pattern": "/data/dump-a/core-%p"}
WAIT_FOR_GO = f"while [ ! -e {runc.VOLUME_PATH}/{podfuse.GO} ]; do sleep 0.05; done"
#: the dumps' deadline, [capture] timeout, in the agent's tests
DEADLINE = 3


@pytest.fixture(scope="module")
def fuse_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return podfuse.rootfs(str(tmp_path_factory.mktemp("podfuse") / "root"))


def records(capture: Capture, pod: runc.Container) -> list[dict]:
    return [r for r in capture.journal() if (r.get("pod") or {}).get("uid") == pod.pod_uid]


def dumped(capture: Capture, pod: runc.Container) -> list[dict]:
    return [r for r in records(capture, pod) if r.get("event") != "skipped"]


def captured_with_its_server_stopped(capture: Capture, fuse_rootfs: str, **kw: str) -> dict:
    """The pod's process (``victim``) dumps once its FUSE server is stopped; the crash's metadata,
    once its handler recorded it as captured (without the defence it waits on the stopped server,
    uninterruptibly, and no record comes)."""
    capture.configure("[capture]\ntimeout = 60\n")
    pod = podfuse.container(fuse_rootfs, capture.volume, PATTERN, **kw)
    with pod.running():
        conns = podfuse.connections(pod.pid())
        assert len(conns) == 1, "the pod's FUSE server did not mount"
        try:
            podfuse.go(capture.volume)
            wait_for(lambda: dumped(capture, pod), "the pod's crash to be recorded", timeout=30)
        finally:
            podfuse.abort_connections(conns)
    [record] = dumped(capture, pod)
    assert record["event"] == "captured", record
    [meta] = [m for m in capture.entries() if m["pod"]["uid"] == pod.pod_uid]
    return meta


def test_the_handler_never_asks_the_pods_own_fuse_server(capture: Capture, fuse_rootfs: str) -> None:
    meta = captured_with_its_server_stopped(capture, fuse_rootfs)
    assert meta["core"]["truncated"] is False and meta["core"]["size"] > 0
    exe = {m["path"]: m for m in meta["modules"]}[f"{podfuse.MOUNT}/busybox"]
    assert exe["sha256"] is None and "pod's own FUSE filesystem" in exe["stored"], exe


#: the pod's process run from an overlayfs the pod mounts over its own FUSE mount: the overlay
#: is no FUSE mount, its files' pages come from the FUSE server
OVERLAID = (
    f"busybox sh -c 'mkdir -p /tmp/e /tmp/o && mount -t overlay ov -o lowerdir={podfuse.MOUNT}:/tmp/e /tmp/o "
    "&& exec /tmp/o/busybox sleep 1000'"
)


def test_an_overlay_over_the_pods_own_fuse_mount_is_not_read(capture: Capture, fuse_rootfs: str) -> None:
    """The pod runs busybox from an overlayfs over its own FUSE mount, stops its server and dumps:
    the overlay's files come from the stopped server. Taken for any other mount, the handler read
    the executable and waited on the server, and no record came."""
    meta = captured_with_its_server_stopped(capture, fuse_rootfs, victim=OVERLAID)
    exe = {m["path"]: m for m in meta["modules"]}["/tmp/o/busybox"]
    assert exe["sha256"] is None and "pod's own stacked filesystem" in exe["stored"], exe


def test_an_erofs_image_on_the_pods_own_fuse_mount_is_not_read(capture: Capture, fuse_rootfs: str) -> None:
    """The pod mounts an erofs image that lies on its own FUSE mount (the kernel reads the image
    file, so the FUSE server serves every page), runs busybox from it, stops its server and dumps.
    Taken for a filesystem the kernel serves alone (neither FUSE nor stacked), the handler hashed
    the executable, waited on the server, and no record came."""
    victim = podfuse.on_erofs(f"{podfuse.EROFS}/busybox sleep 1000")
    meta = captured_with_its_server_stopped(capture, fuse_rootfs, victim=victim, prelude=podfuse.WITH_IMAGE)
    exe = {m["path"]: m for m in meta["modules"]}[f"{podfuse.EROFS}/busybox"]
    assert exe["sha256"] is None and "pod's own filesystem (erofs" in exe["stored"], exe


#: 300 small files of the pod's tmpfs, mapped below the swapped file (the handler meets them first),
#: and busybox copied onto that tmpfs
SWAP_PRELUDE = (
    "mkdir -p /tmp/many && for i in $(busybox seq 300); do echo $i > /tmp/many/$i; done "
    "&& busybox cp /bin/busybox /tmp/x || exit 1"
)


def test_a_mapping_swapped_for_a_file_of_the_pods_fuse_mount_is_not_read(
    capture: Capture, fuse_rootfs: str
) -> None:
    """Maps says /tmp/x, on the pod's tmpfs, when the handler reads it; a process sharing the
    crashed process's memory (not a thread: it runs on while the kernel dumps) then maps the pod's
    FUSE busybox at the same addresses (``mapswap``, once the handler opens the first of 300 files
    mapped below it),
    so map_files holds a file of the stopped server under that range. Judged by the device maps
    gave, the handler opened it, waited on the server, and no record came."""
    victim = f"/app/mapswap /tmp/many /tmp/x {podfuse.MOUNT}/busybox"
    meta = captured_with_its_server_stopped(capture, fuse_rootfs, victim=victim, prelude=SWAP_PRELUDE)
    swapped = {m["path"]: m for m in meta["modules"]}["/tmp/x"]
    assert swapped["sha256"] is None and "pod's own FUSE filesystem" in swapped["stored"], swapped


def test_a_fuse_mount_the_host_sees_is_read_as_any_other(tmp_path) -> None:
    """A FUSE mount in the host's mount namespace is the node's (a CSI driver's bucket mount),
    served by the node's daemon: the binaries a process mapped from it are read and identified."""
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    shutil.copy2("/bin/sleep", lower / "sleep")
    server = subprocess.Popen([podfuse.FUSE_OVERLAYFS, "-f", "-o", f"lowerdir={lower}", str(mnt)])
    try:
        wait_for(lambda: os.path.ismount(mnt), "the host's FUSE mount")
        sleeper = subprocess.Popen([str(mnt / "sleep"), "100"])
        try:
            maps = Path(f"/proc/{sleeper.pid}/maps")
            wait_for(lambda: str(mnt / "sleep") in maps.read_text(), "the mapping")
            proc_fd = os.open(f"/proc/{sleeper.pid}", os.O_PATH | os.O_DIRECTORY)
            try:
                with open(f"/proc/{sleeper.pid}/maps") as f:
                    held, _ = buildid.hold_modules(proc_fd, f.read())
                found, _ = buildid.identify_modules(held)
            finally:
                os.close(proc_fd)
            exe = {m.path: m for m in found}[str(mnt / "sleep")]
            assert exe.stored is None and exe.build_id is not None and exe.fd >= 0
            os.close(exe.fd)
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        fusefs.unmount(str(mnt))
        server.kill()
        server.wait()


def stuck_in_dump(uid: str) -> list[int]:
    """The processes of the pod ``uid`` that the kernel dumps with a task in state D."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError), stuckdumps.Proc(int(name)) as proc:
            info = cgroup.parse(proc.read("cgroup").decode())
            if stuckdumps.dumping(proc) and info is not None and info.pod_uid == uid:
                found.append(int(name))
    return found


def agent_of(capture: Capture, text: str) -> Agent:
    """The agent, its journal records shipped kept in ``agent.shipped``."""
    capture.configure(text)
    write_sysctl(SYSCTLS["core_pipe_limit"], "1")  # restored with the host's other settings
    shipped: list[dict] = []
    agent = Agent(config.load(capture.config), on_record=shipped.append)
    agent.shipped = shipped  # type: ignore[attr-defined]
    return agent


def aborts(node: Capture | PipeNode, agent: Agent) -> list[dict]:
    """The journal's abort records, shipped by the agent's passes or still in the spool."""
    records = agent.shipped + node.journal()  # type: ignore[attr-defined]
    return [r for r in records if r.get("source") == "stuck dumps"]


@dataclass
class PipeNode:
    """A node whose core_pattern is a pipe: the handler's, or the forwarder's to the agent."""

    config: str
    volume: str
    spool: str
    #: waits until the agent's receiver has finished what it was handed (the forwarder exits
    #: once it has handed a crash over, so its end says nothing of the capture's)
    receiver: Receiver | None = None

    def journal(self) -> list[dict]:
        return spool.read_journal(self.spool)

    def entries(self) -> list[dict]:
        return [spool.read_meta(self.spool, e) for e in spool.entries(self.spool)]


def test_the_agent_aborts_a_pods_own_fuse_connection_its_dump_is_stuck_on(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A's dump waits in the kernel on A's stopped FUSE server and holds the node's only pipe
    slot; past the deadline the agent's pass aborts A's connection, the slot comes back, and
    pod B's crash is captured whole."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    aborts_stuck_dump(PipeNode(capture.config, capture.volume, capture.spool), agent, fuse_rootfs, rootfs)


def test_the_agent_aborts_it_under_the_forwarder_too(
    monkeypatch: pytest.MonkeyPatch, fuse_rootfs: str, rootfs: str
) -> None:
    """The same with the forwarder as the pipe handler, passing the core to the agent's receiver."""
    monkeypatch.setattr(test_volume_stall, "TIMEOUT", DEADLINE)
    with test_volume_stall.forwarder_node() as node:  # core_pipe_limit 1
        cfg = os.path.join(os.path.dirname(node.state), "c.toml")
        shipped: list[dict] = []
        agent = Agent(config.load(cfg), on_record=shipped.append)
        agent.shipped = shipped  # type: ignore[attr-defined]
        aborts_stuck_dump(PipeNode(cfg, node.volume, node.spool, node.receiver), agent, fuse_rootfs, rootfs)


def test_a_mountinfo_grown_past_any_bound_hides_no_fuse_mount_from_the_agent(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A lists 1,500 mounts under long paths before its FUSE server's: its mountinfo is past
    4 MiB, its FUSE mount at the end. Read up to a bound, the agent did not find that mount, never
    aborted it, and A's dump kept the node's only slot for as long as A's server slept."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    aborts_stuck_dump(node, agent, fuse_rootfs, rootfs, prelude=podfuse.pad_mountinfo(), padded=True)


def test_the_pods_own_mount_namespaces_cost_the_agent_no_read(
    capture: Capture, fuse_rootfs: str, rootfs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pod A makes 20 mount namespaces of its own, each a copy of its mountinfo past 4 MiB, then
    stops its FUSE server and dumps. Asking each whether it sees A's FUSE mount read 20 times what
    A chose (over 80 MiB) per stuck dump; the agent now asks no process of A's, and still aborts."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    read: list[int] = []  # the processes whose maps or mountinfo were read
    lines = stuckdumps.Proc.lines
    monkeypatch.setattr(
        stuckdumps.Proc, "lines", lambda proc, name: read.append(proc.pid) or lines(proc, name)
    )
    namespaces = "for i in $(busybox seq 20); do busybox unshare -m busybox sleep 1000 & done"

    def only_the_crashed_process_read(a: runc.Container, victim: int) -> None:
        ours = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if pod_of(pid) == a.pod_uid}
        namespaces = set()
        for pid in ours:
            with suppress(OSError):
                namespaces.add(os.stat(f"/proc/{pid}/ns/mnt").st_ino)
        assert len(namespaces) > 20, "A made no namespaces of its own"
        asked = set(read)
        assert asked & ours <= {victim}, f"processes of A asked: {sorted(asked & ours)}"

    aborts_stuck_dump(
        node, agent, fuse_rootfs, rootfs, prelude=f"{podfuse.pad_mountinfo()}\n{namespaces}", padded=True,
        inside=only_the_crashed_process_read,
    )  # fmt: skip


def test_the_agent_aborts_the_fuse_connection_under_the_pods_own_overlay(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A maps a file of an overlayfs it mounted over its own FUSE mount (maps names the
    overlay's device alone), stops its server and dumps: the kernel waits on the FUSE server.
    Looking only at the FUSE mounts its maps named, the agent never aborted it, and A's dump
    kept the node's only slot."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    overlaid = (
        f"busybox sh -c 'mkdir -p /tmp/e /tmp/o && mount -t overlay ov -o lowerdir={podfuse.MOUNT}:/tmp/e /tmp/o "
        "&& exec /app/hang mapped /tmp/o/data'"
    )
    aborts_stuck_dump(node, agent, fuse_rootfs, rootfs, victim=overlaid)


def test_the_agent_aborts_the_fuse_connection_under_the_pods_own_erofs(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A maps a file of an erofs image that lies on its own FUSE mount (maps names the erofs
    device alone), stops its server and dumps: the kernel waits on the FUSE server for the image's
    pages. Looking only at FUSE and stacked mounts, the agent never aborted it, and A's dump kept
    the node's only slot."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    victim = podfuse.on_erofs(f"/app/hang mapped {podfuse.EROFS}/data")
    aborts_stuck_dump(node, agent, fuse_rootfs, rootfs, prelude=podfuse.WITH_IMAGE, victim=victim)


def test_the_agent_aborts_the_fuse_connection_of_a_mount_the_pod_detached(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A maps a file of its own FUSE mount, unmounts it lazily (the mapping keeps it alive,
    no mountinfo lists it any more), stops its server and dumps. Looking for the FUSE mounts of
    A's mountinfo, the agent found none, and A's dump kept the node's only slot."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    detach = f"umount -l {podfuse.MOUNT} || exit 1"
    aborts_stuck_dump(node, agent, fuse_rootfs, rootfs, on_go=detach, point=stuckdumps.DETACHED)


def test_an_aborted_dump_that_ends_at_once_is_journaled_under_its_pod(
    capture: Capture, fuse_rootfs: str, rootfs: str
) -> None:
    """Pod A's dump waits on one page of a file of its stopped FUSE server (``mapswap`` with
    nothing swapped); once the agent aborts the connection, the dump and the process end at once.
    Read after the abort, A's process was gone, and the abort was journaled under no pod."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    node = PipeNode(capture.config, capture.volume, capture.spool)
    victim = f"/app/mapswap /tmp/many {podfuse.MOUNT}/data -"
    aborts_stuck_dump(node, agent, fuse_rootfs, rootfs, prelude=SWAP_PRELUDE, victim=victim)


def pod_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            info = cgroup.parse(f.read())
    except OSError:
        return None
    return info.pod_uid if info is not None else None


def aborts_stuck_dump(
    node: PipeNode,
    agent: Agent,
    fuse_rootfs: str,
    rootfs: str,
    *,
    prelude: str = "",
    padded: bool = False,
    inside: Callable[[runc.Container, int], None] | None = None,
    victim: str = podfuse.MAPPING,
    on_go: str = "",
    point: str = podfuse.MOUNT,
) -> None:
    a = podfuse.container(fuse_rootfs, node.volume, PATTERN, victim=victim, prelude=prelude, on_go=on_go)
    with a.running():
        conns = podfuse.connections(a.pid())
        if padded:
            with open(f"/proc/{a.pid()}/mountinfo", "rb") as f:
                head = f.read(4 << 20)
                assert f.read(), "the pod's mountinfo is within 4 MiB"
            assert not stuckdumps.fuse_mounts(head.splitlines()), "the FUSE mount is within the first 4 MiB"
        try:
            since = runc.uptime()
            podfuse.go(node.volume)
            [victim] = wait_for(lambda: stuck_in_dump(a.pod_uid), "A's dump to wait on its server")
            agent.pass_once()
            assert aborts(node, agent) == [], "aborted before the deadline"
            # without the defence A's dump stays, and holds the slot, for as long as its server sleeps
            wait_for(lambda: agent.pass_once() is not None and aborts(node, agent), "the abort", timeout=30)
            wait_for(lambda: not stuck_in_dump(a.pod_uid), "A's dump to end")
            if inside is not None:
                inside(a, victim)
            # the kernel gives the slot back once A's pipe helper is done with what it was handed
            runc.wait_for_dump_helpers(since, timeout=60)
            if (
                node.receiver is not None
            ):  # else B's dump, before A's was let go, is skipped (core_pipe_limit 1)
                assert node.receiver.wait_idle(60)
            b = runc.Container(rootfs, ["/app/crasher", "segv"], volume=node.volume, annotations=PATTERN)
            assert b.run().returncode != 0
        finally:
            podfuse.abort_connections(conns)
    [record] = aborts(node, agent)
    assert record["event"] == "dropped" and record["pid"] == victim and record["pod"]["uid"] == a.pod_uid
    assert f"own FUSE server of {point} stopped answering during its dump" in record["reason"]
    assert agent.metrics.registry.get_sample_value("corevault_stuck_fuse_aborted_total") == 1
    [meta] = wait_for(lambda: [m for m in node.entries() if m["pod"]["uid"] == b.pod_uid], "B's entry")
    assert meta["core"]["truncated"] is False and meta["core"]["size"] > 0
    b_events = [r["event"] for r in node.journal() if (r.get("pod") or {}).get("uid") == b.pod_uid]
    assert b_events == ["captured"]


def test_a_fuse_mount_the_host_sees_is_never_aborted(capture: Capture, fuse_rootfs: str, tmp_path) -> None:
    """A pod's dump stuck on a FUSE mount of the host's (bind-mounted into the pod, as a CSI
    driver's is) is past its deadline and still not aborted: the host sees that mount."""
    agent = agent_of(capture, f"[capture]\ntimeout = {DEADLINE}\n")
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    (lower / "data").write_bytes(bytes(1 << 20))
    server = subprocess.Popen([podfuse.FUSE_OVERLAYFS, "-f", "-o", f"lowerdir={lower}", str(mnt)])
    try:
        wait_for(lambda: os.path.ismount(mnt), "the host's FUSE mount")
        bind = {"destination": "/m", "type": "bind", "source": str(mnt), "options": ["rbind", "ro"]}
        # hang is not the pod's PID 1, which a signal from the host does not reach; it says
        # "ready" once it mapped the file, and dumps on the word
        script = f"/app/hang mapped /m/data & v=$!; {WAIT_FOR_GO}; kill -ABRT $v; sleep 1000"
        pod = runc.Container(
            fuse_rootfs, ["/bin/sh", "-c", script], annotations=PATTERN, volume=capture.volume, mounts=[bind]
        )
        with pod.running():
            os.kill(server.pid, signal.SIGSTOP)
            podfuse.go(capture.volume)
            [victim] = wait_for(lambda: stuck_in_dump(pod.pod_uid), "the dump to wait on the host's server")
            deadline = time.monotonic() + DEADLINE + 2
            while time.monotonic() < deadline:
                agent.pass_once()
                time.sleep(0.5)
            assert aborts(capture, agent) == [] and stuck_in_dump(pod.pod_uid) == [victim]
            os.kill(server.pid, signal.SIGCONT)
    finally:
        server.send_signal(signal.SIGCONT)  # its end aborts its connection: a dump still on it ends
        fusefs.unmount(str(mnt))
        server.kill()
        server.wait()
