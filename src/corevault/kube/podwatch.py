"""The node's pod index, kept current from the API server's watch of the pods on this node.

List the node's pods (``fieldSelector=spec.nodeName=NODE``), write each to the index
(:mod:`corevault.podindex`), then watch from the list's resourceVersion. When the server
has compacted past that version it answers 410 Gone: list again. A pod that is deleted
stays in the index, marked deleted, for ``keep_deleted`` seconds, so that a crash the
kernel reports a moment after the pod went away still finds its pod.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator

from corevault import podindex
from corevault.kube import podsweep

log = logging.getLogger("corevault.agent")
HTTP_GONE = 410


def container_id(raw: str | None) -> str | None:
    """``containerd://0123…`` → ``0123…`` (the id the cgroup path carries)."""
    if not raw:
        return None
    return raw.split("://", 1)[-1]


def index_entry(pod: dict, deleted_at: float | None = None) -> dict:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status") or {}
    images = {c["name"]: c.get("image") for c in spec.get("containers") or []}
    containers: dict[str, dict] = {name: {"id": None, "image": image} for name, image in images.items()}
    for st in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        containers[st["name"]] = {
            "id": container_id(st.get("containerID")),
            "image": images.get(st["name"]) or st.get("image"),
        }
    return {
        "uid": meta["uid"],
        "namespace": meta.get("namespace", "default"),
        "name": meta["name"],
        "node": spec.get("nodeName"),
        "labels": meta.get("labels") or {},
        "annotations": meta.get("annotations") or {},
        "containers": containers,
        "deleted_at": deleted_at,
    }


class PodWatch:
    def __init__(self, core_api, node: str, index_dir: str, keep_deleted: float = 3600) -> None:
        self.api = core_api
        self.node = node
        self.index_dir = index_dir
        self.keep_deleted = keep_deleted
        self.stop = threading.Event()
        self.lists = 0

    def _selector(self) -> str:
        return f"spec.nodeName={self.node}"

    def relist(self) -> str:
        """Index every pod of the node; mark the ones that are gone; return the list's version."""
        resp = self.api.list_pod_for_all_namespaces(field_selector=self._selector(), _preload_content=False)
        doc = json.loads(resp.data)
        self.lists += 1
        seen = set()
        for pod in doc.get("items") or []:
            podindex.write_pod(self.index_dir, index_entry(pod))
            seen.add(pod["metadata"]["uid"])
        pods_dir = os.path.join(self.index_dir, "pods")
        for name in os.listdir(pods_dir) if os.path.isdir(pods_dir) else []:
            uid = name.removesuffix(".json")
            known = podindex.read_pod(self.index_dir, uid)
            if known is not None and uid not in seen and known.get("deleted_at") is None:
                known["deleted_at"] = time.time()
                podindex.write_pod(self.index_dir, known)
        return doc.get("metadata", {}).get("resourceVersion", "")

    def apply(self, event: dict) -> str | None:
        """Apply one watch event; returns its object's resourceVersion."""
        pod = event.get("object") or {}
        kind = event.get("type")
        if kind in ("ADDED", "MODIFIED"):
            podindex.write_pod(self.index_dir, index_entry(pod))
        elif kind == "DELETED":
            podindex.write_pod(self.index_dir, index_entry(pod, deleted_at=time.time()))
        return (pod.get("metadata") or {}).get("resourceVersion")

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget the pods deleted, and the containers replaced, more than ``keep_deleted``
        seconds ago, once none of their processes lives (:mod:`corevault.kube.podsweep`); returns
        the pods forgotten."""
        swept = podsweep.sweep(self.index_dir, self.keep_deleted, now)
        if swept.pods or swept.containers or swept.other:
            log.info(
                "pod index: forgot %d pods and %d containers gone for %gs, and %d files that were no entry",
                len(swept.pods), swept.containers, self.keep_deleted, swept.other,
            )  # fmt: skip
        return swept.pods

    def run(self, watch_seconds: int = 60) -> None:
        """List, then watch, until stopped; list again on 410 Gone or a broken stream."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        version = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self.relist()
                resp = self.api.list_pod_for_all_namespaces(
                    field_selector=self._selector(), watch=True, resource_version=version,
                    timeout_seconds=watch_seconds, allow_watch_bookmarks=True, _preload_content=False,
                )  # fmt: skip
                for line in _lines(resp):
                    if self.stop.is_set():
                        break
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        code = (event.get("object") or {}).get("code")
                        log.info("pod watch: %s; listing again", "410 Gone" if code == HTTP_GONE else event)
                        version = None
                        break
                    if event.get("type") == "BOOKMARK":
                        version = event["object"]["metadata"]["resourceVersion"]
                        continue
                    version = self.apply(event) or version
                self.sweep()
            except (ApiException, HTTPError, OSError, ValueError) as e:
                log.warning("pod watch failed (%s); listing again in 1s", e)
                version = None
                self.stop.wait(1)


def _lines(resp) -> Iterator[str]:
    """The JSON lines of a watch response, as they arrive."""
    pending = b""
    for chunk in resp.stream(4096):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield line.decode()
    if pending.strip():
        yield pending.decode()
