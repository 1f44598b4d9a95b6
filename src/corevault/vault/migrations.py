"""The catalog's schema versions: numbered migrations applied at connect time under a lock.

The lock is ``pg_advisory_xact_lock`` on PostgreSQL and a file lock beside the database plus
an immediate transaction on SQLite, so agents starting together migrate once. A new version
is a function appended to ``MIGRATIONS``, never an edit of an old one. This module sits above
every part whose tables it creates (``tables``, ``lifecycle``, ``search``, ``snapshots``).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from corevault.vault import lifecycle, search, snapshots, tables
from corevault.vault.recording import rebuild_group_counts, recount_groups

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


schema = sa.Table("corevault_schema", tables.metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1(conn: Connection) -> None:
    tables.metadata.create_all(conn, tables=[tables.crashes, tables.groups, tables.reports, tables.dropped])
    _legacy.create_all(conn)


def _v2(conn: Connection) -> None:
    """Per-namespace and per-day group counts, the namespaces seen, and buildids.debuginfo."""
    if "debuginfo" not in {c["name"] for c in sa.inspect(conn).get_columns("buildids")}:
        conn.execute(sa.text("ALTER TABLE buildids ADD COLUMN debuginfo BOOLEAN"))
    tables.metadata.create_all(conn, tables=[tables.group_ns, tables.group_days, tables.namespaces])
    rebuild_group_counts(conn)


#: schema v3-v8: one search text per crash (replaced in v9 by the search dictionary); made empty,
#: since v9 drops it
_LEGACY_SEARCH = {
    "sqlite": [
        "CREATE VIRTUAL TABLE IF NOT EXISTS crash_search USING fts5("
        "crash_id UNINDEXED, signature UNINDEXED, namespace UNINDEXED, doc, tokenize='trigram')",
    ],
    "postgresql": [
        "CREATE TABLE IF NOT EXISTS crash_search_pg (crash_id VARCHAR(80) PRIMARY KEY "
        "REFERENCES crashes(id) ON DELETE CASCADE, time BIGINT NOT NULL, doc TEXT NOT NULL)",
    ],
}


def _v3(conn: Connection) -> None:
    """Groups' lifecycle (states, history, events) and the crash search index."""
    tables.metadata.create_all(conn, tables=lifecycle.TABLES)
    for statement in _LEGACY_SEARCH[conn.dialect.name]:
        conn.exec_driver_sql(statement)


def _v4(conn: Connection) -> None:
    """Snapshot requests, taken by the agent of the node that runs the pod."""
    tables.metadata.create_all(conn, tables=snapshots.TABLES)


def _v5(conn: Connection) -> None:
    """The alert outbox (deliveries of group events to sinks, the fan-out's cursor), search statistics."""
    tables.metadata.create_all(conn, tables=lifecycle.ALERT_TABLES)


def _v6(conn: Connection) -> None:
    """Objects by key and content hash; the build-id tables' rows carried over as legacy ("")."""
    tables.metadata.create_all(conn, tables=[tables.objects, tables.crash_objects])
    b, cb = _buildids.c, _crash_buildids.c
    conn.execute(
        tables.objects.insert().from_select(
            ["key", "sha256", "size", "stored_at", "debuginfo"],
            sa.select(b.build_id, sa.literal(""), b.size, b.stored_at, b.debuginfo),
        )
    )
    conn.execute(
        tables.crash_objects.insert().from_select(
            ["crash_id", "path", "key", "sha256"],
            sa.select(cb.crash_id, sa.func.coalesce(cb.path, cb.build_id), cb.build_id, sa.literal("")),
        )
    )
    _legacy.drop_all(conn)


def _v7(conn: Connection) -> None:
    """Crashes' fingerprints, and whether an analysis was a match (corevault.fingerprint)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("crashes")}
    for name, kind in (("fingerprint", "VARCHAR(32)"), ("matched", "BOOLEAN")):
        if name not in have:
            conn.execute(sa.text(f"ALTER TABLE crashes ADD COLUMN {name} {kind}"))
    # (a new catalog has it already: v1 creates the table as it is now)
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS crashes_namespace_fingerprint ON crashes (namespace, fingerprint)"
        )
    )


def _v8(conn: Connection) -> None:
    """The keys every server of the catalog shares."""
    tables.metadata.create_all(conn, tables=[tables.server_keys])


def _v9(conn: Connection) -> None:
    """The search dictionary in place of a search text per crash; group totals that forgetting kept
    too high made again; the groups' newest-first index."""
    for statement in ("DROP TABLE IF EXISTS crash_search", "DROP TABLE IF EXISTS crash_search_stats",
                      "DROP TABLE IF EXISTS crash_search_pg"):  # fmt: skip
        conn.exec_driver_sql(statement)
    search.create(conn)
    search.rebuild_terms(conn)
    recount_groups(conn)
    conn.exec_driver_sql("DROP INDEX IF EXISTS crash_groups_last_seen")
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS crash_groups_newest ON crash_groups (last_seen, signature)"
    )


def _v10(conn: Connection) -> None:
    """Each group's frames, which a crash search checks a word of many values against."""
    if "frames" not in {c["name"] for c in sa.inspect(conn).get_columns("crash_groups")}:
        conn.exec_driver_sql("ALTER TABLE crash_groups ADD COLUMN frames TEXT")
    search.rebuild_frames(conn)


def _v11(conn: Connection) -> None:
    """Groups' terms by group, for the group search's check of a word of many values."""
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS group_terms_group ON group_terms (signature, namespace, value_id)"
    )


def _v12(conn: Connection) -> None:
    """Groups' per-namespace rows by image, in byte order: the images of a repository are a range."""
    collation = ' COLLATE "C"' if conn.dialect.name == "postgresql" else ""
    columns = f"(image{collation}, first_seen)"
    conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS group_namespaces_image ON group_namespaces {columns}")


def _v13(conn: Connection) -> None:
    """A fingerprint's full analyses by signature, in place of all its crashes by namespace."""
    columns = ", ".join(tables.FULL_ANALYSES)
    conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS crashes_full_analyses ON crashes ({columns})")
    conn.exec_driver_sql("DROP INDEX IF EXISTS crashes_namespace_fingerprint")


def _v14(conn: Connection) -> None:
    """On SQLite, the walk of time with the columns a crash search checks (``crashes_time_search``)."""
    search.create_walk_index(conn)


def _v15(conn: Connection) -> None:
    """Groups' per-namespace rows by namespace: a reader's group list sums its own namespaces'
    rows, not all of them (a seek of 100 rows where PostgreSQL read all 20,000 of the bench's
    catalog, twice a page). Neither count nor times are in it, so their updates stay HOT."""
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS group_namespaces_namespace ON group_namespaces (namespace, signature)"
    )


def _v16(conn: Connection) -> None:
    """On SQLite, a namespace's walk of time with the columns a crash search checks, in place of the
    narrow walks of time (``crashes_namespace_search``)."""
    search.create_namespace_walk_index(conn)


def _v17(conn: Connection) -> None:
    """A group's state per namespace: each group's state (v3-v16: one per group) copied to every
    namespace it crashed in, an ignore of N more crashes becoming N more in each; and its history
    likewise, each change a row per namespace. A group with no crash left keeps no state."""
    if "namespace" in {c["name"] for c in sa.inspect(conn).get_columns("group_states")}:
        return  # a new catalog: v3 made the tables as they are now
    gn = tables.group_ns.c
    old = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM group_states"))]
    totals = dict(conn.execute(sa.select(tables.groups.c.signature, tables.groups.c.count)).all())
    per_ns = sa.select(gn.signature, gn.namespace, sa.func.sum(gn.count)).group_by(gn.signature, gn.namespace)
    counts: dict[str, list[tuple[str, int]]] = {}
    for sig, ns, n in conn.execute(per_ns):
        counts.setdefault(sig, []).append((ns, int(n)))
    rows = []
    for row in old:
        for ns, n in counts.get(row["signature"], ()):
            until = row["ignore_until_count"]
            if until is not None:  # the crashes still to come were counted over the whole group
                until = n + max(until - int(totals.get(row["signature"]) or 0), 1)
            rows.append({**row, "namespace": ns, "ignore_until_count": until})
    conn.exec_driver_sql("DROP TABLE group_states")
    lifecycle.group_states.create(conn)
    if rows:
        conn.execute(lifecycle.group_states.insert(), rows)
    conn.exec_driver_sql("ALTER TABLE group_history ADD COLUMN namespace VARCHAR(255)")
    h = lifecycle.group_history.c
    pairs = sa.select(gn.signature, gn.namespace).distinct().subquery()
    each = sa.select(h.signature, h.time, h.actor, h.state, h.detail, pairs.c.namespace)
    each = each.join_from(lifecycle.group_history, pairs, pairs.c.signature == h.signature)
    names = ["signature", "time", "actor", "state", "detail", "namespace"]
    conn.execute(
        lifecycle.group_history.insert().from_select(names, each.where(h.namespace.is_(None)).order_by(h.id))
    )
    conn.execute(lifecycle.group_history.delete().where(h.namespace.is_(None)))


#: Numbered schema migrations; a new one is appended, never edited.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11, _v12, _v13, _v14, _v15, _v16, _v17,
]  # fmt: skip


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
