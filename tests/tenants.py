"""Two tenants on one node: pods in different namespaces, and what tests need to watch them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

SEED = "/data/dump-a/core-%p"


def pod(namespace: str, name: str, pattern: str = SEED) -> dict[str, str]:
    """OCI annotations of a pod that opted in (runc carries them as the kubelet's runtime would)."""
    return {
        "corevault.io/core-pattern": pattern,
        "io.kubernetes.pod.namespace": namespace,
        "io.kubernetes.pod.name": name,
    }


def processes(*needles: bytes) -> list[int]:
    """PIDs of the host's processes whose command line holds every one of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                found.append(int(entry))
    return found


def wait_for(what: Callable[[], object], timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def of_namespace(records: list[dict], namespace: str) -> list[dict]:
    return [r for r in records if (r.get("pod") or {}).get("namespace") == namespace]


def node_of(capture, cfg: str):  # -> config.Settings
    """A node whose settings are ``cfg``, holding copies of ``capture``'s spool entries and stored binaries."""
    import shutil

    from corevault import config, spool

    settings = config.load(cfg)
    spool.ensure(settings.spool_dir)
    for entry in spool.entries(capture.spool):
        shutil.copytree(os.path.join(spool.ready_dir(capture.spool), entry),
                        os.path.join(spool.ready_dir(settings.spool_dir), entry))  # fmt: skip
    shutil.copytree(capture.store, settings.buildid_dir, dirs_exist_ok=True)
    return settings
