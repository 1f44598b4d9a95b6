"""The alert outbox: group events become deliveries in the catalog, sent until a sink takes them.

The catalog writes a group's ``new`` and ``regressed`` events in the transaction that counts
the crash (:mod:`corevault.vault.lifecycle`); :func:`find_spikes` writes ``spike`` events.
Each round of the :class:`Dispatcher`:

1. fans the events written since its cursor out to the sinks that want them, as rows of
   ``alert_deliveries``, in one transaction with the cursor (one fan-out at a time). An
   event of a group that the sink was told of less than ``window`` seconds earlier is
   counted as ``suppressed`` instead, so a sink hears of a group at most once per window,
   whatever storm is going on;
2. claims due deliveries with a short lease (two servers never send the same one at once),
   sends each, and marks it ``sent``, or schedules a retry with exponential backoff
   (``retry_first`` doubling up to ``retry_max``); after ``give_up`` seconds it is ``failed``.

Everything lives in the catalog, so a restart forgets nothing: unsent deliveries are sent
by the next round of whichever server runs. A crash between a sink's "200 OK" and the row's
``sent`` sends it once more (at least once); the delivery id in the alert lets a receiver
drop that repeat.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from corevault.alerts import payload
from corevault.alerts.sinks import AlertSettings, Sink
from corevault.vault import lifecycle, tables
from corevault.vault.tables import insert

log = logging.getLogger("corevault.alerts")

deliveries, cursor = lifecycle.alert_deliveries, lifecycle.alert_cursor
LEASE = 60.0


def _cursor(conn: Connection, name: str) -> int:
    value = conn.execute(sa.select(cursor.c.value).where(cursor.c.name == name)).scalar()
    return int(value or 0)


def _set_cursor(conn: Connection, name: str, value: int) -> None:
    ins = insert(conn, cursor).values(name=name, value=value)
    conn.execute(ins.on_conflict_do_update(index_elements=[cursor.c.name], set_={"value": value}))


def fan_out(conn: Connection, cfg: AlertSettings, now: float | None = None) -> int:
    """Turn the events written since the last round into deliveries; returns how many were made."""
    now = time.time() if now is None else now
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7301953)"))  # one fan-out at a time
    last = _cursor(conn, "events")
    e = lifecycle.group_events.c
    events = conn.execute(
        sa.select(lifecycle.group_events).where(e.id > last).order_by(e.id).limit(1000)
    ).all()
    made = 0
    d = deliveries.c
    for ev in events:
        for sink in cfg.sinks:
            if not sink.wants(ev.kind, ev.namespace):
                continue
            recent = conn.execute(
                sa.select(d.id).where(d.sink == sink.name, d.signature == ev.signature,
                                      d.event_time > ev.time - cfg.window).limit(1)
            ).first()  # fmt: skip
            if recent is not None:
                _set_cursor(conn, f"suppressed:{sink.name}", _cursor(conn, f"suppressed:{sink.name}") + 1)
                continue
            ins = insert(conn, deliveries).values(
                sink=sink.name, signature=ev.signature, event_id=ev.id, event_time=ev.time, status="pending",
                created=now, attempts=0, next_try=now,
            )  # fmt: skip
            made += conn.execute(ins.on_conflict_do_nothing()).rowcount
    if events:
        _set_cursor(conn, "events", events[-1].id)
    return made


def find_spikes(conn: Connection, cfg: AlertSettings, now: float | None = None) -> int:
    """Write a spike event per group with over ``spike_crashes`` in ``spike_minutes`` in one namespace."""
    now = time.time() if now is None else now
    span = cfg.spike_minutes * 60
    c = tables.crashes.c
    ns = sa.func.coalesce(c.namespace, "")
    query = (
        sa.select(c.signature, ns.label("namespace"), sa.func.count().label("n"), sa.func.max(c.image))
        .where(c.time >= int(now - span), c.analysis == "done", c.signature.is_not(None))
        .group_by(c.signature, ns)
        .having(sa.func.count() > cfg.spike_crashes)
    )
    written = 0
    for sig, namespace, n, image in conn.execute(query).all():
        written += lifecycle.record_spike(conn, sig, namespace, window=int(now // span), count=n, image=image)
    return written


def _claim(engine: Engine, now: float, limit: int = 20) -> list[sa.Row]:
    d = deliveries.c
    claimed = []
    free = sa.or_(d.lease_until.is_(None), d.lease_until < now)
    with engine.begin() as conn:
        due = conn.execute(
            sa.select(d.id)
            .where(d.status == "pending", d.next_try <= now, free)
            .order_by(d.next_try)
            .limit(limit)
        ).scalars().all()  # fmt: skip
        for delivery_id in due:
            taken = conn.execute(
                deliveries.update()
                .where(d.id == delivery_id, d.status == "pending", free)
                .values(lease_until=now + LEASE)
            ).rowcount  # fmt: skip
            if taken:
                claimed.append(delivery_id)
        if not claimed:
            return []
        return conn.execute(sa.select(deliveries).where(d.id.in_(claimed))).all()


def _event(conn: Connection, delivery: sa.Row) -> tuple[dict, dict]:
    """The delivery's event (with the group's count in its namespace) and the group."""
    e = lifecycle.group_events.c
    ev = dict(conn.execute(sa.select(lifecycle.group_events).where(e.id == delivery.event_id)).one()._mapping)
    gn = tables.group_ns.c
    ev["count_in_namespace"] = int(
        conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(gn.count), 0)).where(
                gn.signature == ev["signature"], gn.namespace == ev["namespace"]
            )
        ).scalar_one()
    )
    row = conn.execute(sa.select(tables.groups).where(tables.groups.c.signature == ev["signature"])).first()
    group = dict(row._mapping) if row else {"title": None, "signal_name": None}
    # the title of this namespace's newest crash of the group, not the group's: a title may hold
    # what one crash said (its last words), and an alert carries its own namespace's data only
    c = tables.crashes.c
    own = c.namespace == ev["namespace"] if ev["namespace"] else c.namespace.is_(None)
    group["title"] = conn.execute(
        sa.select(c.title).where(c.signature == ev["signature"], own).order_by(c.time.desc()).limit(1)
    ).scalar()
    group["state"] = lifecycle.state_of(conn, ev["signature"], [ev["namespace"]])["state"]
    return ev, group


def request(sink: Sink, doc: dict, now: int) -> tuple[bytes, dict[str, str]]:
    if sink.kind == "slack":
        return payload.slack(doc)
    assert sink.secret is not None
    return payload.webhook(doc, sink.secret, now)


def _update(conn: Connection, delivery_id: int, **values: object) -> None:
    """Record a delivery's outcome and release its lease."""
    conn.execute(deliveries.update().where(deliveries.c.id == delivery_id).values(**values, lease_until=None))


def send_due(engine: Engine, cfg: AlertSettings, client: httpx.Client, now: float | None = None) -> int:
    """Send the deliveries that are due; returns how many a sink accepted."""
    now = time.time() if now is None else now
    sinks = {s.name: s for s in cfg.sinks}
    accepted = 0
    for delivery in _claim(engine, now):
        sink = sinks.get(delivery.sink)
        if sink is None:  # the sink was removed from the settings: nobody to tell
            with engine.begin() as conn:
                _update(
                    conn, delivery.id, status="failed", last_error="no such sink in the settings any more"
                )
            continue
        with engine.connect() as conn:
            ev, group = _event(conn, delivery)
        doc = payload.body(delivery.id, ev, group, cfg.url)
        raw, headers = request(sink, doc, int(now))
        error = None
        try:
            response = client.post(sink.url, content=raw, headers=headers)
            if response.status_code >= 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        with engine.begin() as conn:
            if error is None:
                accepted += 1
                _update(conn, delivery.id, status="sent", sent_at=time.time(), attempts=delivery.attempts + 1)
                continue
            attempts = delivery.attempts + 1
            wait = min(cfg.retry_max, cfg.retry_first * 2 ** (attempts - 1))
            gave_up = now + wait - delivery.created > cfg.give_up
            log.warning(
                "alert %s to %s: %s%s", delivery.id, sink.name, error, "; giving up" if gave_up else ""
            )
            _update(conn, delivery.id, status="failed" if gave_up else "pending", attempts=attempts,
                    next_try=now + wait, last_error=error[:500])  # fmt: skip
    return accepted


def run_once(engine: Engine, cfg: AlertSettings, client: httpx.Client, now: float | None = None) -> int:
    with engine.begin() as conn:
        find_spikes(conn, cfg, now)
    with engine.begin() as conn:
        fan_out(conn, cfg, now)
    return send_due(engine, cfg, client, now)


def status_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(sink, status, deliveries), with ``suppressed`` for the events a window held back."""
    d = deliveries.c
    rows = [(s, st, int(n)) for s, st, n in conn.execute(
        sa.select(d.sink, d.status, sa.func.count()).group_by(d.sink, d.status))]  # fmt: skip
    for name, value in conn.execute(sa.select(cursor.c.name, cursor.c.value)):
        if name.startswith("suppressed:"):
            rows.append((name.removeprefix("suppressed:"), "suppressed", int(value)))
    return rows


class Dispatcher:
    """A thread that runs :func:`run_once` every ``poll`` seconds until stopped."""

    def __init__(self, engine: Engine, cfg: AlertSettings) -> None:
        self.engine, self.cfg = engine, cfg
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="corevault-alerts", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        with httpx.Client(timeout=10.0, follow_redirects=False) as client:
            while not self._stop.is_set():
                try:
                    run_once(self.engine, self.cfg, client)
                except Exception:  # a bad round must not end alerting; the next round tries again
                    log.exception("alert round failed")
                self._stop.wait(self.cfg.poll)
