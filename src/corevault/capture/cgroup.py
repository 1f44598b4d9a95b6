"""From ``/proc/PID/cgroup`` to a container id and a pod uid.

Kubernetes nodes name a container's cgroup in a handful of ways; only the trailing path
segments matter, whatever the parent slices are called::

    cgroupfs driver    .../kubepods/burstable/pod<uid>/<id>
                       .../kubepods/pod<uid>/<id>                      (Guaranteed QoS)
    systemd driver     .../kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
                       .../crio-<id>.scope   .../docker-<id>.scope
    systemd, cgroup v1 .../kubepods-burstable-pod<uid>.slice:cri-containerd:<id>

cgroup v2 has one ``0::<path>`` line, v1 one line per hierarchy, hybrid setups both; the
first line that names a container wins, the unified one first. A pod is never looked up by
hostname (``%h``): pods share names across namespaces and hostNetwork pods carry the
node's. Plain string work, no regular expressions: this runs once per crash.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdef")
_RUNTIME_PREFIXES = ("cri-containerd-", "crio-", "docker-", "containerd-", "libpod-")


class CgroupInfo:
    __slots__ = ("container_id", "path", "pod_uid", "runtime")

    def __init__(self, path: str, container_id: str | None, pod_uid: str | None, runtime: str | None):
        self.path = path
        self.container_id = container_id
        self.pod_uid = pod_uid
        self.runtime = runtime

    def __repr__(self) -> str:
        return f"CgroupInfo({self.container_id!r}, pod_uid={self.pod_uid!r}, runtime={self.runtime!r})"


def _container_id(segment: str) -> tuple[str, str | None] | None:
    """``(id, runtime)`` if a path segment names a container."""
    runtime = None
    if segment.count(":") >= 2:  # kubepods-...-pod<uid>.slice:cri-containerd:<id>
        _, runtime, segment = segment.rsplit(":", 2)
    else:
        segment = segment.removesuffix(".scope")
        for prefix in _RUNTIME_PREFIXES:
            if segment.startswith(prefix):
                if segment.startswith("crio-conmon-"):
                    return None  # CRI-O's monitor process, not the container
                runtime = prefix[:-1]
                segment = segment[len(prefix) :]
                break
    if len(segment) == 64 and _HEX.issuperset(segment):
        return segment, runtime
    return None


def _pod_uid(segment: str) -> str | None:
    """The pod uid in ``pod<uid>`` or ``kubepods-<qos>-pod<uid_>.slice``, dashed."""
    segment = segment.split(":", 1)[0].removesuffix(".slice")
    at = segment.rfind("pod")
    if at < 0:
        return None
    uid = segment[at + 3 :].replace("_", "-")
    if len(uid) != 36 or [i for i, c in enumerate(uid) if c == "-"] != [8, 13, 18, 23]:
        return None
    return uid if _HEX.issuperset(uid.replace("-", "").lower()) else None


def parse_path(path: str) -> CgroupInfo | None:
    """The container and pod named by one cgroup path, or None when it names no container."""
    segments = [s for s in path.split("/") if s]
    if not segments:
        return None
    found = _container_id(segments[-1])
    if found is None:
        return None
    container_id, runtime = found
    pod_uid = _pod_uid(segments[-1]) if ":" in segments[-1] else None
    if pod_uid is None and len(segments) >= 2:
        pod_uid = _pod_uid(segments[-2])
    return CgroupInfo(path, container_id, pod_uid, runtime)


def parse(text: str) -> CgroupInfo | None:
    """Parse the contents of ``/proc/PID/cgroup`` (v1, v2 or hybrid)."""
    lines = [line.split(":", 2) for line in text.splitlines()]
    paths = [p[2] for p in lines if len(p) == 3 and p[0] == "0" and p[1] == ""]
    paths += [p[2] for p in lines if len(p) == 3 and not (p[0] == "0" and p[1] == "")]
    for path in paths:
        info = parse_path(path)
        if info is not None:
            return info
    return None
