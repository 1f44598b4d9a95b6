"""Pods under containerd (1.6) and podman: the capture finds the container through each runtime's own state.

No pod index here (no agent): the handler goes from the crashed process's kubepods cgroup to
the container id, and from there to the OCI config the runtime itself wrote: containerd's
task bundle (``<state>/io.containerd.runtime.v2.task/k8s.io/<id>/config.json``) and podman's
``overlay-containers/<id>/userdata/config.json`` (the layout CRI-O shares with libpod). The
annotations that send the core into the pod's volume, and the pod's names, come from there,
as a CRI plugin puts them: containerd's ``io.kubernetes.cri.*``, CRI-O's ``io.kubernetes.pod.*``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from testbed import image, runc
from tests.conftest import Capture

pytestmark = pytest.mark.crash
PATTERN = "/data/dump-a/core-%e-%p"


def unlimited_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.fixture
def containerd(tmp_path) -> Iterator[str]:
    """A containerd of the test's own (root, state, socket), CRI plugin off; yields its state dir."""
    d = tempfile.mkdtemp(prefix="cv-ctrd-", dir="/tmp")  # short: the socket path has a length limit
    with open(os.path.join(d, "config.toml"), "w") as f:
        f.write('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
    proc = subprocess.Popen(
        ["containerd", "--config", f"{d}/config.toml", "--root", f"{d}/root", "--state", f"{d}/state",
         "--address", f"{d}/sock"],
        stdout=subprocess.DEVNULL, stderr=open(f"{d}/log", "wb"), start_new_session=True,  # noqa: SIM115
        preexec_fn=unlimited_cores,  # noqa: PLW1509 - containerd.service has LimitCORE=infinity too
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["ctr", "--address", f"{d}/sock", "version"], capture_output=True, check=False
        ).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield d
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["umount", "-R", f"{d}/state"], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)


def the_only_core(cap: Capture) -> dict:
    [entry] = cap.entries()
    return entry


def test_containerd_pod_found_through_containerds_task_bundle(
    capture: Capture, rootfs: str, containerd: str
) -> None:
    bundles = os.path.join(containerd, "state", "io.containerd.runtime.v2.task", "k8s.io")
    capture.configure(f'[paths]\nruntime_dirs = ["{bundles}"]\n')
    uid, cid = runc.new_pod_uid(), runc.new_container_id()
    annotations = {
        "corevault.io/core-pattern": PATTERN, "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "shop", "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-uid": uid,
    }  # fmt: skip
    out = subprocess.run(
        ["ctr", "--address", f"{containerd}/sock", "-n", "k8s.io", "run", "--rm", "--rootfs", "--read-only",
         "--cgroup", runc.cgroups_path(uid, cid), "--mount",
         f"type=bind,src={capture.volume},dst={runc.VOLUME_PATH},options=rbind:rw",
         *(f"--annotation={k}={v}" for k, v in annotations.items()),
         rootfs, cid, "/app/crasher", "segv"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0, out.stderr
    cores = capture.volume_files()
    assert len(cores) == 1 and cores[0].startswith("core-crasher-"), capture.journal()
    meta = the_only_core(capture)
    assert meta["pod"]["source"] == "oci" and meta["pod"]["container_id"] == cid
    assert (meta["pod"]["namespace"], meta["pod"]["name"], meta["pod"]["container"]) == (
        "shop",
        "web-0",
        "app",
    )


def test_podman_pod_found_through_libpods_userdata(capture: Capture, rootfs: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    shutil.copytree(rootfs, root, symlinks=True)  # podman writes /etc/hosts and the like into it
    uid = runc.new_pod_uid()
    annotations = {
        "corevault.io/core-pattern": PATTERN, "io.kubernetes.pod.name": "api-0",
        "io.kubernetes.pod.namespace": "shop", "io.kubernetes.container.name": "api",
        "io.kubernetes.pod.uid": uid,
    }  # fmt: skip
    name = f"cv-runtime-{os.urandom(4).hex()}"
    try:
        out = subprocess.run(
            # RLIMIT_CORE unlimited as a node's runtime sets it (CRI-O's default_ulimits; podman's is 0)
            ["podman", "run", "--name", name, *image.ulimits(), "--ulimit", "core=-1:-1", "--network", "none",
             "--cgroup-manager", "cgroupfs", "--cgroup-parent", f"/kubepods/burstable/pod{uid}",
             "-v", f"{capture.volume}:{runc.VOLUME_PATH}",
             *(f"--annotation={k}={v}" for k, v in annotations.items()),
             "--rootfs", root, "/app/crasher", "segv"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 139, out.stderr
        cid = subprocess.run(
            ["podman", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True, check=True
        ).stdout.strip()
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False)
    cores = capture.volume_files()
    assert len(cores) == 1 and cores[0].startswith("core-crasher-"), cores
    meta = the_only_core(capture)
    assert meta["pod"]["source"] == "oci" and meta["pod"]["container_id"] == cid
    assert meta["cgroup"].endswith(f"/pod{uid}/libpod-{cid}")
    assert (meta["pod"]["namespace"], meta["pod"]["name"], meta["pod"]["container"]) == (
        "shop",
        "api-0",
        "api",
    )
