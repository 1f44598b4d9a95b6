"""From /proc/PID/cgroup to the container and the pod, for every runtime and driver."""

from __future__ import annotations

import pytest

from corevault.capture import cgroup

CID = "9645bc6066eb8f6139d6318218d9cee21ed755ddff0bb695ba285984f17a6b4d"
UID = "2635b91a-c212-48d1-802f-cc23cb6d12af"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "runtime"),
    [
        (f"/kubepods/burstable/pod{UID}/{CID}", None),
        (f"/kubepods/pod{UID}/{CID}", None),
        (f"/kubepods/besteffort/pod{UID}/{CID}", None),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "cri-containerd",
        ),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope", "crio"),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope",
            "docker",
        ),
        (f"/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}", "cri-containerd"),
        (
            f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}",
            "cri-containerd",
        ),
    ],
)
def test_every_kubernetes_form(path: str, runtime: str | None) -> None:
    info = cgroup.parse_path(path)
    assert info is not None
    assert (info.container_id, info.pod_uid, info.runtime) == (CID, UID, runtime)


def test_plain_docker_container_has_no_pod() -> None:
    info = cgroup.parse_path(f"/system.slice/docker-{CID}.scope")
    assert info is not None and info.container_id == CID and info.pod_uid is None


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/user.slice/user-0.slice/session-1.scope",
        f"/kubepods/burstable/pod{UID}",
        f"/kubepods.slice/crio-conmon-{CID}.scope",
        "/kubepods/burstable/podnot-a-uid/" + CID[:-1] + "g",
    ],
)
def test_paths_without_a_container(path: str) -> None:
    assert cgroup.parse_path(path) is None


def test_cgroup_v1_and_hybrid_files() -> None:
    text = f"12:pids:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
    info = cgroup.parse(text)
    assert info is not None and info.container_id == CID and info.pod_uid == UID


def test_unified_line_wins() -> None:
    other = "a" * 64
    text = f"3:memory:/kubepods/pod{UID}/{other}\n0::/kubepods/pod{UID}/{CID}\n"
    info = cgroup.parse(text)
    assert info is not None and info.container_id == CID


def test_host_process() -> None:
    assert cgroup.parse("0::/system.slice/sshd.service\n") is None
