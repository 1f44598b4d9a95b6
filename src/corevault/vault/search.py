"""Search over crashes and groups: a dictionary of the distinct searchable values, and which group holds each.

A crash is searched by its pod, image and executable, and by its group's title and signature
frames; a word matches when one of those holds it anywhere inside, in any case, and every
word must match. Two tables do it, both written in the transaction that writes the crash:

- ``search_values`` (kind, value): every distinct pod, image, executable, title and frame
  the catalog has seen, with a trigram index over the value: ``pg_trgm`` GIN on PostgreSQL,
  an FTS5 ``trigram`` table kept by triggers on SQLite.
- ``group_terms`` (value, signature, namespace): which group has, in which namespace, a crash
  with that value; written when a crash is analysed (its group is known then).

Why a dictionary and not one text per crash (what this was): at 10,000,000 crashes a word
whose every trigram is common (``team-7-pod-123``: ``tea``, ``pod``…) made the trigram index
walk posting lists of millions of crashes, and a group search had to read crashes. A fleet
of 10,000,000 crashes has a few hundred thousand distinct values, and the same trigrams
there list a few thousand. So a search first looks its words up in the dictionary, then:

- a crash search turns a word with few values (a pod's name) into equalities on the crash's
  own columns, each served by a ``(column, time)`` index, and takes the page from each
  value's newest crashes; a word with many values (a word of every title) becomes a filter
  on the walk of the time index, which its many matches end after a page; on SQLite, words
  each too common to start from but rare together (an image's and a pod's) start from the
  crashes of the one that has fewest when counting them shows that is shorter than the walk;
- a group search reads ``group_terms`` in the reader's namespaces alone: old groups are
  found as well as new ones, and no crash is read. A group matches when each word is held
  by one of its crashes in scope (not necessarily the same crash for every word). A word
  of few values names its groups by ``group_terms``' key; one of many is checked on each
  group of the list's walk, which many groups holding it end soon.

Values are cut to ``VALUE_MAX`` characters (an index entry has a size limit, and a process
chooses its paths and its symbols' names): a longer executable path is found by its start.
Forgetting a crash (:func:`forget`, in the transaction that removes it) takes out what it alone
held: its group's terms in its namespace once the group has no crash left there (so a search
never leads to a gone group), the term of its pod, image or executable once no other crash of
its group there has that value, and every value of the dictionary that neither a term nor a
crash holds any more. Each check is a seek of an index or a read of at most ``PROBE`` crashes;
a term they cannot decide on is kept until its group leaves the namespace, and a crash's value
cut to ``VALUE_MAX`` stays in the dictionary (no index finds the crashes that start with it).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from corevault.errors import BadInput
from corevault.vault.tables import crashes, group_ns, groups, insert, metadata

MAX_TERMS = 8
MAX_QUERY = 256
#: what separates words: ASCII whitespace only, the same in Python and in the API's JSON Schema
_SPACE = r" \t\n\r\f\v"
#: :func:`terms`' rules as a regular expression, for the API's schema
#: a word is anything else but NUL, which SQLite's FTS5 query parser cannot take
_WORD = rf"[^{_SPACE}\x00]"
PATTERN = rf"^[{_SPACE}]*{_WORD}{{3,}}([{_SPACE}]+{_WORD}{{3,}}){{0,{MAX_TERMS - 1}}}[{_SPACE}]*$"

#: a value's length in the dictionary: 400 characters of up to 4 bytes stay within PostgreSQL's
#: limit of an index entry (2,704 bytes) beside the kind
VALUE_MAX = 400
#: what a word's values are looked up as: the crash columns, then the group's own texts
CRASH_KINDS = ("pod", "image", "exe")
GROUP_KINDS = ("title", "frame")
#: a word with at most this many values (or groups) becomes literal conditions; past it, subqueries
FEW = 200
#: a word with at most this many values is where a crash search's page starts from
SEEDS = 64
#: a search of several words none of which is a start: one with at most ``WIDE`` values and
#: ``SPAN`` crashes is, by reading all its crashes (see :func:`_widest_start`)
WIDE = 1000
SPAN = 5000
#: what a crash read by such a start costs in crashes of the walk (its ``IN``'s seeks, its row, the
#: sort; the walk reads ``crashes_time_search`` alone): measured at 1,000,000 crashes, 10.0 µs and 78
#: VM steps a crash started from against 2.1 µs and 14 a crash walked (4.8 times); at 100,000
#: (``bench.search``, ``svc-3 pod-42``) 31.4 ms for 2,280 crashes started from against 25.1 ms for
#: some 16,000 walked (about 8 times)
START_COST = 8
#: how many crashes of one value, and of one group, forgetting reads to decide on a term
PROBE = 64

search_values = sa.Table(
    "search_values",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("value", sa.String(VALUE_MAX), nullable=False),
    sa.UniqueConstraint("kind", "value", name="search_values_kind_value"),
)

group_terms = sa.Table(
    "group_terms",
    metadata,
    sa.Column("value_id", sa.Integer, primary_key=True),
    sa.Column("signature", sa.String(32), primary_key=True),
    #: "" for a host process's crash, as in group_namespaces
    sa.Column("namespace", sa.String(255), primary_key=True),
)
#: a group's terms, for the check of a word of many values on each group of a list
sa.Index("group_terms_group", group_terms.c.signature, group_terms.c.namespace, group_terms.c.value_id)

TABLES = [search_values, group_terms]


class SearchError(BadInput):
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
    """The two tables and the dictionary's trigram index."""
    metadata.create_all(conn, tables=TABLES)
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE IF NOT EXISTS search_values_fts USING fts5("
            "value, content='search_values', content_rowid='id', tokenize='trigram')"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER IF NOT EXISTS search_values_added AFTER INSERT ON search_values BEGIN "
            "INSERT INTO search_values_fts (rowid, value) VALUES (new.id, new.value); END"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER IF NOT EXISTS search_values_removed AFTER DELETE ON search_values BEGIN "
            "INSERT INTO search_values_fts (search_values_fts, rowid, value) "
            "VALUES ('delete', old.id, old.value); END"
        )
    else:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.exec_driver_sql(
            "CREATE INDEX IF NOT EXISTS search_values_trgm ON search_values USING gin (value gin_trgm_ops)"
        )


#: the crash search's walks newest first, on SQLite, of every crash and of a namespace's: the columns
#: its words are checked on come from the index, so a crash's row is read only once it matches.
#: Walking ``crashes_time`` read each crash's row for the check: 16,000 rows for a page of two words
#: rare together (``svc-3 pod-42``), 88.6 ms at 1,000,000 crashes against 21.0 ms (docs/vault.md)
WALK_INDEX = "crashes_time_search"
WALK_COLUMNS = ("time", "id", "namespace", "pod", "image", "exe", "signature")
#: the walk of a reader of one namespace: ``(namespace, time)`` read all 25,080 crashes' rows of
#: one for the same two words (145 ms), these entries 29 ms
NAMESPACE_WALK_INDEX = "crashes_namespace_search"
NAMESPACE_WALK_COLUMNS = ("namespace", "time", "id", "pod", "image", "exe", "signature")


def create_walk_index(conn: Connection) -> None:
    """``WALK_INDEX``, on SQLite. PostgreSQL's planner takes its own ways to these searches (its
    index-only scans need its visibility map), so it is left without it."""
    if conn.dialect.name == "sqlite":
        columns = ", ".join(WALK_COLUMNS)
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {WALK_INDEX} ON crashes ({columns})")


def create_namespace_walk_index(conn: Connection) -> None:
    """``NAMESPACE_WALK_INDEX``, on SQLite, in place of ``(namespace, time)``, and ``(time)`` dropped
    there too: each wide index serves every use of the narrow one it starts as."""
    if conn.dialect.name == "sqlite":
        columns = ", ".join(NAMESPACE_WALK_COLUMNS)
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {NAMESPACE_WALK_INDEX} ON crashes ({columns})")
        conn.exec_driver_sql("DROP INDEX IF EXISTS crashes_namespace_time")
        conn.exec_driver_sql("DROP INDEX IF EXISTS crashes_time")


def _cut(value: object) -> str | None:
    return value[:VALUE_MAX] if isinstance(value, str) and value else None


def _pairs(crash: dict, title: str | None = None, frames: Iterable[str] = ()) -> set[tuple[str, str]]:
    pairs = {(k, v) for k in CRASH_KINDS if (v := _cut(crash.get(k)))}
    pairs |= {("frame", v) for f in frames if (v := _cut(f))}
    if t := _cut(title):
        pairs.add(("title", t))
    return pairs


def _add_values(conn: Connection, pairs: set[tuple[str, str]]) -> None:
    if pairs:
        rows = [{"kind": k, "value": v} for k, v in sorted(pairs)]
        conn.execute(insert(conn, search_values).on_conflict_do_nothing(), rows)


def add_crash(conn: Connection, crash: dict) -> None:
    """Put a new crash's pod, image and executable in the dictionary (``crash``: the catalog row)."""
    _add_values(conn, _pairs(crash))


def add_crashes(conn: Connection, crashes: list[dict]) -> None:
    """:func:`add_crash` for many crashes, in one statement (their distinct values in one order)."""
    _add_values(conn, set().union(*(_pairs(c) for c in crashes)))


def add_analysed(conn: Connection, crash: dict, signature: str, title: str | None, frames: list[str]) -> None:
    """Note that ``signature`` has, in the crash's namespace, its pod, image, executable, title and frames."""
    pairs = _pairs(crash, title, frames)
    if not pairs:
        return
    _add_values(conn, pairs)
    v = search_values.c
    ids = conn.execute(sa.select(v.id).where(sa.tuple_(v.kind, v.value).in_(sorted(pairs)))).scalars()
    ns = crash.get("namespace") or ""
    rows = [{"value_id": i, "signature": signature, "namespace": ns} for i in sorted(ids)]
    conn.execute(insert(conn, group_terms).on_conflict_do_nothing(), rows)


def forget(conn: Connection, crash: dict, signature: str | None) -> None:
    """Take out of the groups' terms and the dictionary what ``crash`` alone held; it is removed
    already (``crash``: its catalog row; ``signature``: the group it was counted in, if any)."""
    v, gt = search_values.c, group_terms.c
    pairs = _pairs(crash, crash.get("title"))
    values = conn.execute(
        sa.select(v.id, v.kind, v.value).where(sa.tuple_(v.kind, v.value).in_(sorted(pairs)))
    )
    candidates = {row.id: row for row in values} if pairs else {}
    if signature:
        ns = crash.get("namespace") or ""
        left = sa.select(group_ns.c.signature).where(
            group_ns.c.signature == signature, group_ns.c.namespace == ns
        )
        if conn.execute(left.limit(1)).first() is None:  # the group has no crash left in the namespace
            taken = conn.execute(
                group_terms.delete()
                .where(gt.signature == signature, gt.namespace == ns)
                .returning(gt.value_id)
            ).scalars()
            ids = set(taken) - candidates.keys()
            if ids:
                candidates.update(
                    {r.id: r for r in conn.execute(sa.select(v.id, v.kind, v.value).where(v.id.in_(ids)))}
                )
        else:
            for row in candidates.values():
                if row.kind in CRASH_KINDS and not _still_held(conn, row.kind, row.value, signature, ns):
                    conn.execute(
                        group_terms.delete().where(
                            gt.value_id == row.id, gt.signature == signature, gt.namespace == ns
                        )
                    )
    c = crashes.c
    for row in sorted(candidates.values()):
        if conn.execute(sa.select(gt.value_id).where(gt.value_id == row.id).limit(1)).first() is not None:
            continue
        if row.kind in CRASH_KINDS:
            if len(row.value) >= VALUE_MAX:
                continue  # the start of crashes' values: kept (see the module's docstring)
            if conn.execute(sa.select(c.id).where(c[row.kind] == row.value).limit(1)).first() is not None:
                continue
        conn.execute(search_values.delete().where(v.id == row.id))


def _still_held(conn: Connection, kind: str, value: str, signature: str, ns: str) -> bool:
    """Whether a crash of the group in namespace ``ns`` (a crash-kind term) has ``value``, or
    that cannot be told from the newest ``PROBE`` crashes of the value nor of the group."""
    if len(value) >= VALUE_MAX:
        return True
    c = crashes.c
    of_value = sa.select(c.signature, c.namespace).where(c[kind] == value)
    rows = conn.execute(of_value.order_by(c.time.desc()).limit(PROBE)).all()
    if any(r.signature == signature and (r.namespace or "") == ns for r in rows):
        return True
    if len(rows) < PROBE:
        return False
    in_ns = c.namespace == ns if ns else sa.or_(c.namespace.is_(None), c.namespace == "")
    of_group = sa.select(c[kind]).where(c.signature == signature, in_ns)
    found = conn.execute(of_group.order_by(c.time.desc()).limit(PROBE)).scalars().all()
    return value in found or len(found) >= PROBE


def rebuild(conn: Connection) -> None:
    """Make the dictionary, the groups' terms and their frames from the crashes and reports (bulk loads)."""
    rebuild_terms(conn)
    rebuild_frames(conn)


_COUNTED = "analysis = 'done' AND signature IS NOT NULL"


def _group_frames(conn: Connection) -> None:
    """``temp_group_frames`` (signature, frame): a group's frames are what made its signature, so
    one report per group tells them."""
    each = (
        "json_each(r.report, '$.signature_frames') j"
        if conn.dialect.name == "sqlite"
        else "json_array_elements_text(CASE WHEN json_typeof(r.report::json -> 'signature_frames') = 'array' "
        "THEN r.report::json -> 'signature_frames' ELSE '[]' END) AS j(value)"
    )
    conn.exec_driver_sql("DROP TABLE IF EXISTS temp_group_frames")
    conn.exec_driver_sql(f"""
        CREATE TEMPORARY TABLE temp_group_frames AS
        SELECT o.signature, substr(j.value, 1, {VALUE_MAX}) AS frame
        FROM (SELECT signature, min(id) AS crash_id FROM crashes WHERE {_COUNTED} GROUP BY signature) o
        JOIN reports r ON r.crash_id = o.crash_id, {each}
    """)  # noqa: S608 (no value of a crash in any of these texts)


def rebuild_frames(conn: Connection) -> None:
    """Each group's ``frames``, from one of its reports."""
    _group_frames(conn)
    text = "group_concat(frame, char(10))" if conn.dialect.name == "sqlite" else "string_agg(frame, chr(10))"
    conn.exec_driver_sql(f"""
        UPDATE crash_groups SET frames = (
            SELECT {text} FROM temp_group_frames f WHERE f.signature = crash_groups.signature
        )
    """)  # noqa: S608
    conn.exec_driver_sql("DROP TABLE temp_group_frames")


def rebuild_terms(conn: Connection) -> None:
    """Make the dictionary and the groups' terms from the crashes and reports."""
    conn.execute(group_terms.delete())
    conn.execute(search_values.delete())
    _group_frames(conn)
    conn.exec_driver_sql(f"""
        INSERT INTO search_values (kind, value)
        SELECT DISTINCT kind, substr(value, 1, {VALUE_MAX}) FROM (
            SELECT DISTINCT 'pod' AS kind, pod AS value FROM crashes
            UNION SELECT DISTINCT 'image', image FROM crashes
            UNION SELECT DISTINCT 'exe', exe FROM crashes
            UNION SELECT DISTINCT 'title', title FROM crashes WHERE {_COUNTED}
            UNION SELECT DISTINCT 'frame', frame FROM temp_group_frames
        ) AS t WHERE value IS NOT NULL AND value != ''
    """)  # noqa: S608
    conn.exec_driver_sql(f"""
        WITH d AS MATERIALIZED (
            SELECT DISTINCT signature, coalesce(namespace, '') AS namespace, pod, image, exe, title
            FROM crashes WHERE {_COUNTED}
        )
        INSERT INTO group_terms (value_id, signature, namespace)
        SELECT DISTINCT v.id, t.signature, t.namespace FROM (
            SELECT 'pod' AS kind, pod AS value, signature, namespace FROM d
            UNION ALL SELECT 'image', image, signature, namespace FROM d
            UNION ALL SELECT 'exe', exe, signature, namespace FROM d
            UNION ALL SELECT 'title', title, signature, namespace FROM d
            UNION ALL SELECT DISTINCT 'frame', f.frame, f.signature, g.namespace
                FROM temp_group_frames f JOIN group_namespaces g ON g.signature = f.signature
        ) AS t JOIN search_values v ON v.kind = t.kind AND v.value = substr(t.value, 1, {VALUE_MAX})
    """)  # noqa: S608
    conn.exec_driver_sql("DROP TABLE temp_group_frames")


def _like(word: str) -> str:
    return "%" + re.sub(r"([\\%_])", r"\\\1", word) + "%"


def _contains(conn: Connection, column: sa.ColumnElement, word: str) -> sa.ColumnElement:
    """``column`` holds ``word`` in any case. SQLite's LIKE ignores case already (ASCII, as its
    lower() does): ILIKE there would be lower() of both sides on each row."""
    if conn.dialect.name == "sqlite":
        return column.like(_like(word), escape="\\")
    return column.ilike(_like(word), escape="\\")


def _holding(conn: Connection, word: str) -> sa.ColumnElement:
    """The condition on ``search_values`` of the values that hold ``word``, by the trigram index."""
    v = search_values.c
    if conn.dialect.name == "sqlite":
        # unique: a search of several words has one of these per word in one statement
        phrase = sa.bindparam("q", '"' + word.replace('"', '""') + '"', unique=True)
        fts = sa.text("SELECT rowid FROM search_values_fts WHERE search_values_fts MATCH :q")
        fts = fts.bindparams(phrase)
        return v.id.in_(fts.columns(sa.column("rowid", sa.Integer)))
    return v.value.ilike(_like(word), escape="\\")


def _group_ids(conn: Connection, word: str) -> sa.Select:
    v = search_values.c
    return sa.select(v.id).where(_holding(conn, word), v.kind.in_(GROUP_KINDS))


@dataclass(frozen=True, slots=True)
class CrashMatch:
    """What a crash search asks of ``crashes``' own columns (and of its group's, with ``group_text``)."""

    #: one condition per word
    where: list[sa.ColumnElement]
    #: equalities on indexed columns whose crashes hold every match (the rarest word's values);
    #: None when every word has many values (then the time index is walked)
    seeds: list[sa.ColumnElement] | None
    #: whether ``where`` reads ``crash_groups.frames``: the crash's group joined to it
    group_text: bool


def group_text(report: dict) -> str:
    """A group's frames, one a line, as ``crash_groups.frames`` keeps them."""
    return "\n".join(f[:VALUE_MAX] for f in frames_of(report))


def _values_holding(conn: Connection, word: str) -> list[sa.Row]:
    """Up to ``FEW`` + 1 of the dictionary's values holding ``word``: more means many."""
    v = search_values.c
    query = sa.select(v.id, v.kind, v.value).where(_holding(conn, word)).limit(FEW + 1)
    if conn.dialect.name == "sqlite":
        return conn.execute(query).all()
    # Estimating a word of every title at a tenth of the dictionary, PostgreSQL read the whole
    # dictionary for the first 201 (0.45 s at 1,000,000 crashes); the trigram index's bitmap
    # is made in milliseconds and the LIMIT stops its reading early.
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    try:
        return conn.execute(query).all()
    finally:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = on")


def _walked(column: sa.ColumnElement) -> sa.ColumnElement:
    """``column`` as no index serves it: a condition checked on each crash of a walk. Left
    indexable, SQLite read every crash of 150 images to sort them (1.2 s at 1,000,000) rather
    than walk the time index a page long."""
    return sa.func.coalesce(column, "")


def crash_match(conn: Connection, q: str, page: int = 50, scope: sa.Select | None = None) -> CrashMatch:
    """How to find the crashes matching ``q`` (see the module's docstring); ``page``: how many
    are read, ``scope``: the crashes the reader's filters leave (None: every crash)."""
    where, seeds, group_text = [], None, False
    c, gt = crashes.c, group_terms.c
    words = terms(q)
    # several words may start from one of up to WIDE values (_widest_start): their count is read
    # with the first values, in one lookup of the trigram index (a word of every pod: 4.5 ms at
    # 100,000 crashes, so not twice)
    wide = len(words) > 1 and conn.dialect.name == "sqlite"
    held: list[tuple[str, int, list[sa.Row], list[str] | None]] = []
    for word in words:
        kinds = {*CRASH_KINDS, *GROUP_KINDS}  # what holds the word, as far as is known
        if wide:
            v = search_values.c
            first = sa.select(v.id, v.kind).where(_holding(conn, word)).limit(max(WIDE, FEW) + 1)
            rows = conn.execute(first).all()
            found = _values_of(conn, [i for i, _ in rows]) if len(rows) <= FEW else []
            values = len(rows)
            if values <= WIDE:
                kinds = {kind for _, kind in rows}
        else:
            found = _values_holding(conn, word)
            values = len(found)
        if values > FEW:  # many values: checked on each crash of the walk, which ends soon
            held.append((word, values, found, None))
            where.append(_walk_check(conn, word, kinds))
            group_text = group_text or "frame" in kinds
            continue
        # a value cut in the dictionary is the start of the crash's own
        cut = [(kind, value) for _, kind, value in found if kind in CRASH_KINDS and len(value) == VALUE_MAX]
        whole = [(kind, value) for _, kind, value in found if kind in CRASH_KINDS and len(value) < VALUE_MAX]
        equal = [c[kind] == value for kind, value in whole]
        equal += [c[kind].startswith(value, autoescape=True) for kind, value in cut]
        # a column none of the word's values is of is not checked: an empty IN is still a lookup per crash
        checked = [
            _walked(c[kind]).in_(of_kind)
            for kind in CRASH_KINDS
            if (of_kind := [v for k, v in whole if k == kind])
        ]
        checked += [_walked(c[kind]).startswith(value, autoescape=True) for kind, value in cut]
        ids = [i for i, kind, _ in found if kind in GROUP_KINDS]
        held_by = _held_by(conn, ids) if ids else []
        held.append((word, values, found, held_by))
        if len(held_by) > FEW:  # a frame of many groups (``main``)
            of_groups = sa.select(gt.signature).where(gt.value_id.in_(ids))
            where.append(sa.or_(*checked, _walked(c.signature).in_(of_groups)))
            continue
        equal += [c.signature == s for s in held_by]
        by_group = [_walked(c.signature).in_(held_by)] if held_by else []
        where.append(sa.or_(sa.false(), *checked, *by_group))
        if len(equal) <= SEEDS and (seeds is None or len(equal) < len(seeds)):
            seeds = equal
    if seeds is None and wide:
        seeds = _widest_start(conn, held, page, scope)
    return CrashMatch(where, seeds, group_text)


def _walk_check(conn: Connection, word: str, kinds: Collection[str]) -> sa.ColumnElement:
    """A word of many values, checked on each crash of the walk: in the columns of the ``kinds``
    its values are of. Its pods' alone (``pod-42``: 550 pods) are read from the walked index
    (``crashes_time_search``) without the crash's row, nor its group's frames."""
    c = crashes.c
    held = [_contains(conn, c[kind], word) for kind in (*CRASH_KINDS, "title") if kind in kinds]
    if "frame" in kinds:
        held.append(_contains(conn, groups.c.frames, word))
    return sa.or_(*held)


def _held_by(conn: Connection, ids: list[int] | sa.Select) -> list[str]:
    """Up to ``FEW`` + 1 of the groups holding one of the values ``ids``."""
    gt = group_terms.c
    query = sa.select(gt.signature).where(gt.value_id.in_(ids)).distinct().limit(FEW + 1)
    return list(conn.execute(query).scalars())


def _longest(conn: Connection, word: str) -> dict[str, int]:
    """The kinds of the values holding ``word``, each with its longest value's length."""
    v = search_values.c
    query = sa.select(v.kind, sa.func.max(sa.func.length(v.value))).where(_holding(conn, word))
    return {kind: longest for kind, longest in conn.execute(query.group_by(v.kind))}


def _values_of(conn: Connection, ids: list[int]) -> list[sa.Row]:
    """The dictionary's (id, kind, value) of ``ids``, by its key."""
    v = search_values.c
    return conn.execute(sa.select(v.id, v.kind, v.value).where(v.id.in_(ids))).all() if ids else []


def _widest_start(
    conn: Connection,
    held: list[tuple[str, int, list[sa.Row], list[str] | None]],
    page: int,
    scope: sa.Select | None,
) -> list[sa.ColumnElement] | None:
    """Where a search of several words, none of which has few values, starts: the word of
    fewest crashes, as one ``IN`` per column, when reading them all is shorter than the walk
    of the time index; None: the walk. ``held``: each word, how many values hold it (up to
    ``WIDE`` + 1), all of them if at most ``FEW`` and the groups they name (None: not looked up).

    Each word alone is common (``svc-3``: 150 images, ``pod-42``: 550 pods) but both together
    are rare, so the walk newest first read some 16,000 crashes of 100,000 to find a page of
    50; reading and sorting the 2,000 crashes of the 550 pods takes a few milliseconds. Each
    word's crashes are counted (at most ``SPAN`` entries of a ``(column, time)`` index per
    column); taking the words as independent, the walk reads ``page`` ÷ the share of crashes
    that hold them all, and at most the crashes in ``scope`` (one namespace's, by its index). A
    word of many values or of many groups (``handler_0``) counts as held by every crash. The
    values are subqueries of the dictionary, not lists: binding hundreds of values to each
    statement took longer than the statement.
    """
    c, v = crashes.c, search_values.c
    candidates = []
    for word, values, found, named in held:
        if values > WIDE:
            continue
        longest = {kind: len(value) for _, kind, value in sorted(found, key=lambda r: len(r[2]))}
        if values > len(found):
            longest = _longest(conn, word)
        if any(longest[kind] >= VALUE_MAX for kind in CRASH_KINDS if kind in longest):
            continue  # a value cut in the dictionary: rare, left to the walk
        held_by = named
        if held_by is None:
            of_groups = sa.select(v.id).where(_holding(conn, word), v.kind.in_(GROUP_KINDS))
            held_by = _held_by(conn, of_groups) if longest.keys() & {*GROUP_KINDS} else []
        if len(held_by) > FEW:
            continue
        starts = [
            c[kind].in_(sa.select(v.value).where(_holding(conn, word), v.kind == kind))
            for kind in CRASH_KINDS
            if kind in longest
        ]
        if held_by:
            starts.append(c.signature.in_(held_by))
        if not starts:
            return []  # no crash holds this word
        candidates.append(starts)
    if not candidates:
        return None
    # rowids only grow: the newest is about how many crashes there are
    total = conn.execute(sa.text("SELECT max(rowid) FROM crashes")).scalar() or 0
    # a start of n crashes, n at most every word's count, is shorter than the walk only if
    # START_COST * n ** (k + 1) < page * total ** k for k words counted: no count needs to go further
    k = len(candidates)
    most = min(SPAN, int((page * total**k / START_COST) ** (1 / (k + 1))))
    if scope is not None:  # nor than the walk of every crash in scope
        within = sa.select(sa.func.count()).select_from(scope.limit(most * START_COST + 1).subquery())
        most = min(most, (conn.execute(within).scalar() or 0) // START_COST)
    best: tuple[int, list[sa.ColumnElement]] | None = None
    walk = float(page)
    for starts in candidates:
        each = [sa.select(sa.literal(1)).where(start).limit(most + 1) for start in starts]
        count = conn.execute(sa.select(sa.func.count()).select_from(sa.union_all(*each).subquery())).scalar()
        count = count or 0
        walk *= total / max(count, 1)
        if count <= most and (best is None or count < best[0]):
            best = (count, starts)
    return best[1] if best and START_COST * best[0] < walk else None


def group_condition(
    conn: Connection,
    signature: sa.ColumnElement,
    q: str,
    visible: Collection[str] | None,
    namespace: str | None,
) -> sa.ColumnElement:
    """Whether the group of ``signature`` has crashes holding every word of ``q`` in the namespaces in scope.

    A word of few values: the groups that hold one of them, by ``group_terms``' key. A word of
    many (``pod-`` in every pod): checked on each group the list walks (its terms by
    ``group_terms_group``), which reaches a page soon, since many groups hold it.
    """
    gt, v = group_terms.c, search_values.c
    scope = []
    if visible is not None:
        scope.append(gt.namespace.in_(sorted(visible)))
    if namespace is not None:
        scope.append(gt.namespace == namespace)
    held = []
    for word in terms(q):
        if conn.dialect.name == "postgresql":
            ids, named = _groups_holding(conn, word, scope)
        else:
            ids, named = [i for i, _, _ in _values_holding(conn, word)], None
        if len(ids) > FEW:
            holding = _contains(conn, v.value, word)
            of_group = sa.select(gt.value_id).join(search_values, v.id == gt.value_id)
            held.append(sa.exists(of_group.where(gt.signature == signature, *scope, holding)))
        elif named is not None and len(named) <= FEW:
            held.append(among(conn, signature, named))
        else:
            held.append(signature.in_(sa.select(gt.signature).where(gt.value_id.in_(ids), *scope)))
    return sa.and_(*held)


def among(conn: Connection, column: sa.ColumnElement, values: list[str]) -> sa.ColumnElement:
    """``column`` is one of ``values`` (signatures): on PostgreSQL one array, ``= ANY``. As an
    ``IN`` of a page's 51, SQLAlchemy rendered 51 parameters into each statement per request, and
    psycopg, whose cache of converted statements keeps those of at most 50 parameters and 4 KB,
    converted it again on every request."""
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.literal(values, ARRAY(sa.String)))
    return column.in_(values)


def _groups_holding(
    conn: Connection, word: str, scope: list[sa.ColumnElement]
) -> tuple[list[int], list[str] | None]:
    """Up to ``FEW`` + 1 of the dictionary's values holding ``word`` and, when that is at most
    ``FEW``, up to ``FEW`` + 1 of the groups in ``scope`` holding one of them (else None), in
    one statement (PostgreSQL).

    The groups are handed to the list as literals: given the subquery, PostgreSQL expected
    four times the groups it held and read all of ``crash_groups`` to hash-join them (1,410
    buffers, at 1,000,000 crashes, for ``handler_42``'s 111 groups; 476 with them by their keys). The
    lookup runs with ``enable_seqscan`` off (see :func:`_values_holding`); the statement
    itself turns it back on, once planned, so that the search costs two round trips, not three.
    """
    v, gt = search_values.c, group_terms.c
    found = sa.select(v.id).where(_holding(conn, word)).limit(FEW + 1).cte("found")
    count = sa.select(sa.func.count()).select_from(found).scalar_subquery()
    named = sa.select(gt.signature).where(gt.value_id.in_(sa.select(found.c.id)), *scope)
    named = named.distinct().limit(FEW + 1).subquery()
    query = sa.select(
        sa.select(sa.func.array_agg(found.c.id)).scalar_subquery(),
        # a word of many values names no groups: they are not read
        sa.case((count <= FEW, sa.select(sa.func.array_agg(named.c.signature)).scalar_subquery())),
        sa.func.set_config("enable_seqscan", "on", True),
    )
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    ids, signatures, _ = conn.execute(query).one()
    ids = ids or []
    return ids, None if len(ids) > FEW else signatures or []


def frames_of(report: dict) -> list[str]:
    frames = report.get("signature_frames") or []
    return [f for f in frames if isinstance(f, str)][:64]
