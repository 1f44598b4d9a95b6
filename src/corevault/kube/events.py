"""Kubernetes Events for crashes: ``CoreDumped`` on the pod, and why a dump was dropped.

One Event per journal record of a captured, cut, dropped or refused dump of a pod, posted
by the agent (never by the capture handler). In a crash storm at most ``per_minute``
Events per pod are posted each minute; the next one that is posted says how many were
held back, so ``kubectl describe pod`` stays readable and the API server is not flooded.
"""

from __future__ import annotations

import logging
import os
import signal as _signal
import time
from datetime import UTC, datetime

from corevault.printable import printable

log = logging.getLogger("corevault.agent")
REASONS = {
    "captured": "CoreDumped",
    "truncated": "CoreDumpTruncated",
    "dropped": "CoreDumpDropped",
    "refused": "CoreDumpRefused",
}


def _signal_name(number: object) -> str:
    try:
        return _signal.Signals(int(number)).name  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"signal {number}"


def message(record: dict) -> str:
    """The Event's text; the executable and reasons are the crashed process's, so made printable."""
    return printable(_message(record))


def _message(record: dict) -> str:
    pod = record.get("pod") or {}
    who = f"container {pod.get('container') or '?'}: {_signal_name(record.get('signal'))} in {record.get('exe') or '?'}"
    if record.get("event") == "captured":
        where = [
            f"core at {record['volume']}" if record.get("volume") else None,
            "kept in the vault" if record.get("entry") else None,
        ]
        return f"{who}; " + " and ".join(w for w in where if w)
    return f"{who}; {record.get('reason') or record.get('event')}"


class EventPoster:
    def __init__(self, core_api, node: str, per_minute: int = 5) -> None:
        self.api = core_api
        self.node = node
        self.per_minute = per_minute
        self.sent: dict[str, list[float]] = {}
        self.held: dict[str, int] = {}

    def __call__(self, record: dict) -> bool:
        """Post the Event for one journal record; False when it is not about a pod or held back."""
        reason = REASONS.get(record.get("event", ""))
        pod = record.get("pod") or {}
        if reason is None or not pod.get("namespace") or not pod.get("name"):
            return False
        key = pod.get("uid") or f"{pod['namespace']}/{pod['name']}"
        now = time.time()
        recent = [t for t in self.sent.get(key, []) if now - t < 60]
        if len(recent) >= self.per_minute:
            self.held[key] = self.held.get(key, 0) + 1
            self.sent[key] = recent
            return False
        text = message(record)
        if self.held.get(key):
            text += f" ({self.held.pop(key)} more crash events held back in the last minute)"
        self.sent[key] = [*recent, now]
        stamp = datetime.fromtimestamp(record.get("time") or now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{pod['name']}.corevault-{os.urandom(4).hex()}", "namespace": pod["namespace"]},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod", "namespace": pod["namespace"], "name": pod["name"], "uid": pod.get("uid"),
                **({"fieldPath": f"spec.containers{{{pod['container']}}}"} if pod.get("container") else {}),
            },
            "reason": reason, "message": text[:1024], "type": "Warning",
            "source": {"component": "corevault", "host": self.node},
            "reportingComponent": "corevault.io/agent", "reportingInstance": self.node,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }  # fmt: skip
        try:
            self.api.create_namespaced_event(pod["namespace"], body, _preload_content=False)
        except Exception as e:  # an Event is a courtesy: never let it stop the shipping
            log.warning("cannot post Event %s for %s/%s: %s", reason, pod["namespace"], pod["name"], e)
            return False
        return True
