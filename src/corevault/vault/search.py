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
import threading
import time
import zlib
from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from corevault.errors import UserError
from corevault.vault.tables import crashes, group_ns, groups

MAX_TERMS = 8
MAX_QUERY = 256
#: what separates words: ASCII whitespace only, the same in Python and in the API's JSON Schema
_SPACE = r" \t\n\r\f\v"
#: :func:`terms`' rules as a regular expression, for the API's schema
#: a word is anything else but NUL, which SQLite's FTS5 query parser cannot take
_WORD = rf"[^{_SPACE}\x00]"
PATTERN = rf"^[{_SPACE}]*{_WORD}{{3,}}([{_SPACE}]+{_WORD}{{3,}}){{0,{MAX_TERMS - 1}}}[{_SPACE}]*$"
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
    if "\x00" in q:
        raise SearchError("search text: NUL characters cannot be searched for")
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
        _rebuild_sqlite(conn)
        if conn.execute(sa.text("SELECT 1 FROM sqlite_master WHERE name = 'crash_search_stats'")).first():
            refresh_stats(conn)
        return
    conn.exec_driver_sql("DELETE FROM crash_search_pg")
    conn.exec_driver_sql(
        "INSERT INTO crash_search_pg (crash_id, time, doc) SELECT c.id, c.time, "
        "concat_ws(chr(10), c.title, c.exe, c.pod, c.image, (r.report::json -> 'signature_frames')::text) "
        "FROM crashes c LEFT JOIN reports r ON r.crash_id = c.id"
    )


def _rebuild_sqlite(conn: Connection) -> None:
    conn.exec_driver_sql("DELETE FROM crash_search")
    conn.exec_driver_sql(
        "INSERT INTO crash_search (rowid, crash_id, signature, namespace, doc) "
        "SELECT (c.time << 24) + (c.rowid & 16777215), c.id, c.signature, coalesce(c.namespace, ''), "
        "coalesce(c.title, '') || char(10) || coalesce(c.exe, '') || char(10) || coalesce(c.pod, '') "
        "|| char(10) || coalesce(c.image, '') || char(10) "
        "|| coalesce(json_extract(r.report, '$.signature_frames'), '') "
        "FROM crashes c LEFT JOIN reports r ON r.crash_id = c.id"
    )


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _fts_query(words: list[str]) -> str:
    return " AND ".join(_quoted(w) for w in words)


def create_stats(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS crash_search_stats (term TEXT PRIMARY KEY, docs INTEGER NOT NULL)"
        )


_REFRESHED = "\x00refreshed"
STATS_AGE = 600.0
_refreshing = threading.Lock()


def refresh_stats(conn: Connection) -> None:
    """Count the crashes holding each trigram (SQLite): what picks a word's rarest trigrams."""
    conn.exec_driver_sql(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.crash_search_vocab "
        "USING fts5vocab(main, crash_search, 'row')"
    )
    conn.exec_driver_sql("DELETE FROM crash_search_stats")
    conn.exec_driver_sql(
        "INSERT INTO crash_search_stats (term, docs) SELECT term, doc FROM temp.crash_search_vocab"
    )
    conn.exec_driver_sql(
        "INSERT INTO crash_search_stats (term, docs) VALUES (?, ?)", (_REFRESHED, int(time.time()))
    )


def _refresh_in_background(engine: sa.Engine) -> None:
    if not _refreshing.acquire(blocking=False):
        return  # one refresh at a time

    def run() -> None:
        try:
            with engine.begin() as conn:
                refresh_stats(conn)
        finally:
            _refreshing.release()

    threading.Thread(target=run, name="corevault-search-stats", daemon=True).start()


def _rare_trigrams(conn: Connection, words: list[str]) -> list[str] | None:
    """Up to three of each word's rarest trigrams, by the stats; None when there are no fresh stats.

    A long word shares trigrams with most crashes (``team-7-pod-123``: ``tea``, ``pod``…), and
    FTS5 reads every listed trigram's whole posting list; matching the rarest few and checking
    the word itself on the few rows they find is what keeps such a search fast.
    """
    wanted = {w.lower()[i : i + 3] for w in words for i in range(len(w) - 2)}
    stats = sa.table("crash_search_stats", sa.column("term"), sa.column("docs"))
    rows = conn.execute(
        sa.select(stats.c.term, stats.c.docs).where(stats.c.term.in_([*wanted, _REFRESHED]))
    ).all()
    docs = dict(rows)
    refreshed = docs.pop(_REFRESHED, 0)
    if time.time() - refreshed > STATS_AGE:
        _refresh_in_background(conn.engine)
    if not refreshed:
        return None
    picked = []
    for w in words:
        grams = sorted({w.lower()[i : i + 3] for i in range(len(w) - 2)}, key=lambda g: docs.get(g, 0))
        picked += grams[:3]
    return picked


def _like(word: str) -> str:
    return "%" + re.sub(r"([\\%_])", r"\\\1", word) + "%"


def matching(conn: Connection, q: str) -> tuple[sa.FromClause, sa.ColumnElement, sa.ColumnElement]:
    """A selectable of the crashes matching ``q``: (its table, its crash_id column, its order key).

    The order key is larger for newer crashes; for SQLite it is the FTS rowid, whose walk in
    descending order is what keeps a page cheap.
    """
    words = terms(q)
    if conn.dialect.name == "sqlite":
        fts = sa.table(_SQLITE, sa.column("rowid"), sa.column("crash_id"), sa.column("doc"))
        query = sa.select(fts.c.rowid.label("key"), fts.c.crash_id).where(_sqlite_match(conn, words, fts))
        sub = query.subquery()
        return sub, sub.c.crash_id, sub.c.key
    doc = _PG_TABLE.c.doc
    sub = (
        sa.select(_PG_TABLE.c.crash_id, _PG_TABLE.c.time.label("key"))
        .where(*(doc.ilike(_like(w), escape="\\") for w in words))
        .subquery()
    )
    return sub, sub.c.crash_id, sub.c.key


def _sqlite_match(conn: Connection, words: list[str], fts: sa.TableClause) -> sa.ColumnElement:
    """The MATCH (and, with rare trigrams, the check of each whole word) for SQLite."""
    rare = _rare_trigrams(conn, words) if all(w.isascii() for w in words) else None
    if rare is None:
        return sa.text("crash_search MATCH :fts").bindparams(fts=_fts_query(words))
    match = sa.text("crash_search MATCH :fts").bindparams(fts=" AND ".join(_quoted(g) for g in rare))
    # ASCII words: lower() folds case the way the trigram tokenizer does
    return sa.and_(match, *(sa.func.instr(sa.func.lower(fts.c.doc), w.lower()) > 0 for w in words))


#: how many of a search's newest matching crashes the group search reads at most
GROUP_SCAN = 2_000


def signatures(conn: Connection, q: str, visible: Collection[str] | None, namespace: str | None) -> sa.Select:
    """The signatures of the groups matching ``q`` in the namespaces in scope.

    A group matches when its title holds every word (exact, over the few thousand groups) or
    when one of its crashes in scope is among the ``GROUP_SCAN`` newest crashes matching ``q``
    (of all namespaces, so that the work is bounded whatever the scope): a word that a million
    crashes hold stays fast, at the price of leaving out groups whose only matching crashes
    are older than those (their title aside). Words held by fewer crashes are exact.
    """
    words = terms(q)
    if conn.dialect.name == "sqlite":
        fts = sa.table(
            _SQLITE, sa.column("rowid"), sa.column("signature"), sa.column("namespace"), sa.column("doc")
        )
        ns, sig, key = fts.c.namespace, fts.c.signature, fts.c.rowid
        query = sa.select(sig.label("signature"), ns.label("namespace")).where(
            _sqlite_match(conn, words, fts)
        )
    else:
        found, crash_id, key = matching(conn, q)
        ns, sig = sa.func.coalesce(crashes.c.namespace, ""), crashes.c.signature
        query = sa.select(sig.label("signature"), ns.label("namespace")).select_from(
            found.join(crashes, crashes.c.id == crash_id)
        )
    newest = query.order_by(key.desc()).limit(GROUP_SCAN).subquery()
    scope = [newest.c.signature.is_not(None)]
    if visible is not None:
        scope.append(newest.c.namespace.in_(sorted(visible)))
    if namespace is not None:
        scope.append(newest.c.namespace == namespace)
    gn = group_ns.c
    in_scope = [gn.signature == groups.c.signature]
    if visible is not None:
        in_scope.append(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        in_scope.append(gn.namespace == namespace)
    titled = sa.select(groups.c.signature).where(
        *(sa.func.lower(groups.c.title).contains(w.lower(), autoescape=True) for w in words),
        sa.exists(sa.select(gn.signature).where(*in_scope)),
    )
    return sa.union(sa.select(newest.c.signature).where(*scope), titled)


def frames_of(report: dict) -> list[str]:
    frames = report.get("signature_frames") or []
    return [f for f in frames if isinstance(f, str)][:64]


def report_frames(raw: str | None) -> list[str]:
    return frames_of(json.loads(raw)) if raw else []
