"""Snapshot requests made through the server, taken by the agent of the node that runs the pod.

A thread of the agent looks at the catalog's pending requests (:mod:`corevault.vault.snapshots`)
every poll interval. A request whose pod has a process on this node is claimed (one agent
wins), taken exactly as ``corevault snapshot --pod`` takes it, and answered with the crash
id and the core's place in the pod; the agent's loop then ships and analyses it like any
crash. Requests for pods of other nodes are left to their agents.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine

from corevault import config
from corevault.capture import snapshot
from corevault.vault import catalog, snapshots

log = logging.getLogger("corevault.agent")


class SnapshotRequests:
    def __init__(self, settings: config.Settings, node: str, stop: threading.Event) -> None:
        self.settings = settings
        self.node = node
        self.stop = stop
        self.engine: Engine | None = None

    def run(self) -> None:
        while not self.stop.wait(self.settings.agent_poll):
            try:
                self.once()
            except Exception as e:  # the catalog is away, or a bug: say so, keep serving
                log.warning("snapshot requests: %s", e)
                self.engine = None

    def once(self) -> int:
        """Take the pending requests for pods of this node; returns how many were taken."""
        if self.engine is None:
            self.engine = catalog.connect(self.settings.catalog_url)
        with self.engine.connect() as conn:
            waiting = snapshots.pending(conn)
        taken = 0
        for r in waiting:
            try:
                pids = snapshot.pod_processes(self.settings, r["namespace"], r["pod"], r["container"])
            except snapshot.NotHere:
                continue
            except snapshot.SnapshotError as e:
                pids, error = [], str(e)
            with self.engine.begin() as conn:
                if not snapshots.claim(conn, r["id"], self.node):
                    continue
            taken += 1
            if pids:
                error = self._take(r, pids[0])
            if error:
                with self.engine.begin() as conn:
                    snapshots.finish(conn, r["id"], error=error)
        return taken

    def _take(self, r: dict, pid: int) -> str | None:
        """Snapshot ``pid`` for request ``r`` and record where it went; the error, if any."""
        log.info("snapshot of %s/%s (pid %d) for %s", r["namespace"], r["pod"], pid, r["requested_by"])
        try:
            out = snapshot.take(
                self.settings, pid, reason=r["reason"], requested_by=r["requested_by"], kill=r["kill"]
            )
        except snapshot.SnapshotError as e:
            return str(e)
        assert self.engine is not None
        with self.engine.begin() as conn:
            snapshots.finish(conn, r["id"], crash_id=out.entry, volume=out.volume)
        return None
