"""Who crashed: the pod and container of a crashed process, and the annotations that decide.

Sources, first hit wins:

1. the node-local pod index the agent keeps from its API watch (:mod:`corevault.podindex`),
   by container id, else by pod uid (a container that started a moment ago);
2. the container's OCI ``config.json`` in the runtime's state: containerd's task bundle,
   CRI-O's ``userdata``, or a bundle named by runc's ``state.json`` (``bundle=`` label).
   CRI-O copies every pod annotation there, containerd only with ``pod_annotations``,
   runc-run containers carry their own; the Kubernetes names come from the CRI keys;
3. the host rules file, for processes outside containers or machines without Kubernetes.

The runtime's files are the host's and trusted; the annotations in them are the pod's and
not: every value is validated before use by :mod:`corevault.capture.policy`.
"""

from __future__ import annotations

import os

from corevault import quickjson
from corevault.capture.cgroup import CgroupInfo
from corevault.config import Settings

# Pod and container names in OCI annotations: containerd's CRI plugin, then CRI-O's.
_CRI_KEYS = {
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "name": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "uid": ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
    "container": ("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
    "image": ("io.kubernetes.cri.image-name", "io.kubernetes.cri-o.ImageName"),
}


class Owner:
    """The pod (or host rule) a crashed process belongs to."""

    __slots__ = ("annotations", "container", "container_id", "image", "name", "namespace", "source", "uid")

    def __init__(self, source: str, annotations: dict[str, str]) -> None:
        #: "podindex", "oci", "rules" or "none"
        self.source = source
        self.annotations = annotations
        self.namespace: str | None = None
        self.name: str | None = None
        self.uid: str | None = None
        self.container: str | None = None
        self.container_id: str | None = None
        self.image: str | None = None

    def as_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("namespace", "name", "uid", "container", "container_id", "image", "source")
        }


def find_owner(settings: Settings, cg: CgroupInfo | None, exe: str, comm: str, uid: int) -> Owner:
    owner = None
    if cg is not None:
        owner = _from_index(settings.podindex_dir, cg) or _from_oci(settings.runtime_dirs, cg)
    if owner is None:
        for rule in settings.rules:
            if rule.matches(exe, comm, uid):
                owner = Owner("rules", dict(rule.annotations))
                break
    if owner is None:
        owner = Owner("none", {})
    if cg is not None:
        owner.container_id = owner.container_id or cg.container_id
        owner.uid = owner.uid or cg.pod_uid
    return owner


def _strings(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _from_index(index_dir: str, cg: CgroupInfo) -> Owner | None:
    # only a crash in a container looks here: a host's crashes (the pipe handler's own case
    # where no agent forwards) spare the import, ~0.15 ms
    from corevault import podindex

    container = podindex.read_container(index_dir, cg.container_id) if cg.container_id else None
    pod_uid = (container or {}).get("pod_uid") or cg.pod_uid
    pod = podindex.read_pod(index_dir, pod_uid) if isinstance(pod_uid, str) else None
    if pod is None:
        return None
    owner = Owner("podindex", _strings(pod.get("annotations")))
    owner.namespace = pod.get("namespace")
    owner.name = pod.get("name")
    owner.uid = pod.get("uid")
    owner.container_id = cg.container_id
    if container is not None:
        owner.container = container.get("name")
        owner.image = container.get("image")
    else:
        for name, c in (pod.get("containers") or {}).items():
            if isinstance(c, dict) and c.get("id") == cg.container_id:
                owner.container, owner.image = name, c.get("image")
    return owner


def oci_config_paths(runtime_dirs: tuple[str, ...], container_id: str) -> list[str]:
    """Where the runtimes named in ``runtime_dirs`` keep this container's config.json."""
    found = []
    for base in runtime_dirs:
        d = os.path.join(base, container_id)
        for candidate in (os.path.join(d, "config.json"), os.path.join(d, "userdata", "config.json")):
            if os.path.isfile(candidate):
                found.append(candidate)
        state = os.path.join(d, "state.json")
        if os.path.isfile(state):
            bundle = _bundle_from_state(state)
            if bundle:
                found.append(os.path.join(bundle, "config.json"))
    return found


def _bundle_from_state(state_path: str) -> str | None:
    try:
        with open(state_path, "rb") as f:
            state = quickjson.loads(f.read())
        labels = state.get("config", {}).get("labels") or []
    except (OSError, ValueError, AttributeError):
        return None
    for label in labels:
        if isinstance(label, str) and label.startswith("bundle="):
            return label[len("bundle=") :]
    return None


def _from_oci(runtime_dirs: tuple[str, ...], cg: CgroupInfo) -> Owner | None:
    if not cg.container_id:
        return None
    for path in oci_config_paths(runtime_dirs, cg.container_id):
        try:
            with open(path, "rb") as f:
                spec = quickjson.loads(f.read())
        except (OSError, ValueError):
            continue
        annotations = _strings(spec.get("annotations") if isinstance(spec, dict) else None)
        owner = Owner("oci", annotations)
        for field, keys in _CRI_KEYS.items():
            value = next((annotations[k] for k in keys if k in annotations), None)
            setattr(owner, field, value)
        owner.container_id = cg.container_id
        return owner
    return None
