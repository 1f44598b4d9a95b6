"""The catalog: one row per crash, one per crash group, the reports and what was dropped.

SQLAlchemy Core over SQLite (WAL; the default for one machine) or PostgreSQL (by URL, when
many nodes' agents share one catalog). Every write is idempotent, because an agent may be
killed at any point and do its work again:

- a crash row is inserted with ON CONFLICT DO NOTHING (its id is unique per capture);
- a crash's analysis is recorded only while the row is still ``pending``, and the crash's
  group is counted in the same transaction, so a group counts each crash exactly once;
- dropped-dump records are keyed by a hash of the journal line.

Groups are counted per namespace and image (``group_namespaces``) and per day
(``group_days``) as well, so that a reader allowed only some namespaces sees counts, trends
and first/last-seen times made of those namespaces' crashes alone, at the cost of reading a
few thousand rows rather than the crashes themselves. Forgetting an analysed crash takes it
out of those counts again.

Schema changes are numbered migrations applied at connect time under a lock
(``pg_advisory_xact_lock`` on PostgreSQL, an immediate transaction on SQLite), so agents
starting together migrate once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from corevault import objectid
from corevault.errors import UserError

metadata = sa.MetaData()

crashes = sa.Table(
    "crashes",
    metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("captured_at", sa.Float),
    sa.Column("node", sa.String(255)),
    sa.Column("namespace", sa.String(255)),
    sa.Column("pod", sa.String(255)),
    sa.Column("pod_uid", sa.String(64)),
    sa.Column("container", sa.String(255)),
    sa.Column("container_id", sa.String(128)),
    sa.Column("image", sa.String(512)),
    sa.Column("signal", sa.Integer),
    sa.Column("signal_name", sa.String(16)),
    sa.Column("exe", sa.String(1024)),
    sa.Column("comm", sa.String(64)),
    sa.Column("pid", sa.Integer),
    sa.Column("size", sa.BigInteger),
    sa.Column("stored_size", sa.BigInteger),
    sa.Column("truncated", sa.Boolean),
    sa.Column("sha256", sa.String(64)),
    sa.Column("signature", sa.String(32)),
    sa.Column("title", sa.Text),
    #: pending, done, failed or off
    sa.Column("analysis", sa.String(16), nullable=False),
    sa.Column("analysis_error", sa.Text),
    sa.Column("meta", sa.Text, nullable=False),
)
for _col in ("namespace", "pod", "container", "image", "node", "signal", "exe", "signature"):
    sa.Index(f"crashes_{_col}_time", crashes.c[_col], crashes.c.time)
sa.Index("crashes_time", crashes.c.time)

groups = sa.Table(
    "crash_groups",
    metadata,
    sa.Column("signature", sa.String(32), primary_key=True),
    sa.Column("title", sa.Text),
    sa.Column("signal_name", sa.String(16)),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
)
sa.Index("crash_groups_last_seen", groups.c.last_seen)

reports = sa.Table(
    "reports",
    metadata,
    sa.Column("crash_id", sa.String(80), sa.ForeignKey("crashes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("backend", sa.String(16)),
    sa.Column("report", sa.Text, nullable=False),
)

#: schema v1-v2: one binary per build-id, whoever claimed it first (replaced in v3)
_legacy = sa.MetaData()
_crash_buildids = sa.Table(
    "crash_buildids",
    _legacy,
    sa.Column("crash_id", sa.String(80), primary_key=True),
    sa.Column("build_id", sa.String(80), primary_key=True),
    sa.Column("path", sa.String(1024)),
)
_buildids = sa.Table(
    "buildids",
    _legacy,
    sa.Column("build_id", sa.String(80), primary_key=True),
    sa.Column("size", sa.BigInteger),
    sa.Column("stored_at", sa.Float),
    sa.Column("debuginfo", sa.Boolean),
)

#: The mapped ELF objects the vault holds, by key and content (see corevault.objectid);
#: ``sha256`` is "" for binaries kept before v3, stored by build-id alone.
objects = sa.Table(
    "objects",
    metadata,
    sa.Column("key", sa.String(80), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger),
    sa.Column("stored_at", sa.Float),
    #: whether the stored file carries DWARF, so it can be served as debuginfo
    sa.Column("debuginfo", sa.Boolean),
)

#: which object (key and content) each crash's process really mapped, at which path
crash_objects = sa.Table(
    "crash_objects",
    metadata,
    sa.Column("crash_id", sa.String(80), sa.ForeignKey("crashes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("path", sa.String(1024), primary_key=True),
    sa.Column("key", sa.String(80), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
)
sa.Index("crash_objects_object", crash_objects.c.key, crash_objects.c.sha256)

#: "" stands for "none" in these keys: a host's crash has no namespace, a process no image
group_ns = sa.Table(
    "group_namespaces",
    metadata,
    sa.Column("signature", sa.String(32), primary_key=True),
    sa.Column("namespace", sa.String(255), primary_key=True),
    sa.Column("image", sa.String(512), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
)

group_days = sa.Table(
    "group_days",
    metadata,
    sa.Column("signature", sa.String(32), primary_key=True),
    #: days since the epoch (UTC)
    sa.Column("day", sa.Integer, primary_key=True),
    sa.Column("namespace", sa.String(255), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)

#: every namespace that ever had a crash: what a per-namespace access check walks
namespaces = sa.Table("namespaces", metadata, sa.Column("name", sa.String(255), primary_key=True))

dropped = sa.Table(
    "dropped",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("node", sa.String(255)),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("pid", sa.Integer),
    sa.Column("exe", sa.String(1024)),
    sa.Column("namespace", sa.String(255)),
    sa.Column("pod", sa.String(255)),
    sa.Column("container", sa.String(255)),
    sa.Column("record", sa.Text, nullable=False),
)
sa.Index("dropped_time", dropped.c.time)

schema = sa.Table("corevault_schema", metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[crashes, groups, reports, dropped])
    _legacy.create_all(conn)


def _v2(conn: Connection) -> None:
    """Per-namespace and per-day group counts, the namespaces seen, and buildids.debuginfo."""
    if "debuginfo" not in {c["name"] for c in sa.inspect(conn).get_columns("buildids")}:
        conn.execute(sa.text("ALTER TABLE buildids ADD COLUMN debuginfo BOOLEAN"))
    metadata.create_all(conn, tables=[group_ns, group_days, namespaces])
    rebuild_group_counts(conn)


def rebuild_group_counts(conn: Connection) -> None:
    """Count every analysed crash into the per-namespace and per-day group tables, from scratch."""
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
    day = sa.cast(c.time / 86400, sa.Integer)
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


def _v3(conn: Connection) -> None:
    """Groups' lifecycle (states, history, events) and the crash search index."""
    from corevault.vault import lifecycle, search

    metadata.create_all(conn, tables=lifecycle.TABLES)
    search.create(conn)
    search.rebuild(conn)


def _v4(conn: Connection) -> None:
    """Snapshot requests, taken by the agent of the node that runs the pod."""
    from corevault.vault import snapshots

    metadata.create_all(conn, tables=snapshots.TABLES)


def _v5(conn: Connection) -> None:
    """The alert outbox (deliveries of group events to sinks, the fan-out's cursor), search statistics."""
    from corevault.vault import lifecycle, search

    metadata.create_all(conn, tables=lifecycle.ALERT_TABLES)
    search.create_stats(conn)
    if conn.dialect.name == "sqlite":
        search.refresh_stats(conn)


def _v6(conn: Connection) -> None:
    """Objects by key and content hash; the build-id tables' rows carried over as legacy ("")."""
    metadata.create_all(conn, tables=[objects, crash_objects])
    b, cb = _buildids.c, _crash_buildids.c
    conn.execute(
        objects.insert().from_select(
            ["key", "sha256", "size", "stored_at", "debuginfo"],
            sa.select(b.build_id, sa.literal(""), b.size, b.stored_at, b.debuginfo),
        )
    )
    conn.execute(
        crash_objects.insert().from_select(
            ["crash_id", "path", "key", "sha256"],
            sa.select(cb.crash_id, sa.func.coalesce(cb.path, cb.build_id), cb.build_id, sa.literal("")),
        )
    )
    _legacy.drop_all(conn)


#: Numbered schema migrations; a new one is appended, never edited.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]


class CatalogError(UserError):
    """The catalog cannot be reached or used; the message says which and how."""


def connect(url: str) -> Engine:
    """An engine for ``url`` with the schema brought up to date."""
    if url.startswith("sqlite:///"):
        import os

        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi: object, _record: object) -> None:
            cur = dbapi.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    else:
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
            raise CatalogError(
                f"catalog URL {url!r} is not usable ({e}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            ) from None
    # add_crash and friends read an INSERT's rowcount (new, or there already?); SQLAlchemy 2.1
    # leaves it at -1 on psycopg unless asked, and a PostgreSQL catalog then never learnt a namespace
    engine = engine.execution_options(preserve_rowcount=True)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        raise CatalogError(f"cannot open the catalog at {engine.url!r}: {e.orig}") from None
    return engine


def migrate(engine: Engine) -> int:
    """Apply the migrations the catalog lacks; returns the schema version."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        import fcntl

        with open(f"{engine.url.database}.migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _migrate(engine)
    return _migrate(engine)


def _migrate(engine: Engine) -> int:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7301952)"))
        schema.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema.c.version))).scalar() or 0
        for version, step in enumerate(MIGRATIONS, start=1):
            if version > current:
                step(conn)
                conn.execute(schema.insert().values(version=version))
        return len(MIGRATIONS)


def _insert(conn: Connection, table: sa.Table):  # -> the dialect's Insert
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def add_crash(conn: Connection, meta: dict, analysis: str) -> bool:
    """Record a crash from its spool metadata; False when it was already there."""
    pod = meta.get("pod") or {}
    proc = meta.get("process") or {}
    core = meta.get("core") or {}
    row = {
        "id": meta["id"],
        "time": int(meta.get("time") or time.time()),
        "captured_at": meta.get("captured_at"),
        "node": meta.get("node"),
        "namespace": pod.get("namespace"),
        "pod": pod.get("name"),
        "pod_uid": pod.get("uid"),
        "container": pod.get("container"),
        "container_id": pod.get("container_id"),
        "image": pod.get("image"),
        "signal": (meta.get("signal") or {}).get("number"),
        "signal_name": (meta.get("signal") or {}).get("name"),
        "exe": proc.get("exe"),
        "comm": proc.get("comm"),
        "pid": proc.get("ns_pid"),
        "size": core.get("size"),
        "stored_size": core.get("stored_size"),
        "truncated": bool(core.get("truncated")),
        "sha256": core.get("sha256"),
        "analysis": analysis,
        "meta": json.dumps(meta, sort_keys=True),
    }
    _fit(crashes, row, "exe", "comm", "image")
    inserted = conn.execute(_insert(conn, crashes).values(**row).on_conflict_do_nothing()).rowcount == 1
    if inserted:
        from corevault.vault import search

        search.index(conn, row)
    if inserted and row["namespace"]:
        conn.execute(_insert(conn, namespaces).values(name=row["namespace"]).on_conflict_do_nothing())
    objects_rows = (
        _fit(
            crash_objects,
            {"crash_id": meta["id"], "path": m["path"], "key": m["key"], "sha256": m["sha256"]},
            "path",
        )
        for m in meta.get("modules", [])
        if isinstance(m, dict)
        and isinstance(m.get("path"), str)
        and objectid.is_object(m.get("key"), m.get("sha256"))
    )
    rows = {r["path"]: r for r in objects_rows}
    if rows:
        conn.execute(_insert(conn, crash_objects).values(list(rows.values())).on_conflict_do_nothing())
    return inserted


def _fit(table: sa.Table, row: dict, *names: str) -> dict:
    """Cut the named text values to their columns' lengths, which PostgreSQL enforces.

    A process chooses its executable's and its files' paths (up to 4 KiB); over a column's
    length its crash could never be recorded, nor the other records inserted with it. The
    whole values stay in ``meta`` and ``record``.
    """
    for name in names:
        value, length = row.get(name), table.c[name].type.length
        if isinstance(value, str) and length is not None and len(value) > length:
            row[name] = value[:length]
    return row


def record_analysis(conn: Connection, crash_id: str, report: dict) -> bool:
    """Store a crash's report and count it in its group, once; False if already recorded."""
    signature, title = report.get("signature"), report.get("title")
    done = conn.execute(
        crashes.update()
        .where(crashes.c.id == crash_id, crashes.c.analysis == "pending")
        .values(analysis="done", signature=signature, title=title, analysis_error=None)
    ).rowcount
    if done != 1:
        return False
    conn.execute(
        _insert(conn, reports)
        .values(crash_id=crash_id, backend=report.get("backend"), report=json.dumps(report))
        .on_conflict_do_nothing()
    )
    if signature:
        from corevault.vault import lifecycle, search

        crash = conn.execute(
            sa.select(*(crashes.c[n] for n in ("id", "time", "namespace", "image", "exe", "pod"))).where(
                crashes.c.id == crash_id
            )
        ).one()
        when = crash.time
        signal_name = (report.get("signal") or {}).get("name")
        ins = _insert(conn, groups).values(
            signature=signature,
            title=title,
            signal_name=signal_name,
            first_seen=when,
            last_seen=when,
            count=1,
        )
        least, greatest = _least_greatest(conn)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=[groups.c.signature],
                set_={
                    "count": groups.c.count + 1,
                    "first_seen": least(groups.c.first_seen, ins.excluded.first_seen),
                    "last_seen": greatest(groups.c.last_seen, ins.excluded.last_seen),
                },
            )
        )
        lifecycle.on_crash(conn, signature, crash)
        _count(conn, signature, crash, +1)
        row = {**crash._mapping, "title": title, "signature": signature}
        search.index(conn, row, search.frames_of(report))
    return True


def _least_greatest(conn: Connection):  # -> the dialect's two-argument min and max
    return (sa.func.min, sa.func.max) if conn.dialect.name == "sqlite" else (sa.func.least, sa.func.greatest)


def _count(conn: Connection, signature: str, crash: sa.Row, n: int) -> None:
    """Add ``n`` (1 or -1) crashes like ``crash`` (its namespace, image, time) to a group's counts."""
    ns, image, when = crash.namespace or "", crash.image or "", crash.time
    key_ns = (group_ns.c.signature == signature, group_ns.c.namespace == ns, group_ns.c.image == image)
    day = when // 86400
    key_day = (group_days.c.signature == signature, group_days.c.day == day, group_days.c.namespace == ns)
    if n > 0:
        least, greatest = _least_greatest(conn)
        ins = _insert(conn, group_ns).values(
            signature=signature, namespace=ns, image=image, count=n, first_seen=when, last_seen=when
        )
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=[group_ns.c.signature, group_ns.c.namespace, group_ns.c.image],
                set_={
                    "count": group_ns.c.count + n,
                    "first_seen": least(group_ns.c.first_seen, ins.excluded.first_seen),
                    "last_seen": greatest(group_ns.c.last_seen, ins.excluded.last_seen),
                },
            )
        )
        ins = _insert(conn, group_days).values(signature=signature, day=day, namespace=ns, count=n)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=[group_days.c.signature, group_days.c.day, group_days.c.namespace],
                set_={"count": group_days.c.count + n},
            )
        )
        return
    for table, key in ((group_ns, key_ns), (group_days, key_day)):
        conn.execute(table.update().where(*key).values(count=table.c.count + n))
        conn.execute(table.delete().where(*key, table.c.count <= 0))


def record_analysis_failure(conn: Connection, crash_id: str, error: str) -> None:
    conn.execute(
        crashes.update()
        .where(crashes.c.id == crash_id, crashes.c.analysis == "pending")
        .values(analysis="failed", analysis_error=error[:2000])
    )


def add_object(conn: Connection, key: str, sha256: str, size: int, debuginfo: bool | None = None) -> None:
    conn.execute(
        _insert(conn, objects)
        .values(key=key, sha256=sha256, size=size, stored_at=time.time(), debuginfo=debuginfo)
        .on_conflict_do_nothing()
    )


def object_for(
    conn: Connection, key: str, visible: Collection[str] | None = None, crash_id: str | None = None
) -> dict | None:
    """The object stored under ``key`` that a crash ``visible`` may see (None: all) really mapped.

    Several contents may claim one key (one of them forged): the answer is always one that a
    crash the reader may read mapped itself, that crash's own when ``crash_id`` is given,
    else the one of the most recent such crash.
    """
    co, o, c = crash_objects.c, objects.c, crashes.c
    query = (
        sa.select(objects)
        .select_from(
            crash_objects.join(crashes, c.id == co.crash_id).join(
                objects, sa.and_(o.key == co.key, o.sha256 == co.sha256)
            )
        )
        .where(co.key == key)
        .order_by(c.time.desc(), c.id.desc())
        .limit(1)
    )
    if visible is not None:
        query = query.where(c.namespace.in_(list(visible)))
    if crash_id is not None:
        query = query.where(co.crash_id == crash_id)
    row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def known_objects(conn: Connection, wanted: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    wanted = list(wanted)
    if not wanted:
        return set()
    o = objects.c
    query = sa.select(o.key, o.sha256).where(o.key.in_({k for k, _ in wanted}))
    return {(k, s) for k, s in conn.execute(query)} & set(wanted)


def add_dropped(conn: Connection, records: list[dict]) -> int:
    """Record journal lines about dropped, cut or refused dumps; duplicates are ignored."""
    rows = []
    for r in records:
        line = json.dumps(r, sort_keys=True)
        pod = r.get("pod") or {}
        rows.append(
            _fit(dropped, {
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
    return conn.execute(_insert(conn, dropped).values(rows).on_conflict_do_nothing()).rowcount


@dataclass(frozen=True, slots=True)
class Filters:
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    image: str | None = None
    node: str | None = None
    signal: str | None = None
    exe: str | None = None
    group: str | None = None
    since: int | None = None
    until: int | None = None
    #: words that must all appear in the title, frames, executable, pod or image
    search: str | None = None
    #: the namespaces the reader may see; None: every crash, the hosts' own included
    visible: frozenset[str] | None = None


def _where(query: sa.Select, f: Filters) -> sa.Select:
    c = crashes.c
    for column, value in (
        (c.namespace, f.namespace), (c.pod, f.pod), (c.container, f.container), (c.image, f.image),
        (c.node, f.node), (c.exe, f.exe), (c.signature, f.group),
    ):  # fmt: skip
        if value is not None:
            query = query.where(column == value)
    if f.signal is not None:
        if f.signal.isdigit():
            query = query.where(c.signal == int(f.signal))
        else:
            query = query.where(c.signal_name == _signal_name(f.signal))
    if f.visible is not None:
        query = query.where(c.namespace.in_(sorted(f.visible)) if f.visible else sa.false())
    if f.since is not None:
        query = query.where(c.time >= f.since)
    if f.until is not None:
        query = query.where(c.time < f.until)
    return query


LIST_COLUMNS = (
    "id", "time", "node", "namespace", "pod", "container", "image", "signal", "signal_name", "exe", "size",
    "truncated", "signature", "title", "analysis",
)  # fmt: skip


def list_crashes(
    conn: Connection, filters: Filters = Filters(), limit: int = 50, before: tuple | None = None
) -> list[dict]:
    """Crashes newest first; ``before`` is the (time, id) of the last row of the previous page.

    With ``filters.search`` each row also has ``search_key`` and ``before`` is the
    (search_key, id) of the previous page's last row: the search index's own order.
    """
    columns = [crashes.c[n] for n in LIST_COLUMNS]
    if filters.search:
        from corevault.vault import search

        found, crash_id, key = search.matching(conn, filters.search)
        query = sa.select(*columns, key.label("search_key")).select_from(
            found.join(crashes, crashes.c.id == crash_id)
        )
        query = _where(query, filters)
        if before is not None:
            k, i = before
            tie = sa.false() if conn.dialect.name == "sqlite" else sa.and_(key == k, crash_id < i)
            query = query.where(sa.or_(key < k, tie))
        # SQLite's key is unique, and ordering by it alone lets FTS5 walk its rowids backwards
        order = [key.desc()] if conn.dialect.name == "sqlite" else [key.desc(), crash_id.desc()]
        query = query.order_by(*order).limit(limit)
        return [dict(r._mapping) for r in conn.execute(query)]
    query = _where(sa.select(*columns), filters)
    if before is not None:
        t, i = before
        query = query.where(sa.or_(crashes.c.time < t, sa.and_(crashes.c.time == t, crashes.c.id < i)))
    query = query.order_by(crashes.c.time.desc(), crashes.c.id.desc()).limit(limit)
    return [dict(r._mapping) for r in conn.execute(query)]


def get_crash(conn: Connection, crash_id: str) -> dict | None:
    row = conn.execute(sa.select(crashes).where(crashes.c.id == crash_id)).first()
    if row is None:
        return None
    doc = dict(row._mapping)
    doc["meta"] = json.loads(doc["meta"])
    report = conn.execute(sa.select(reports.c.report).where(reports.c.crash_id == crash_id)).scalar()
    doc["report"] = json.loads(report) if report else None
    return doc


def _signal_name(value: str) -> str:
    sig = value.upper()
    return sig if sig.startswith("SIG") else "SIG" + sig


def repository(image: str) -> str:
    """An image reference without its tag or digest: ``registry/app:1.2`` → ``registry/app``."""
    name = image.split("@", 1)[0]
    head, sep, tag = name.rpartition(":")
    return head if sep and "/" not in tag else name


def list_groups(
    conn: Connection,
    limit: int = 100,
    *,
    visible: Collection[str] | None = None,
    namespace: str | None = None,
    image: str | None = None,
    signal: str | None = None,
    signature: str | None = None,
    since: int | None = None,
    before: tuple[int, str] | None = None,
    days: int = 14,
    now: float | None = None,
    states: Collection[str] | None = None,
    search: str | None = None,
    new_in: str | None = None,
) -> list[dict]:
    """Crash groups, most recently seen first, counted over the ``visible`` namespaces only.

    Each has its signature, title, signal, count, first and last seen, the namespaces and
    images it was seen in, and ``daily``: its crashes on each of the last ``days`` days
    (UTC), oldest first, counted over the namespaces but not per image (``group_days`` has
    no image), so with ``image`` the daily counts are those of every image of the group.
    ``before`` is the (last_seen, signature) of the previous page's last group.

    Each also has its ``state`` (see :mod:`corevault.vault.lifecycle`; ``states`` keeps
    only those), ``per_image`` (count, first and last seen per image), ``first_image``,
    ``last_image`` and ``new_in``: the first image, when that image's repository had
    crashed in another image before the group first did (the group came with a rollout).
    ``search`` keeps groups with a crash matching it; ``new_in`` keeps groups new in it.
    All of it is made of the ``visible`` namespaces only.
    """
    from corevault.vault import lifecycle

    gn = group_ns.c
    agg = sa.select(
        gn.signature,
        sa.func.sum(gn.count).label("count"),
        sa.func.min(gn.first_seen).label("first_seen"),
        sa.func.max(gn.last_seen).label("last_seen"),
    ).group_by(gn.signature)
    scope = []
    if visible is not None:
        scope.append(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        scope.append(gn.namespace == namespace)
    if image is not None:
        scope.append(gn.image == image)
    if signature is not None:
        scope.append(gn.signature == signature)
    if search:
        from corevault.vault import search as fts

        scope.append(gn.signature.in_(fts.signatures(conn, search, visible, namespace)))
    if new_in is not None:
        scope.append(gn.signature.in_(_new_in(conn, new_in, visible, namespace)))
    sub = agg.where(*scope).subquery()
    state = lifecycle.effective_state(now).label("state")
    query = (
        sa.select(sub, groups.c.title, groups.c.signal_name, state)
        .join(groups, groups.c.signature == sub.c.signature)
        .outerjoin(lifecycle.group_states, lifecycle.group_states.c.signature == sub.c.signature)
    )
    if signal is not None:
        query = query.where(groups.c.signal_name == _signal_name(signal))
    if since is not None:
        query = query.where(sub.c.last_seen >= since)
    if states is not None:
        query = query.where(state.in_(list(states)))
    if before is not None:
        t, sig = before
        query = query.where(sa.or_(sub.c.last_seen < t, sa.and_(sub.c.last_seen == t, sub.c.signature < sig)))
    query = query.order_by(sub.c.last_seen.desc(), sub.c.signature.desc()).limit(limit)
    found = [dict(r._mapping) for r in conn.execute(query)]
    if not found:
        return found
    by_sig = {g["signature"]: g for g in found}
    today = int((time.time() if now is None else now) // 86400)
    for g in found:
        g["count"] = int(g["count"])
        g["namespaces"], g["per_image"], g["daily"] = set(), {}, [0] * days
    where = [gn.signature.in_(list(by_sig)), *scope]
    for sig, ns, img, n, first, last in conn.execute(
        sa.select(gn.signature, gn.namespace, gn.image, gn.count, gn.first_seen, gn.last_seen).where(*where)
    ):
        by_sig[sig]["namespaces"].add(ns)
        blank = {"image": img or None, "count": 0, "first_seen": first, "last_seen": last}
        seen = by_sig[sig]["per_image"].setdefault(img, blank)
        seen["count"] += n
        seen["first_seen"], seen["last_seen"] = min(seen["first_seen"], first), max(seen["last_seen"], last)
    gd = group_days.c
    daily = sa.select(gd.signature, gd.day, sa.func.sum(gd.count)).where(
        gd.signature.in_(list(by_sig)), gd.day > today - days
    )
    if visible is not None:
        daily = daily.where(gd.namespace.in_(sorted(visible)))
    if namespace is not None:
        daily = daily.where(gd.namespace == namespace)
    for sig, day, n in conn.execute(daily.group_by(gd.signature, gd.day)):
        by_sig[sig]["daily"][day - today + days - 1] = int(n)
    firsts = _image_first_seen(conn, visible, namespace)
    for g in found:
        g["namespaces"] = sorted(n for n in g["namespaces"] if n)
        per_image = sorted(g["per_image"].values(), key=lambda i: (i["first_seen"], i["image"] or ""))
        g["per_image"] = per_image
        g["images"] = sorted(i["image"] for i in per_image if i["image"])
        g["first_image"] = per_image[0]["image"] if per_image else None
        g["last_image"] = max(per_image, key=lambda i: i["last_seen"])["image"] if per_image else None
        g["new_in"] = _is_new_in(g["first_image"], g["first_seen"], firsts)
    return found


def _image_first_seen(
    conn: Connection, visible: Collection[str] | None, namespace: str | None
) -> dict[str, int]:
    """When each image first crashed, over the namespaces in scope."""
    gn = group_ns.c
    query = sa.select(gn.image, sa.func.min(gn.first_seen)).where(gn.image != "").group_by(gn.image)
    if visible is not None:
        query = query.where(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        query = query.where(gn.namespace == namespace)
    return {img: int(t) for img, t in conn.execute(query)}


def _is_new_in(image: str | None, first_seen: int, firsts: dict[str, int]) -> str | None:
    if not image:
        return None
    repo = repository(image)
    earlier = any(t < first_seen and i != image and repository(i) == repo for i, t in firsts.items())
    return image if earlier else None


def _new_in(
    conn: Connection, image: str, visible: Collection[str] | None, namespace: str | None
) -> list[str]:
    """The signatures of groups new in ``image`` over the namespaces in scope."""
    gn = group_ns.c
    scope = []
    if visible is not None:
        scope.append(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        scope.append(gn.namespace == namespace)
    in_image = sa.select(gn.signature).where(gn.image == image, *scope).distinct()
    candidates = list(conn.execute(in_image).scalars())
    if not candidates:
        return []
    firsts = _image_first_seen(conn, visible, namespace)
    query = sa.select(gn.signature, gn.image, gn.first_seen).where(gn.signature.in_(candidates), *scope)
    first: dict[str, tuple[int, str]] = {}
    for sig, img, t in conn.execute(query):
        if sig not in first or (t, img) < first[sig]:
            first[sig] = (t, img)
    return [sig for sig, (t, img) in first.items() if img == image and _is_new_in(img, t, firsts)]


def list_namespaces(conn: Connection) -> list[str]:
    return list(conn.execute(sa.select(namespaces.c.name).order_by(namespaces.c.name)).scalars())


def forget(conn: Connection, crash_id: str) -> None:
    """Remove a crash's rows (its report and build-id references with it), and its group counts."""
    c = crashes.c
    row = conn.execute(
        sa.select(c.signature, c.namespace, c.image, c.time, c.analysis).where(c.id == crash_id)
    ).first()
    if row is not None and row.analysis == "done" and row.signature:
        _count(conn, row.signature, row, -1)
    from corevault.vault import search

    search.forget(conn, crash_id)
    conn.execute(reports.delete().where(reports.c.crash_id == crash_id))
    conn.execute(crash_objects.delete().where(crash_objects.c.crash_id == crash_id))
    conn.execute(crashes.delete().where(crashes.c.id == crash_id))


def list_dropped(conn: Connection, limit: int = 100) -> list[dict]:
    query = sa.select(dropped).order_by(dropped.c.time.desc()).limit(limit)
    return [dict(r._mapping) for r in conn.execute(query)]
