"""Recording in the catalog: crashes from their spool metadata, their analyses, objects and dropped dumps.

Every write is idempotent, because an agent may be killed at any point and do its work again:

- a crash row is inserted with ON CONFLICT DO NOTHING (its id is unique per capture);
- a crash's analysis is recorded only while the row is still ``pending``, and the crash's
  group is counted in the same transaction, so a group counts each crash exactly once;
- dropped-dump records are keyed by a hash of the journal line.

Forgetting an analysed crash takes it out of its group's counts again: in all, per namespace and per day.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corevault import crashrecord, fingerprint, objectid
from corevault.vault import lifecycle, search
from corevault.vault.tables import (
    crash_objects,
    crashes,
    dropped,
    fit,
    group_days,
    group_ns,
    groups,
    insert,
    least_greatest,
    namespaces,
    objects,
    reports,
    server_keys,
)


def add_crash(conn: Connection, meta: dict, analysis: str) -> bool:
    """Record a crash from its spool metadata (any version of its record); False when it was already there."""
    return bool(add_crashes(conn, [meta], analysis))


def add_crashes(conn: Connection, metas: list[dict], analysis: str) -> set[str]:
    """Record crashes from their spool metadata, in one statement per table; the ids that were new.

    The columns come from each record read in its current shape (:func:`crashrecord.load`);
    the ``meta`` column keeps what the handler wrote. Rows go in the order of their ids, so
    agents that insert overlapping batches at once wait for each other in one order and never
    deadlock; an id that is there already (shipped by another agent, or before a kill) is left
    as it is, and only the new crashes get their search values and namespace.
    """
    rows: dict[str, dict] = {}
    links: dict[tuple[str, str], dict] = {}
    for meta in metas:
        row, objects_rows = _crash_row(meta, analysis)
        rows.setdefault(row["id"], row)
        for link in objects_rows:
            links[link["crash_id"], link["path"]] = link
    if not rows:
        return set()
    ordered = [rows[k] for k in sorted(rows)]
    if conn.dialect.name == "postgresql" and len(ordered) > 1:
        new = _copy_crashes(conn, ordered)
    else:
        # one statement, compiled once per process, the rows as its parameters: SQLAlchemy
        # sends them as multi-row VALUES, and RETURNING names the rows that were new
        stmt = _ADD_CRASHES.get(conn.dialect.name)
        if stmt is None:
            stmt = insert(conn, crashes).on_conflict_do_nothing().returning(crashes.c.id)
            _ADD_CRASHES[conn.dialect.name] = stmt
        new = set(conn.execute(stmt, ordered).scalars())
        names = sorted({rows[k]["namespace"] for k in new if rows[k]["namespace"]})
        if names:
            conn.execute(insert(conn, namespaces).on_conflict_do_nothing(), [{"name": n} for n in names])
    if not new:
        return new
    search.add_crashes(conn, [rows[k] for k in sorted(new)])
    mine = [links[k] for k in sorted(links) if k[0] in new]
    if mine:
        conn.execute(insert(conn, crash_objects).on_conflict_do_nothing(), mine)
    return new


#: per dialect: the crash insert :func:`add_crashes` runs
_ADD_CRASHES: dict[str, sa.Executable] = {}

_COLUMNS = [c.name for c in crashes.columns]
#: a session's own staging table, named for the columns it has (an agent that outlives a
#: migration of ``crashes`` makes the next one rather than copy into a stale one)
_STAGING = "crashes_in_" + hashlib.sha256(" ".join(_COLUMNS).encode()).hexdigest()[:8]
# made in the transaction when missing, so that it works behind a transaction pooler too
_STAGE_SQL = f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE crashes) ON COMMIT DELETE ROWS"
_COPY_SQL = f"COPY {_STAGING} ({', '.join(_COLUMNS)}) FROM STDIN"
# ordered by id, as every agent inserts: overlapping batches never wait in a circle
_INSERT_SQL = (
    f"WITH new AS (INSERT INTO crashes ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM {_STAGING} "  # noqa: S608 - column names
    "ORDER BY id ON CONFLICT DO NOTHING RETURNING id, namespace), "
    "named AS (INSERT INTO namespaces (name) SELECT DISTINCT namespace FROM new "
    "WHERE namespace <> '' ORDER BY 1 ON CONFLICT DO NOTHING) "
    "SELECT id FROM new"
)


def _copy_crashes(conn: Connection, ordered: list[dict]) -> set[str]:
    """PostgreSQL: the rows (in id order) by COPY into a staging table, then one statement
    that inserts the new ones and their namespaces; the ids that were new.

    Measured on 2,000 crashes in batches of 64 (one process, PostgreSQL beside it): 0.06-0.08 ms
    of the agent's CPU and 0.085-0.095 ms of PostgreSQL's per crash, against 0.20 and 0.10 ms
    for SQLAlchemy's multi-row VALUES (the driver rewrites a long statement's placeholders on
    every call), 0.11-0.12 and 0.10 ms for psycopg's pipelined executemany and 0.14-0.15 and
    0.07-0.10 ms for arrays through ``unnest``; one at a time took 0.55 and 0.33 ms.
    """
    dbapi, statement = conn.dialect.loaded_dbapi, _STAGE_SQL
    try:
        with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            cur.execute(statement)
            with cur.copy(statement := _COPY_SQL) as copy:
                for row in ordered:
                    copy.write_row([row.get(c) for c in _COLUMNS])
            cur.execute(statement := _INSERT_SQL)
            return {crash_id for (crash_id,) in cur.fetchall()}
    except dbapi.Error as e:  # the driver's own, raised as SQLAlchemy raises it for its statements
        raise sa.exc.DBAPIError.instance(statement, None, e, dbapi.Error) from None


def _crash_row(meta: dict, analysis: str) -> tuple[dict, list[dict]]:
    """A crash's row and its ``crash_objects`` rows, from its spool metadata."""
    record = crashrecord.load(meta)
    pod, proc, core, sig = record["pod"], record["process"], record["core"], record["signal"]
    row = {
        "id": record["id"],
        "time": record["time"] if record["time"] >= 0 else int(time.time()),
        "captured_at": _known(record["captured_at"]),
        "node": record["node"],
        "namespace": pod["namespace"],
        "pod": pod["name"],
        "pod_uid": pod["uid"],
        "container": pod["container"],
        "container_id": pod["container_id"],
        "image": pod["image"],
        "signal": _known(sig["number"]),
        "signal_name": sig["name"],
        "exe": _known(proc["exe"]),
        "comm": _known(proc["comm"]),
        "pid": _known(proc["ns_pid"]),
        "size": _known(core["size"]),
        "stored_size": _known(core["stored_size"]),
        "truncated": core["truncated"],
        "sha256": _known(core["sha256"]),
        "fingerprint": mark if fingerprint.FORMAT.match(mark := str(record.get("fingerprint"))) else None,
        "analysis": analysis,
        "meta": json.dumps(meta, sort_keys=True),
    }
    fit(crashes, row, "exe", "comm", "image")
    objects_rows = [
        fit(crash_objects, {"crash_id": record["id"], **{k: m[k] for k in ("path", "key", "sha256")}}, "path")
        for m in record["modules"]
        if m["path"] and objectid.is_object(m["key"], m["sha256"])
    ]
    return row, objects_rows


def _known(value: int | float | str) -> int | float | str | None:
    """A record's value, or None (NULL) where the record says unknown (-1, "", or 0.0 for a time)."""
    if isinstance(value, str | float):
        return value or None
    return None if value == -1 else value


def record_analysis(conn: Connection, crash_id: str, report: dict) -> bool:
    """Store a crash's report and count it in its group, once; False if already recorded."""
    signature, title = report.get("signature"), report.get("title")
    done = conn.execute(
        crashes.update()
        .where(crashes.c.id == crash_id, crashes.c.analysis == "pending")
        .values(
            analysis="done",
            signature=signature,
            title=title,
            analysis_error=None,
            matched=bool(report.get("matched")),
        )
    ).rowcount
    if done != 1:
        return False
    conn.execute(
        insert(conn, reports)
        .values(crash_id=crash_id, backend=report.get("backend"), report=json.dumps(report))
        .on_conflict_do_nothing()
    )
    if signature:
        crash = conn.execute(
            sa.select(*(crashes.c[n] for n in ("id", "time", "namespace", "image", "exe", "pod"))).where(
                crashes.c.id == crash_id
            )
        ).one()
        when = crash.time
        signal_name = (report.get("signal") or {}).get("name")
        _add_count(conn, groups, ("signature",), {
            "signature": signature, "title": title, "signal_name": signal_name,
            "first_seen": when, "last_seen": when, "count": 1, "frames": search.group_text(report),
        })  # fmt: skip
        lifecycle.on_crash(conn, signature, crash)
        _count(conn, signature, crash, +1)
        search.add_analysed(conn, dict(crash._mapping), signature, title, search.frames_of(report))
    return True


class Match(NamedTuple):
    """What a crash may be matched to: its fingerprint, the newest sample, and how many agree."""

    fingerprint: str
    sample: str
    samples: int


def match_sample(conn: Connection, crash_id: str, samples: int, enough: int = 0) -> Match | None:
    """The :class:`Match` when ``crash_id`` may be matched rather than analysed.

    It may when its fingerprint (corevault.fingerprint) is that of at least ``samples``
    crashes of the same namespace and executable that were analysed in full (not matched)
    and all got one signature; the sample is the newest of them. ``Match.samples`` counts
    them up to ``enough`` (at least ``samples``): what the caller's decision needs.

    A crash loop's matched and waiting crashes are never read, nor more full analyses than
    that: by ``crashes_full_analyses``, the lowest and highest signature of the full analyses
    are each one seek, and the newest ``enough`` of the one signature a range that ends there.
    Counting every crash of the fingerprint, as this did, cost a loop's ten-thousandth crash
    ten thousand rows.
    """
    c = crashes.c
    row = conn.execute(sa.select(c.namespace, c.exe, c.fingerprint).where(c.id == crash_id)).one_or_none()
    if row is None or row.fingerprint is None or samples <= 0:
        return None
    same = [c.namespace.is_(None) if row.namespace is None else c.namespace == row.namespace]
    same += [c.fingerprint == row.fingerprint, c.analysis == "done", c.matched == sa.false()]
    same.append(c.exe.is_(None) if row.exe is None else c.exe == row.exe)

    def first(order: sa.ColumnElement) -> sa.ScalarSelect:
        return (
            sa.select(c.signature)
            .where(*same, c.signature.is_not(None))
            .order_by(order)
            .limit(1)
            .scalar_subquery()
        )

    low, high = conn.execute(sa.select(first(c.signature.asc()), first(c.signature.desc()))).one()
    if low is None or low != high:
        return None
    newest = conn.execute(
        sa.select(c.id).where(*same, c.signature == low).order_by(c.id.desc()).limit(max(samples, enough))
    ).scalars().all()  # fmt: skip
    return Match(row.fingerprint, newest[0], len(newest)) if len(newest) >= samples else None


def _count(conn: Connection, signature: str, crash: sa.Row, n: int) -> None:
    """Add ``n`` (1 or -1) crashes like ``crash`` (its namespace, image, time) to a group's counts."""
    ns, image, when = crash.namespace or "", crash.image or "", crash.time
    key_ns = (group_ns.c.signature == signature, group_ns.c.namespace == ns, group_ns.c.image == image)
    day = when // 86400
    key_day = (group_days.c.signature == signature, group_days.c.day == day, group_days.c.namespace == ns)
    if n > 0:
        row = {"signature": signature, "namespace": ns, "count": n}
        _add_count(conn, group_ns, ("signature", "namespace", "image"),
                   {**row, "image": image, "first_seen": when, "last_seen": when})  # fmt: skip
        _add_count(conn, group_days, ("signature", "day", "namespace"), {**row, "day": day})
        return
    for table, key in ((group_ns, key_ns), (group_days, key_day)):
        conn.execute(table.update().where(*key).values(count=table.c.count + n))
        conn.execute(table.delete().where(*key, table.c.count <= 0))


#: per (dialect, table): the statement :func:`_add_count` runs
_ADD_COUNT: dict[tuple[str, str], sa.Executable] = {}


def _add_count(conn: Connection, table: sa.Table, keys: tuple[str, ...], row: dict) -> None:
    """Insert ``row`` into ``table``, or add its count to the row with the same ``keys`` (and
    widen that row's first_seen..last_seen, where the table has them).

    One statement per table and dialect, compiled once, the values as its parameters: built
    with .values() per call, they took about a third of the agent's CPU for a crash matched
    to its group's sample (17.5 ms, now 11.4 ms, under cProfile over 60 such crashes).
    """
    stmt = _ADD_COUNT.get((conn.dialect.name, table.name))
    if stmt is None:
        ins = insert(conn, table)
        set_ = {"count": table.c.count + ins.excluded.count}
        if "first_seen" in table.c:
            least, greatest = least_greatest(conn)
            set_["first_seen"] = least(table.c.first_seen, ins.excluded.first_seen)
            set_["last_seen"] = greatest(table.c.last_seen, ins.excluded.last_seen)
        stmt = ins.on_conflict_do_update(index_elements=[table.c[k] for k in keys], set_=set_)
        _ADD_COUNT[conn.dialect.name, table.name] = stmt
    conn.execute(stmt, row)


def record_analysis_failure(conn: Connection, crash_id: str, error: str) -> None:
    conn.execute(
        crashes.update()
        .where(crashes.c.id == crash_id, crashes.c.analysis == "pending")
        .values(analysis="failed", analysis_error=error[:2000])
    )


def add_object(conn: Connection, key: str, sha256: str, size: int, debuginfo: bool | None = None) -> None:
    conn.execute(
        insert(conn, objects)
        .values(key=key, sha256=sha256, size=size, stored_at=time.time(), debuginfo=debuginfo)
        .on_conflict_do_nothing()
    )


def add_dropped(conn: Connection, records: list[dict]) -> int:
    """Record journal lines about dropped, cut or refused dumps; duplicates are ignored."""
    rows = []
    for r in records:
        line = json.dumps(r, sort_keys=True)
        pod = r.get("pod") or {}
        rows.append(
            fit(dropped, {
                "id": hashlib.sha256(line.encode()).hexdigest(),
                "time": float(r.get("time") or 0),
                "node": r.get("node"),
                "event": r.get("event", "?"),
                "reason": r.get("reason"),
                "pid": r.get("pid"),
                "exe": r.get("exe"),
                "namespace": pod.get("namespace"),
                "pod": pod.get("name"),
                "container": pod.get("container"),
                "record": line,
            }, "exe")
        )  # fmt: skip
    if not rows:
        return 0
    return conn.execute(insert(conn, dropped).values(rows).on_conflict_do_nothing()).rowcount


def forget(conn: Connection, crash_id: str) -> None:
    """Remove a crash's rows (its report and build-id references with it), its group counts, and
    what it alone held of the search's tables."""
    c = crashes.c
    row = conn.execute(
        sa.select(c.signature, c.namespace, c.image, c.time, c.analysis, c.pod, c.exe, c.title).where(
            c.id == crash_id
        )
    ).first()
    counted = row.signature if row is not None and row.analysis == "done" and row.signature else None
    if counted:
        _count(conn, counted, row, -1)
        _uncount_group(conn, counted)
    conn.execute(reports.delete().where(reports.c.crash_id == crash_id))
    conn.execute(crash_objects.delete().where(crash_objects.c.crash_id == crash_id))
    conn.execute(crashes.delete().where(crashes.c.id == crash_id))
    if row is not None:
        search.forget(conn, dict(row._mapping), counted)


def _uncount_group(conn: Connection, signature: str) -> None:
    """One crash fewer in a group: its count, and its first and last seen made again of what its
    per-namespace rows have left (kept as they were when none is left)."""
    gn, g = group_ns.c, groups.c
    left = sa.select(sa.func.min(gn.first_seen), sa.func.max(gn.last_seen)).where(gn.signature == signature)
    first, last = conn.execute(left).one()
    values: dict = {"count": g.count - 1}
    if first is not None:
        values.update(first_seen=first, last_seen=last)
    conn.execute(groups.update().where(g.signature == signature, g.count > 0).values(**values))


def rebuild_group_counts(conn: Connection) -> None:
    """Count every analysed crash into the group tables (per namespace, per day, in all), from scratch."""
    for table in (group_ns, group_days, namespaces):
        conn.execute(table.delete())
    c = crashes.c
    counted = sa.and_(c.analysis == "done", c.signature.is_not(None))
    ns, image = sa.func.coalesce(c.namespace, ""), sa.func.coalesce(c.image, "")
    conn.execute(
        group_ns.insert().from_select(
            ["signature", "namespace", "image", "count", "first_seen", "last_seen"],
            sa.select(c.signature, ns, image, sa.func.count(), sa.func.min(c.time), sa.func.max(c.time))
            .where(counted)
            .group_by(c.signature, ns, image),
        )
    )
    day = c.time // 86400  # floor: "/" on integers is numeric division in PostgreSQL, and a cast rounds
    conn.execute(
        group_days.insert().from_select(
            ["signature", "day", "namespace", "count"],
            sa.select(c.signature, day, ns, sa.func.count()).where(counted).group_by(c.signature, day, ns),
        )
    )
    conn.execute(
        namespaces.insert().from_select(
            ["name"], sa.select(c.namespace).where(c.namespace.is_not(None)).distinct()
        )
    )
    recount_groups(conn)


def recount_groups(conn: Connection) -> None:
    """Make each group's count, first and last seen again from its per-namespace rows."""
    gn = group_ns.c
    of_group = [gn.signature == groups.c.signature]
    conn.execute(
        groups.update().values(
            count=sa.select(sa.func.coalesce(sa.func.sum(gn.count), 0)).where(*of_group).scalar_subquery(),
            first_seen=sa.func.coalesce(
                sa.select(sa.func.min(gn.first_seen)).where(*of_group).scalar_subquery(), groups.c.first_seen
            ),
            last_seen=sa.func.coalesce(
                sa.select(sa.func.max(gn.last_seen)).where(*of_group).scalar_subquery(), groups.c.last_seen
            ),
        )
    )


def shared_key(conn: Connection, name: str) -> bytes:
    """The catalog's key ``name`` (32 random bytes), made by whichever server asks first."""
    import secrets

    conn.execute(
        insert(conn, server_keys).values(name=name, value=secrets.token_hex(32)).on_conflict_do_nothing()
    )
    value = conn.execute(sa.select(server_keys.c.value).where(server_keys.c.name == name)).scalar_one()
    return bytes.fromhex(value)
