"""The node-local pod index: what the capture handler knows about the pods of its node.

The agent watches the API server for the pods of its node and keeps this index; the
capture handler only reads it, so a crash never waits on the network. Layout (one small
JSON file each, replaced atomically with a temporary name and ``rename``)::

    <dir>/pods/<pod-uid>.json          {"uid", "namespace", "name", "node", "labels",
                                        "annotations", "containers": {name: {"id", "image"}},
                                        "deleted_at": null | epoch seconds}
    <dir>/containers/<container-id>.json
                                       {"id", "pod_uid", "name", "image"}

Deleted pods stay (with ``deleted_at`` set) for a while so that a crash that the kernel
reports late still resolves. Keys are checked before they become file names: a container
id or pod uid from a crashing process's cgroup never walks out of the index.
"""

from __future__ import annotations

import os

from corevault import atomic, quickjson

FORMAT_VERSION = 1


def _safe_key(key: str) -> bool:
    return (
        0 < len(key) <= 128
        and not key.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in key)
    )


def read_file(path: str) -> dict | None:
    """The entry in the file at ``path``, or None when it is none (unreadable, not JSON, not an object)."""
    try:
        with open(path, "rb") as f:
            doc = quickjson.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_pod(index_dir: str, uid: str) -> dict | None:
    """The pod with this uid, or None when the index does not know it."""
    if not _safe_key(uid):
        return None
    return read_file(os.path.join(index_dir, "pods", uid + ".json"))


def container_file(index_dir: str, container_id: object) -> str | None:
    """The path of the container's file, or None when ``container_id`` cannot be a file name."""
    if not isinstance(container_id, str) or not _safe_key(container_id):
        return None
    return os.path.join(index_dir, "containers", container_id + ".json")


def read_container(index_dir: str, container_id: str) -> dict | None:
    """The container with this runtime id, or None when the index does not know it."""
    path = container_file(index_dir, container_id)
    return None if path is None else read_file(path)


def _write_atomic(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomic.write(path, quickjson.dumps(doc, sort_keys=True))


def write_pod(index_dir: str, pod: dict) -> None:
    """Record a pod and each of its containers that has an id.

    ``pod`` holds ``uid``, ``namespace``, ``name`` and optionally ``node``, ``labels``,
    ``annotations``, ``containers`` ({name: {"id": ..., "image": ...}}) and ``deleted_at``.
    """
    uid = pod["uid"]
    if not _safe_key(uid):
        raise ValueError(f"pod uid {uid!r} cannot be used as a file name")
    doc = {
        "version": FORMAT_VERSION,
        "uid": uid,
        "namespace": pod["namespace"],
        "name": pod["name"],
        "node": pod.get("node"),
        "labels": dict(pod.get("labels") or {}),
        "annotations": dict(pod.get("annotations") or {}),
        "containers": dict(pod.get("containers") or {}),
        "deleted_at": pod.get("deleted_at"),
    }
    for name, c in doc["containers"].items():
        cid = c.get("id")
        path = container_file(index_dir, cid)
        if path is not None:
            _write_atomic(
                path,
                {"version": FORMAT_VERSION, "id": cid, "pod_uid": uid, "name": name, "image": c.get("image")},
            )
    _write_atomic(os.path.join(index_dir, "pods", uid + ".json"), doc)
