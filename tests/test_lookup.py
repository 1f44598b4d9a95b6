"""Finding a crashed process's pod: pod index first, then the runtime's OCI config, then rules."""

from __future__ import annotations

import json

from corevault import config, podindex
from corevault.capture import cgroup, lookup

CID = "c" * 64
UID = "2635b91a-c212-48d1-802f-cc23cb6d12af"
CG = cgroup.CgroupInfo(f"/kubepods/pod{UID}/{CID}", CID, UID, None)


def settings(tmp_path) -> config.Settings:
    s = config.Settings(str(tmp_path / "state"))
    s.runtime_dirs = (str(tmp_path / "containerd"), str(tmp_path / "runc"), str(tmp_path / "crio"))
    return s


def write(path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_pod_index_by_uid_when_the_container_is_not_indexed_yet(tmp_path) -> None:
    s = settings(tmp_path)
    podindex.write_pod(s.podindex_dir, {"uid": UID, "namespace": "a", "name": "p", "annotations": {"k": "v"}})
    owner = lookup.find_owner(s, CG, "/x", "x", 0)
    assert (owner.source, owner.namespace, owner.name, owner.annotations) == (
        "podindex",
        "a",
        "p",
        {"k": "v"},
    )
    assert owner.container_id == CID


def test_containerd_bundle_with_cri_annotations(tmp_path) -> None:
    s = settings(tmp_path)
    write(tmp_path / "containerd" / CID / "config.json", {"annotations": {
        "io.kubernetes.cri.sandbox-namespace": "shop", "io.kubernetes.cri.sandbox-name": "cart-0",
        "io.kubernetes.cri.sandbox-uid": UID, "io.kubernetes.cri.container-name": "cart",
        "io.kubernetes.cri.image-name": "cart:1", "corevault.io/core-pattern": "/data/c"}})  # fmt: skip
    owner = lookup.find_owner(s, CG, "/x", "x", 0)
    assert owner.as_dict() == {"namespace": "shop", "name": "cart-0", "uid": UID, "container": "cart",
                               "container_id": CID, "image": "cart:1", "source": "oci"}  # fmt: skip
    assert owner.annotations["corevault.io/core-pattern"] == "/data/c"


def test_crio_userdata_config(tmp_path) -> None:
    s = settings(tmp_path)
    write(tmp_path / "crio" / CID / "userdata" / "config.json", {"annotations": {
        "io.kubernetes.pod.namespace": "ns", "io.kubernetes.pod.name": "pod", "io.kubernetes.container.name": "c",
        "io.kubernetes.cri-o.ImageName": "img:2", "alibabacloud.com/core-pattern": "/data/x"}})  # fmt: skip
    owner = lookup.find_owner(s, CG, "/x", "x", 0)
    assert (owner.namespace, owner.name, owner.container, owner.image) == ("ns", "pod", "c", "img:2")


def test_runc_state_names_the_bundle(tmp_path) -> None:
    s = settings(tmp_path)
    write(tmp_path / "bundle" / "config.json", {"annotations": {"corevault.io/core-pattern": "/data/y"}})
    write(tmp_path / "runc" / CID / "state.json", {"config": {"labels": [f"bundle={tmp_path / 'bundle'}"]}})
    owner = lookup.find_owner(s, CG, "/x", "x", 0)
    assert owner.source == "oci" and owner.annotations == {"corevault.io/core-pattern": "/data/y"}


def test_rules_for_processes_outside_containers(tmp_path) -> None:
    s = settings(tmp_path)
    s.rules = [config.Rule("/usr/bin/app*", None, None, {"corevault.io/core-pattern": "/var/crash/c"})]
    assert lookup.find_owner(s, None, "/usr/bin/app-srv", "app-srv", 0).source == "rules"
    assert lookup.find_owner(s, None, "/usr/bin/other", "other", 0).source == "none"


def test_unreadable_runtime_files_fall_through(tmp_path) -> None:
    s = settings(tmp_path)
    (tmp_path / "containerd" / CID).mkdir(parents=True)
    (tmp_path / "containerd" / CID / "config.json").write_text("{broken")
    assert lookup.find_owner(s, CG, "/x", "x", 0).source == "none"
