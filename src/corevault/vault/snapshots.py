"""Snapshot requests: a person asks through the server, the node that runs the pod takes the snapshot.

The server checks that the reader may ``create pods/exec`` on the pod (who may exec into a
pod may read its memory anyway) and writes a ``pending`` row. The server never learns
which node runs the pod, and needs no right to read pods: every node's agent looks at the
pending rows, and the one whose own pod index holds the pod claims the row (an UPDATE
that only one agent can win), takes the snapshot and records where the core went
(``done``) or why it could not (``failed``). A row nobody claims within
:data:`CLAIM_WITHIN` seconds reads as ``expired``: no node of the vault runs that pod.
"""

from __future__ import annotations

import secrets
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corevault.vault.tables import metadata

#: seconds an agent has to claim a request before it reads as expired
CLAIM_WITHIN = 60.0
STATES = ("pending", "running", "done", "failed", "expired")

snapshot_requests = sa.Table(
    "snapshot_requests",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("namespace", sa.String(255), nullable=False),
    sa.Column("pod", sa.String(255), nullable=False),
    sa.Column("container", sa.String(255)),
    sa.Column("kill", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("requested_by", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("node", sa.String(255)),
    #: the spool entry, which becomes the crash of that id in the catalog
    sa.Column("crash_id", sa.String(80)),
    #: where the plain core went in the pod, if its pattern sent it there
    sa.Column("volume", sa.String(4096)),
    sa.Column("error", sa.Text),
    sa.Column("finished", sa.Float),
)
sa.Index("snapshot_requests_state", snapshot_requests.c.state, snapshot_requests.c.time)
TABLES = [snapshot_requests]


def request(
    conn: Connection, namespace: str, pod: str, container: str | None, *, kill: bool, reason: str, by: str
) -> str:
    """Write a pending request; returns its id."""
    rid = secrets.token_hex(8)
    conn.execute(
        snapshot_requests.insert().values(
            id=rid,
            time=time.time(),
            namespace=namespace,
            pod=pod,
            container=container,
            kill=kill,
            reason=reason,
            requested_by=by,
            state="pending",
        )
    )
    return rid


def get(conn: Connection, rid: str, now: float | None = None) -> dict | None:
    row = conn.execute(sa.select(snapshot_requests).where(snapshot_requests.c.id == rid)).mappings().first()
    if row is None:
        return None
    doc = dict(row)
    if doc["state"] == "pending" and (now or time.time()) - doc["time"] > CLAIM_WITHIN:
        doc["state"] = "expired"
        doc["error"] = f"no node of this vault claimed it within {CLAIM_WITHIN:g}s: is the pod running?"
    return doc


def pending(conn: Connection, now: float | None = None) -> list[dict]:
    """Requests no agent has claimed yet, oldest first."""
    t = snapshot_requests.c
    since = (now or time.time()) - CLAIM_WITHIN
    rows = conn.execute(
        sa.select(snapshot_requests).where(t.state == "pending", t.time >= since).order_by(t.time).limit(100)
    )
    return [dict(r) for r in rows.mappings()]


def claim(conn: Connection, rid: str, node: str) -> bool:
    """Take a pending request for ``node``; False when another agent took it first."""
    t = snapshot_requests.c
    done = conn.execute(
        snapshot_requests.update().where(t.id == rid, t.state == "pending").values(state="running", node=node)
    )
    return done.rowcount == 1


def finish(
    conn: Connection,
    rid: str,
    *,
    crash_id: str | None = None,
    volume: str | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        snapshot_requests.update()
        .where(snapshot_requests.c.id == rid)
        .values(
            state="failed" if error else "done",
            crash_id=crash_id,
            volume=volume,
            error=error,
            finished=time.time(),
        )
    )
