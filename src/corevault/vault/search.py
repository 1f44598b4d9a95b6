"""Full-text search over crashes: title, the signature's frames, executable, pod and image.

The database's own index does the work, never a scan in Python:

- SQLite: an FTS5 table with the ``trigram`` tokenizer, so a term matches anywhere inside a
  word (``handler`` finds ``ns::Service::handler_7``, ``web-7`` finds pod ``web-7f9c``),
  case-insensitively. Its rowid is the crash's time (seconds) shifted left by 24 bits plus
  a hash of the id, so "newest first" is FTS5's own descending rowid walk and a page stops
  after ``limit`` hits even when a term matches a million crashes.
- PostgreSQL: a ``pg_trgm`` GIN index over the same text; ``ILIKE`` per term, the crash
  time index orders.

Every term must match (AND); a term needs three characters or more (a trigram). The
search text is written when a crash is added and again when it is analysed (its title and
frames are known then), in the same transaction as the catalog rows.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corevault.errors import UserError

MAX_TERMS = 8
MAX_QUERY = 256
#: what separates words: ASCII whitespace only, the same in Python and in the API's JSON Schema
_SPACE = r" \t\n\r\f\v"
#: :func:`terms`' rules as a regular expression, for the API's schema
PATTERN = rf"^[{_SPACE}]*[^{_SPACE}]{{3,}}([{_SPACE}]+[^{_SPACE}]{{3,}}){{0,{MAX_TERMS - 1}}}[{_SPACE}]*$"
_SQLITE = "crash_search"
_PG = "crash_search_pg"
_PG_TABLE = sa.table(_PG, sa.column("crash_id"), sa.column("time"), sa.column("doc"))


class SearchError(UserError):
    """A search text this catalog cannot look for; the message says how to write it."""


def terms(q: str) -> list[str]:
    """The terms of a search text; SearchError when one is too short or there are too many."""
    if len(q) > MAX_QUERY:
        raise SearchError(f"search text: at most {MAX_QUERY} characters")
    words = [w for w in re.split(f"[{_SPACE}]+", q) if w]
    if not words:
        raise SearchError("search text: give at least one word of three characters or more")
    if len(words) > MAX_TERMS:
        raise SearchError(f"search text: at most {MAX_TERMS} words")
    short = [w for w in words if len(w) < 3]
    if short:
        raise SearchError(f"search word {short[0]!r}: words need three characters or more")
    return words


def create(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE IF NOT EXISTS crash_search USING fts5("
            "crash_id UNINDEXED, signature UNINDEXED, namespace UNINDEXED, doc, tokenize='trigram')"
        )
    else:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS crash_search_pg (crash_id VARCHAR(80) PRIMARY KEY "
            "REFERENCES crashes(id) ON DELETE CASCADE, time BIGINT NOT NULL, doc TEXT NOT NULL)"
        )
        for index in ("crash_search_pg_doc ON crash_search_pg USING gin (doc gin_trgm_ops)",
                      "crash_search_pg_time ON crash_search_pg (time DESC, crash_id DESC)"):  # fmt: skip
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS " + index)


def _key(time: int, crash_id: str) -> int:
    return (int(time) << 24) | (zlib.crc32(crash_id.encode()) & 0xFFFFFF)


def document(crash: dict, frames: list[str] | None = None) -> str:
    """The searchable text of a crash row (and its signature's frames)."""
    parts = [crash.get("title"), crash.get("exe"), crash.get("pod"), crash.get("image"), *(frames or [])]
    return "\n".join(p for p in parts if p)


def index(conn: Connection, crash: dict, frames: list[str] | None = None) -> None:
    """Write (or rewrite) one crash's search text; ``crash`` has the catalog row's columns."""
    doc = document(crash, frames)
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql(
            "INSERT INTO crash_search_pg (crash_id, time, doc) VALUES (%(id)s, %(time)s, %(doc)s) "
            "ON CONFLICT (crash_id) DO UPDATE SET doc = EXCLUDED.doc",
            {"id": crash["id"], "time": crash["time"], "doc": doc},
        )
        return
    conn.exec_driver_sql("DELETE FROM crash_search WHERE crash_id = ?", (crash["id"],))
    key = _key(crash["time"], crash["id"])
    while True:  # two crashes of one second with the same 24-bit hash: take the next free key
        try:
            conn.exec_driver_sql(
                "INSERT INTO crash_search (rowid, crash_id, signature, namespace, doc) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, crash["id"], crash.get("signature"), crash.get("namespace") or "", doc),
            )
            return
        except sa.exc.IntegrityError:
            key += 1


def forget(conn: Connection, crash_id: str) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DELETE FROM crash_search WHERE crash_id = ?", (crash_id,))
    # PostgreSQL: ON DELETE CASCADE


def rebuild(conn: Connection) -> None:
    """Index every crash from scratch (the migration that adds search, bulk loads)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DELETE FROM crash_search")
        conn.exec_driver_sql(
            "INSERT INTO crash_search (rowid, crash_id, signature, namespace, doc) "
            "SELECT (c.time << 24) + (c.rowid & 16777215), c.id, c.signature, coalesce(c.namespace, ''), "
            "coalesce(c.title, '') || char(10) || coalesce(c.exe, '') || char(10) || coalesce(c.pod, '') "
            "|| char(10) || coalesce(c.image, '') || char(10) "
            "|| coalesce(json_extract(r.report, '$.signature_frames'), '') "
            "FROM crashes c LEFT JOIN reports r ON r.crash_id = c.id"
        )
        return
    conn.exec_driver_sql("DELETE FROM crash_search_pg")
    conn.exec_driver_sql(
        "INSERT INTO crash_search_pg (crash_id, time, doc) SELECT c.id, c.time, "
        "concat_ws(chr(10), c.title, c.exe, c.pod, c.image, (r.report::json -> 'signature_frames')::text) "
        "FROM crashes c LEFT JOIN reports r ON r.crash_id = c.id"
    )


def _fts_query(words: list[str]) -> str:
    return " AND ".join('"' + w.replace('"', '""') + '"' for w in words)


def _like(word: str) -> str:
    return "%" + re.sub(r"([\\%_])", r"\\\1", word) + "%"


def matching(conn: Connection, q: str) -> tuple[sa.FromClause, sa.ColumnElement, sa.ColumnElement]:
    """A selectable of the crashes matching ``q``: (its table, its crash_id column, its order key).

    The order key is larger for newer crashes; for SQLite it is the FTS rowid, whose walk in
    descending order is what keeps a page cheap.
    """
    words = terms(q)
    if conn.dialect.name == "sqlite":
        fts = sa.table(_SQLITE, sa.column("rowid"), sa.column("crash_id"), sa.column(_SQLITE))
        match = sa.text(f"{_SQLITE} MATCH :fts").bindparams(fts=_fts_query(words))
        sub = sa.select(fts.c.rowid.label("key"), fts.c.crash_id).where(match).subquery()
        return sub, sub.c.crash_id, sub.c.key
    doc = _PG_TABLE.c.doc
    sub = (
        sa.select(_PG_TABLE.c.crash_id, _PG_TABLE.c.time.label("key"))
        .where(*(doc.ilike(_like(w), escape="\\") for w in words))
        .subquery()
    )
    return sub, sub.c.crash_id, sub.c.key


def signatures(conn: Connection, q: str, visible: Collection[str] | None, namespace: str | None) -> sa.Select:
    """The signatures of the groups with a crash matching ``q`` in the namespaces in scope."""
    scope = []
    if conn.dialect.name == "sqlite":
        fts = sa.table(_SQLITE, sa.column("signature"), sa.column("namespace"))
        match = sa.text(f"{_SQLITE} MATCH :fts").bindparams(fts=_fts_query(terms(q)))
        ns, query = fts.c.namespace, sa.select(fts.c.signature).where(match, fts.c.signature.is_not(None))
    else:
        from corevault.vault.catalog import crashes

        found, crash_id, _ = matching(conn, q)
        ns = sa.func.coalesce(crashes.c.namespace, "")
        query = sa.select(crashes.c.signature).select_from(found.join(crashes, crashes.c.id == crash_id))
    if visible is not None:
        scope.append(ns.in_(sorted(visible)))
    if namespace is not None:
        scope.append(ns == namespace)
    return query.where(*scope).distinct()


def frames_of(report: dict) -> list[str]:
    frames = report.get("signature_frames") or []
    return [f for f in frames if isinstance(f, str)][:64]


def report_frames(raw: str | None) -> list[str]:
    return frames_of(json.loads(raw)) if raw else []
