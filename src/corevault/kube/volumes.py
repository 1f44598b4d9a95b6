"""The volume that holds a pod's cores: where it is mounted, and how corevault adds one."""

from __future__ import annotations

import posixpath

from corevault.errors import BadInput
from corevault.kube import buckets

VOLUME_NAME = "corevault-cores"
DEFAULT_SIZE = "10Gi"


def mount_for(container: dict, directory: str) -> str | None:
    """The volume whose mount holds ``directory`` (the deepest mount that contains it)."""
    best = None
    for m in container.get("volumeMounts") or []:
        path = posixpath.normpath(m.get("mountPath", ""))
        inside = directory == path or directory.startswith(path.rstrip("/") + "/")
        if inside and (best is None or len(path) > len(best[0])):
            best = (path, m["name"])
    return best[1] if best else None


USAGE = f"emptydir, pvc:CLAIM, nfs:SERVER:/PATH, {buckets.USAGE}"


def volume_source(spec: str) -> dict:
    """``emptydir`` (with a 10Gi size limit), ``pvc:CLAIM``, ``nfs:SERVER:/PATH`` or a bucket as a pod volume.

    A bucket (``oss:BUCKET[:/PATH]``, ``s3fs:…``) is the claim of :mod:`.buckets`, which
    must exist in the pod's namespace (``kubectl corevault enable`` creates it).
    """
    bucket = buckets.parse(spec)
    if bucket is not None:
        return bucket.pod_volume(VOLUME_NAME)
    if spec == "emptydir":
        return {"name": VOLUME_NAME, "emptyDir": {"sizeLimit": DEFAULT_SIZE}}
    kind, _, rest = spec.partition(":")
    if kind == "pvc" and rest:
        return {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": rest}}
    if kind == "nfs" and ":" in rest:
        server, _, path = rest.partition(":")
        if server and path.startswith("/"):
            return {"name": VOLUME_NAME, "nfs": {"server": server, "path": path}}
    raise BadInput(f"volume {spec!r}: use {USAGE}")
