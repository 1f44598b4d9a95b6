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
import subprocess
from pathlib import Path

import pytest

from corevault.capture import buildid
from testbed import fusefs, podfuse, runc
from testbed.capture import Capture
from tests.waiting import wait_for

pytestmark = pytest.mark.crash

PATTERN = {"corevault.io/core-pattern": "/data/dump-a/core-%p"}


@pytest.fixture(scope="module")
def fuse_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return podfuse.rootfs(str(tmp_path_factory.mktemp("podfuse") / "root"))


def records(capture: Capture, pod: runc.Container) -> list[dict]:
    return [r for r in capture.journal() if (r.get("pod") or {}).get("uid") == pod.pod_uid]


def dumped(capture: Capture, pod: runc.Container) -> list[dict]:
    return [r for r in records(capture, pod) if r.get("event") != "skipped"]


def test_the_handler_never_asks_the_pods_own_fuse_server(capture: Capture, fuse_rootfs: str) -> None:
    capture.configure("[capture]\ntimeout = 60\n")
    pod = podfuse.container(fuse_rootfs, capture.volume, PATTERN)
    with pod.running():
        conns = podfuse.connections(pod.pid())
        assert len(conns) == 1, "the pod's FUSE server did not mount"
        try:
            podfuse.go(capture.volume)
            # without the defence the handler waits on the stopped server, uninterruptibly
            wait_for(lambda: dumped(capture, pod), "the pod's crash to be recorded", timeout=30)
        finally:
            podfuse.abort_connections(conns)
    [record] = dumped(capture, pod)
    assert record["event"] == "captured", record
    [meta] = [m for m in capture.entries() if m["pod"]["uid"] == pod.pod_uid]
    assert meta["core"]["truncated"] is False and meta["core"]["size"] > 0
    exe = {m["path"]: m for m in meta["modules"]}[f"{podfuse.MOUNT}/busybox"]
    assert exe["sha256"] is None and "pod's own FUSE filesystem" in exe["stored"], exe


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
