"""The catalog's tables: one row per crash, one per group, the reports, the objects, what was dropped.

The bottom of the catalog: the tables of the other parts (``lifecycle``, ``search``,
``snapshots``) share this ``metadata``, and ``recording``, ``queries`` and ``migrations``
build their statements from these tables. Also here: the little SQL that differs between
SQLite and PostgreSQL, which every writer needs.

Groups are counted per namespace and image (``group_namespaces``) and per day
(``group_days``) as well, so that a reader allowed only some namespaces sees counts, trends
and first/last-seen times made of those namespaces' crashes alone, at the cost of reading a
few thousand rows rather than the crashes themselves.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

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
    #: where it crashed, cheaply (corevault.fingerprint), as the capture handler took it
    sa.Column("fingerprint", sa.String(32)),
    #: whether the analysis was a match to its group's samples rather than a full one
    sa.Column("matched", sa.Boolean),
)
for _col in ("namespace", "pod", "container", "image", "node", "signal", "exe", "signature"):
    sa.Index(f"crashes_{_col}_time", crashes.c[_col], crashes.c.time)
sa.Index("crashes_time", crashes.c.time)
#: a fingerprint's full analyses by signature, newest last: what matching a crash reads
#: (recording.match_sample), never the matched crashes of its loop
FULL_ANALYSES = ("namespace", "fingerprint", "analysis", "matched", "signature", "id")
sa.Index("crashes_full_analyses", *(crashes.c[name] for name in FULL_ANALYSES))

groups = sa.Table(
    "crash_groups",
    metadata,
    sa.Column("signature", sa.String(32), primary_key=True),
    sa.Column("title", sa.Text),
    sa.Column("signal_name", sa.String(16)),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    #: its signature's frames, one a line: what a crash search checks a crash's group by
    sa.Column("frames", sa.Text),
)
#: the group list over every namespace walks it, newest first, a page at a time
sa.Index("crash_groups_newest", groups.c.last_seen, groups.c.signature)

reports = sa.Table(
    "reports",
    metadata,
    sa.Column("crash_id", sa.String(80), sa.ForeignKey("crashes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("backend", sa.String(16)),
    sa.Column("report", sa.Text, nullable=False),
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

#: secrets that every server of one catalog shares (the key that signs the group page's forms),
#: so that any of them takes a form another one gave out
server_keys = sa.Table(
    "server_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(128), nullable=False),
)


def insert(conn: Connection, table: sa.Table):  # -> the dialect's Insert
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def least_greatest(conn: Connection):  # -> the dialect's two-argument min and max
    return (sa.func.min, sa.func.max) if conn.dialect.name == "sqlite" else (sa.func.least, sa.func.greatest)


def fit(table: sa.Table, row: dict, *names: str) -> dict:
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
