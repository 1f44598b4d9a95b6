"""Crash groups' lifecycle (open, resolved, ignored, regressed), its history, and the events of alerts.

A group has a state in each namespace it crashed in ("" for host processes): a row of
``group_states`` keyed by signature and namespace, ``open`` where there is none. A group is a
signature, a hash of function names a pod's binary chooses, so a pod of one namespace can crash
into another namespace's group: its crash regresses, reopens or counts toward an ignore in its
own namespace only, and a reader changes the state in the namespaces they may update. What a
reader sees is the most urgent state of the namespaces they may read (``URGENCY``), with each
namespace's own beside it. People move a namespace's state:

- ``resolved``: fixed. Optionally "resolved in image X": then only a crash from X, or from
  an image corevault had never seen crash before the group was resolved, counts as a
  regression; a crash from an image already known then is an old replica still running.
- ``ignored``: until a time (``until``), or until ``crashes`` more crashes in that namespace, or for good.
  Once the time passes or the count is reached the group is ``open`` again: reads see the
  time at once, the next crash writes it down.
- ``regressed``: set by corevault when a resolved group crashes again (a crash that
  happened after it was resolved; one analysed late that happened before does not count).

Every change, by a person or by corevault, is a row of ``group_history`` per namespace it
changed, read by the readers of that namespace. The catalog
also writes ``group_events`` (``new``: a group's first crash in a namespace; ``regressed``; ``spike``,
written by the alert dispatcher), each with the namespace and image of the crash behind
it: alerts and metrics are made from those rows, so an event is never lost between the
transaction that counted the crash and a notifier that restarts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corevault.errors import BadInput
from corevault.vault.tables import group_ns, insert, metadata

STATES = ("open", "resolved", "ignored", "regressed")
#: what the default list shows: the groups that need someone's attention
ATTENTION = ("open", "regressed")
EVENTS = ("new", "regressed", "spike")
#: how several namespaces' states make the one a reader sees: the most urgent of them
URGENCY = ("resolved", "ignored", "open", "regressed")

group_states = sa.Table(
    "group_states",
    metadata,
    sa.Column("signature", sa.String(32), primary_key=True),
    #: "" for a host process's crash
    sa.Column("namespace", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("actor", sa.String(255)),
    #: "resolved in image X"
    sa.Column("resolved_in", sa.String(512)),
    #: ignored until this time (epoch seconds)
    sa.Column("ignore_until", sa.BigInteger),
    #: ignored until the group's count in this namespace reaches this
    sa.Column("ignore_until_count", sa.Integer),
)

group_history = sa.Table(
    "group_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("signature", sa.String(32), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    #: a reader's name, or "corevault" for what the catalog decided itself
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    #: JSON: resolved_in, until, crashes, comment, crash (the one that regressed it)
    sa.Column("detail", sa.Text, nullable=False),
    #: the namespace whose state changed ("" for host processes); NULL only before schema v17
    sa.Column("namespace", sa.String(255)),
)
sa.Index("group_history_signature", group_history.c.signature, group_history.c.id)

group_events = sa.Table(
    "group_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("signature", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    #: "" for a host process's crash
    sa.Column("namespace", sa.String(255), nullable=False),
    sa.Column("image", sa.String(512)),
    sa.Column("crash_id", sa.String(80)),
    #: spikes are written once per group, namespace and window: this is the window's start
    sa.Column("window", sa.BigInteger),
    sa.Column("count", sa.Integer),
    sa.UniqueConstraint("signature", "namespace", "kind", "window", name="group_events_once"),
)
sa.Index("group_events_kind_namespace", group_events.c.kind, group_events.c.namespace)

TABLES = [group_states, group_history, group_events]

alert_deliveries = sa.Table(
    "alert_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sink", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(32), nullable=False),
    sa.Column("event_id", sa.Integer, nullable=False),
    #: when the event was written: the next event of the group for this sink waits a window past it
    sa.Column("event_time", sa.Float, nullable=False),
    #: pending, sent, failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_try", sa.Float, nullable=False),
    sa.Column("lease_until", sa.Float),
    sa.Column("sent_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.UniqueConstraint("sink", "event_id", name="alert_deliveries_once"),
)
sa.Index(
    "alert_deliveries_group",
    alert_deliveries.c.sink,
    alert_deliveries.c.signature,
    alert_deliveries.c.event_time,
)
sa.Index("alert_deliveries_due", alert_deliveries.c.status, alert_deliveries.c.next_try)

#: how far the fan-out got through group_events; and how many events each sink did not get
alert_cursor = sa.Table(
    "alert_cursor",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

#: the alert outbox (corevault.alerts.outbox): schema v4
ALERT_TABLES = [alert_deliveries, alert_cursor]

CORVAULT = "corevault"


class StateError(BadInput):
    """A state change that cannot be made as asked; the message says how to ask."""


@dataclass(frozen=True, slots=True)
class Change:
    """What a person asks for: a new state and its conditions."""

    state: str
    resolved_in: str | None = None
    until: int | None = None
    crashes: int | None = None
    comment: str | None = None

    def check(self) -> None:
        if self.state not in ("open", "resolved", "ignored"):
            raise StateError(f"state {self.state!r}: use open, resolved or ignored")
        if self.resolved_in is not None and self.state != "resolved":
            raise StateError("resolved_in goes with state resolved only")
        if (self.until is not None or self.crashes is not None) and self.state != "ignored":
            raise StateError("until and crashes go with state ignored only")
        if self.crashes is not None and not 1 <= self.crashes <= 1_000_000_000:
            raise StateError(f"crashes {self.crashes}: ignore until 1 to 1000000000 more crashes")
        if self.comment is not None and len(self.comment) > 2000:
            raise StateError("comment: at most 2000 characters")


def parse_states(text: str | None) -> list[str] | None:
    """``open,regressed`` → those states; ``all`` → None (no filter); None → what needs attention."""
    if text is None:
        return list(ATTENTION)
    if text.strip() == "all":
        return None
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STATES]
    if unknown or not wanted:
        raise StateError(f"state {text!r}: use all, or some of {', '.join(STATES)} separated by commas")
    return wanted


def effective_state(now: float | None = None) -> sa.ColumnElement:
    """A namespace's state as readers see it at ``now``: an ignore whose time has passed is open,
    and so is a namespace without a row (outer-joined)."""
    s = group_states.c
    now = time.time() if now is None else now
    return sa.case(
        (sa.and_(s.state == "ignored", s.ignore_until.is_not(None), s.ignore_until <= int(now)), "open"),
        else_=sa.func.coalesce(s.state, "open"),
    )


def _urgency(now: float | None) -> sa.ColumnElement:
    state = effective_state(now)
    return sa.case(*((state == name, rank) for rank, name in enumerate(URGENCY)), else_=URGENCY.index("open"))


def seen_state(
    signature: sa.ColumnElement, scope: list[sa.ColumnElement], now: float | None = None
) -> sa.ScalarSelect:
    """The rank in ``URGENCY`` of the most urgent state of the group ``signature`` over its
    ``group_namespaces`` rows that match ``scope``: what a reader of those namespaces sees.

    A correlated subquery over the group's own rows (their primary key's prefix), each joined
    to its namespace's state by primary key: a page of the group list reads the rows of the
    groups it walks, not every state.
    """
    gn, s = group_ns.c, group_states.c
    joined = group_ns.outerjoin(
        group_states, sa.and_(s.signature == gn.signature, s.namespace == gn.namespace)
    )
    rank = sa.func.coalesce(sa.func.max(_urgency(now)), URGENCY.index("open"))
    query = sa.select(rank).select_from(joined).where(gn.signature == signature, *scope)
    return query.scalar_subquery()


def state_name(rank: sa.ColumnElement) -> sa.ColumnElement:
    """The state named by a rank of ``URGENCY``."""
    return sa.case(*((rank == n, name) for n, name in enumerate(URGENCY)), else_="open")


def ranks(states: Collection[str]) -> list[int]:
    return [URGENCY.index(name) for name in states]


def group_namespaces(conn: Connection, signature: str) -> list[str]:
    """Every namespace the group crashed in, whoever may see them ("" for host processes)."""
    gn = group_ns.c
    query = sa.select(gn.namespace).where(gn.signature == signature).distinct().order_by(gn.namespace)
    return list(conn.execute(query).scalars())


def _blank() -> dict:
    return {"state": "open", "since": None, "actor": None, "resolved_in": None, "ignore_until": None,
            "ignore_until_count": None}  # fmt: skip


def state_of(
    conn: Connection, signature: str, visible: Collection[str] | None = None, now: float | None = None
) -> dict:
    """The group's state over the ``visible`` namespaces it crashed in (None: all of them): the
    most urgent one's (the newest among equals), and under ``namespaces`` each one's own."""
    now = time.time() if now is None else now
    crashed_in = [ns for ns in group_namespaces(conn, signature) if visible is None or ns in visible]
    s = group_states.c
    rows = conn.execute(sa.select(group_states).where(s.signature == signature, s.namespace.in_(crashed_in)))
    own = {row.namespace: dict(row._mapping) for row in rows}
    each = []
    for ns in crashed_in:
        doc = own.get(ns) or _blank()
        doc = {k: v for k, v in doc.items() if k not in ("signature", "namespace")}
        if doc["state"] == "ignored" and doc["ignore_until"] is not None and doc["ignore_until"] <= now:
            doc.update(state="open", since=float(doc["ignore_until"]), actor=CORVAULT)
        each.append({"namespace": ns, **doc})
    if not each:
        return {**_blank(), "namespaces": []}
    top = max(each, key=lambda d: (URGENCY.index(d["state"]), d["since"] or 0.0))
    return {**{k: v for k, v in top.items() if k != "namespace"}, "namespaces": each}


def history(
    conn: Connection, signature: str, visible: Collection[str] | None = None, limit: int = 100
) -> list[dict]:
    """The group's changes in the ``visible`` namespaces, newest first; one change made in several
    namespaces at once is one entry that names them (``namespaces``)."""
    h = group_history.c
    query = sa.select(h.time, h.actor, h.state, h.detail, h.namespace).where(h.signature == signature)
    if visible is not None:
        query = query.where(h.namespace.in_(sorted(visible)))
    # a change is a row per namespace: enough rows for ``limit`` changes of up to 20 namespaces each
    rows = conn.execute(query.order_by(h.time.desc(), h.id.desc()).limit(limit * 20))
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r.time, r.actor, r.state, r.detail)
        if key not in merged:
            if len(merged) == limit:
                break
            merged[key] = {"time": r.time, "actor": r.actor, "state": r.state, **json.loads(r.detail),
                           "namespaces": []}  # fmt: skip
        if r.namespace is not None:
            merged[key]["namespaces"].append(r.namespace)
    for entry in merged.values():
        entry["namespaces"].sort()
    return list(merged.values())


def _write(
    conn: Connection, key: tuple[str, str], state: str, actor: str, now: float, **fields: object
) -> None:
    """Set the state of the group and namespace ``key`` and add it to their history."""
    signature, namespace = key
    values = {**_blank(), "state": state, "since": now, "actor": actor}
    values.update({k: v for k, v in fields.items() if k in values})
    ins = insert(conn, group_states).values(signature=signature, namespace=namespace, **values)
    keys = [group_states.c.signature, group_states.c.namespace]
    conn.execute(ins.on_conflict_do_update(index_elements=keys, set_=values))
    detail = json.dumps({k: v for k, v in fields.items() if v is not None})
    row = {"signature": signature, "namespace": namespace, "time": now, "actor": actor, "state": state}
    conn.execute(group_history.insert().values(**row, detail=detail))


def _count_in(conn: Connection, signature: str, namespace: str) -> int:
    gn = group_ns.c
    query = sa.select(sa.func.coalesce(sa.func.sum(gn.count), 0))
    return int(conn.execute(query.where(gn.signature == signature, gn.namespace == namespace)).scalar_one())


def change(
    conn: Connection,
    signature: str,
    want: Change,
    actor: str,
    now: float | None = None,
    *,
    namespaces: Collection[str] | None = None,
) -> None:
    """Move a group to the state a person asked for in ``namespaces`` (None: every namespace it
    crashed in) and record it there; another namespace's state stays as it was."""
    want.check()
    now = time.time() if now is None else now
    if want.until is not None and want.until <= now:  # taken as asked, the ignore would end at once
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(want.until))
        raise StateError(f"until {when} is already past; ignore until a later time")
    crashed_in = group_namespaces(conn, signature)
    if not crashed_in:
        raise StateError(f"no crash group {signature!r}")
    chosen = [ns for ns in crashed_in if namespaces is None or ns in namespaces]
    if not chosen:
        raise StateError(f"crash group {signature!r} has no crash in the namespaces you may change")
    for ns in chosen:
        until_count = _count_in(conn, signature, ns) + want.crashes if want.crashes is not None else None
        _write(
            conn, (signature, ns), want.state, actor, now, resolved_in=want.resolved_in,
            ignore_until=want.until, ignore_until_count=until_count, until=want.until, crashes=want.crashes,
            comment=want.comment,
        )  # fmt: skip


def _image_known_before(conn: Connection, namespace: str, image: str, before: float) -> bool:
    """Whether any group's crash in ``namespace`` came from ``image`` before ``before`` (another
    namespace's crashes, which its pods choose, tell nothing of this one's replicas)."""
    gn = group_ns.c
    query = sa.select(sa.func.min(gn.first_seen)).where(gn.image == image, gn.namespace == namespace)
    first = conn.execute(query).scalar()
    return first is not None and first < before


def on_crash(conn: Connection, signature: str, crash: sa.Row) -> str | None:
    """Called in the transaction that counts an analysed crash into its group, before it is counted.

    ``crash`` has id, time, namespace and image. Writes the group's ``new`` event (its first
    crash in this namespace: each namespace hears of a group it has not had before) or its
    ``regressed`` event and state changes, in the crash's namespace only; returns the event's
    kind, if any.
    """
    ns, image = crash.namespace or "", crash.image or None
    gn, s = group_ns.c, group_states.c
    seen_here = conn.execute(
        sa.select(sa.literal(1)).where(gn.signature == signature, gn.namespace == ns).limit(1)
    ).first()
    event = "new" if seen_here is None else None
    current = conn.execute(sa.select(group_states).where(s.signature == signature, s.namespace == ns)).first()
    if current is not None:
        event = _follow_up(conn, signature, current, crash) or event
    if event is not None:
        conn.execute(
            insert(conn, group_events)
            .values(signature=signature, kind=event, time=time.time(), namespace=ns, image=image,
                    crash_id=crash.id, window=None, count=1)
            .on_conflict_do_nothing()
        )  # fmt: skip
    return event


def _follow_up(conn: Connection, signature: str, current: sa.Row, crash: sa.Row) -> str | None:
    now, ns = time.time(), current.namespace
    if current.state == "resolved":
        if crash.time < current.since:
            return None  # it happened before the fix was declared; analysed late
        older = crash.image and _image_known_before(conn, ns, crash.image, current.since)
        if current.resolved_in and crash.image != current.resolved_in and older:
            return None  # an older image, still running somewhere: not a regression
        _write(conn, (signature, ns), "regressed", CORVAULT, now, crash=crash.id, image=crash.image,
               resolved_in=current.resolved_in)  # fmt: skip
        return "regressed"
    if current.state == "ignored":
        # this crash is counted into the namespace's rows after this call: hence the 1
        count = _count_in(conn, signature, ns) + 1
        expired_time = current.ignore_until is not None and current.ignore_until <= now
        expired_count = current.ignore_until_count is not None and count >= current.ignore_until_count
        if expired_time or expired_count:
            why = "the ignore time passed" if expired_time else "the ignored number of crashes was reached"
            _write(conn, (signature, ns), "open", CORVAULT, now, comment=why, crash=crash.id)
    return None


def record_spike(
    conn: Connection, signature: str, namespace: str, *, window: int, count: int, image: str | None
) -> bool:
    """Write a spike event once per group, namespace and window; False when it was there already."""
    ins = insert(conn, group_events).values(
        signature=signature, kind="spike", time=time.time(), namespace=namespace, image=image,
        window=window, count=count,
    )  # fmt: skip
    return conn.execute(ins.on_conflict_do_nothing()).rowcount == 1


def event_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(namespace, kind, events) over every event ever written: the metrics' counters."""
    e = group_events.c
    query = sa.select(e.namespace, e.kind, sa.func.count()).group_by(e.namespace, e.kind)
    return [(ns, kind, int(n)) for ns, kind, n in conn.execute(query)]


def state_counts(conn: Connection, now: float | None = None) -> list[tuple[str, str, int]]:
    """(namespace, state, groups): each group counted in every namespace it crashed in, in the
    state it has there."""
    gn, s = group_ns.c, group_states.c
    state = effective_state(now).label("state")
    pairs = sa.select(gn.signature, gn.namespace).distinct().subquery()
    own = sa.and_(s.signature == pairs.c.signature, s.namespace == pairs.c.namespace)
    query = (
        sa.select(pairs.c.namespace, state, sa.func.count())
        .select_from(pairs.outerjoin(group_states, own))
        .group_by(pairs.c.namespace, state)
    )
    return [(ns, st, int(n)) for ns, st, n in conn.execute(query)]
