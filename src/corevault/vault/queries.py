"""Reading the catalog: crashes by filters and pages, one crash, crash groups, objects, namespaces.

Every read that a reader's scope limits takes the namespaces it may see (``visible``), and
what it returns is made of those namespaces' crashes alone: counts, trends, first/last-seen
times and a group's history included.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from signal import Signals

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from corevault.errors import BadInput
from corevault.vault import lifecycle
from corevault.vault import search as fts
from corevault.vault.prepared import Prepared
from corevault.vault.tables import (
    crash_objects,
    crashes,
    dropped,
    group_days,
    group_ns,
    groups,
    namespaces,
    objects,
    reports,
)


def _rows(conn: Connection | Prepared, query: sa.Select, params: dict) -> list[dict]:
    """``query``'s rows as dicts, on a connection or (the downloads' lookups) a :class:`Prepared`."""
    if isinstance(conn, Prepared):
        return conn.rows(query, params)
    return [dict(row._mapping) for row in conn.execute(query, params)]


def object_for(
    conn: Connection | Prepared, key: str, visible: Collection[str] | None = None, crash_id: str | None = None
) -> dict | None:
    """The object stored under ``key`` that a crash ``visible`` may see (None: all) really mapped.

    Several contents may claim one key (one of them forged): the answer is always one that a
    crash the reader may read mapped itself, that crash's own when ``crash_id`` is given, else
    the one that the crashes of the most namespaces mapped, and of those the most recent
    crash's. A pod forges a build-id (libc's, say) in one crash of its own; the genuine file
    is mapped by every tenant's crashes: the newest crash alone made the forgery what a
    debugger of every namespace got for that build-id.
    """
    params = {"key": key, "visible": sorted(visible or ()), "crash_id": crash_id}
    if crash_id is None:
        # Nearly always one content holds a key, and a shared library's build-id is mapped by most
        # crashes: the contents some visible crash mapped come from the indexes alone, and only
        # when a key has several (one forged) are that key's crashes counted by namespace.
        rows = _rows(conn, _mapped_contents(visible is not None), params)
        if len(rows) <= 1:
            return rows[0] if rows else None
        rows = _rows(conn, _most_mapped(visible is not None), params)
        return rows[0] if rows else None
    rows = _rows(conn, _crash_mapped(visible is not None), params)
    return rows[0] if rows else None


@functools.cache
def _mapped_contents(scoped: bool) -> sa.Select:
    """The contents under ``:key`` that a crash (of ``:visible`` if ``scoped``) mapped; each found
    by its first mapping crash in the index, not by all of them."""
    co, o, c = crash_objects.c, objects.c, crashes.c
    mapped = (
        sa.select(co.crash_id)
        .select_from(crash_objects.join(crashes, c.id == co.crash_id))
        .where(co.key == o.key, co.sha256 == o.sha256)
    )
    if scoped:
        mapped = mapped.where(c.namespace.in_(sa.bindparam("visible", expanding=True)))
    return sa.select(objects).where(o.key == sa.bindparam("key"), mapped.exists())


def _mapped(scoped: bool) -> sa.Select:
    """The contents under ``:key``, a row per crash (of ``:visible`` if ``scoped``) that mapped one."""
    co, o, c = crash_objects.c, objects.c, crashes.c
    query = (
        sa.select(objects)
        .select_from(
            crash_objects.join(crashes, c.id == co.crash_id).join(
                objects, sa.and_(o.key == co.key, o.sha256 == co.sha256)
            )
        )
        .where(co.key == sa.bindparam("key"))
    )
    if scoped:
        query = query.where(c.namespace.in_(sa.bindparam("visible", expanding=True)))
    return query


@functools.cache
def _most_mapped(scoped: bool) -> sa.Select:
    """Of the contents under ``:key`` that crashes (of ``:visible`` if ``scoped``) mapped, the one
    the crashes of the most namespaces mapped (host processes count as one), the newest crash's
    among equals."""
    o, c = objects.c, crashes.c
    spread = sa.func.count(sa.distinct(sa.func.coalesce(c.namespace, "")))
    return (
        _mapped(scoped)
        .group_by(o.key, o.sha256)
        .order_by(spread.desc(), sa.func.max(c.time).desc(), o.sha256)
        .limit(1)
    )


@functools.cache
def _crash_mapped(scoped: bool) -> sa.Select:
    """The content that the crash ``:crash_id`` (if of ``:visible`` when ``scoped``) mapped under
    ``:key``; built once per shape, as every debuginfod request asks it."""
    return _mapped(scoped).where(crash_objects.c.crash_id == sa.bindparam("crash_id")).limit(1)


def known_objects(conn: Connection, wanted: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    wanted = list(wanted)
    if not wanted:
        return set()
    o = objects.c
    query = sa.select(o.key, o.sha256).where(o.key.in_({k for k, _ in wanted}))
    return {(k, s) for k, s in conn.execute(query)} & set(wanted)


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
        if f.signal.strip().isdigit():
            query = query.where(c.signal == _signal_number(f.signal))
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

    With ``filters.search`` each row also has ``search_key``, its time (what a page's cursor
    is made of, as without a search).
    """
    columns = [crashes.c[n] for n in LIST_COLUMNS]
    c = crashes.c
    if filters.search:
        # the search's key is the crash's time, so a search pages like a plain list
        columns.append(c.time.label("search_key"))
        scope = _where(sa.select(sa.literal(1)), filters)
        scoped = filters != Filters(search=filters.search)
        match = fts.crash_match(conn, filters.search, limit, scope if scoped else None)
    else:
        match = fts.CrashMatch([], None, group_text=False)

    def page(*where: sa.ColumnElement) -> sa.Select:
        query = _where(sa.select(*columns), filters).where(*match.where, *where)
        if match.group_text:  # a group's own search text (its frames), one row each
            query = query.select_from(crashes.outerjoin(groups, groups.c.signature == c.signature))
        if before is not None:
            t, i = before
            query = query.where(sa.or_(c.time < t, sa.and_(c.time == t, c.id < i)))
        return query.order_by(c.time.desc(), c.id.desc()).limit(limit)

    if match.seeds is None:
        query = page()
    elif not match.seeds:
        return []
    else:  # each value's newest crashes by its (column, time) index, then the newest of those
        found = sa.union(*(sa.select(page(seed).subquery()) for seed in match.seeds)).subquery()
        query = sa.select(found).order_by(found.c.time.desc(), found.c.id.desc()).limit(limit)
    return [dict(r._mapping) for r in conn.execute(query)]


def analysis_state(conn: Connection, crash_id: str) -> str | None:
    """A crash's analysis: pending, done, failed or off; None when the catalog has no such crash."""
    return conn.execute(sa.select(crashes.c.analysis).where(crashes.c.id == crash_id)).scalar_one_or_none()


def get_crash(conn: Connection, crash_id: str) -> dict | None:
    row = conn.execute(sa.select(crashes).where(crashes.c.id == crash_id)).first()
    if row is None:
        return None
    doc = dict(row._mapping)
    doc["meta"] = json.loads(doc["meta"])
    doc["report"] = report_of(conn, crash_id)
    return doc


#: what a core download needs of its crash, by the primary key: no metadata or report to parse
_CORE = sa.select(
    crashes.c.id, crashes.c.namespace, crashes.c.size, crashes.c.stored_size, crashes.c.sha256
).where(crashes.c.id == sa.bindparam("id"))


def core_of(conn: Connection | Prepared, crash_id: str) -> dict | None:
    """A crash's namespace (whose readers may have its core), plain and stored sizes and hash."""
    rows = _rows(conn, _CORE, {"id": crash_id})
    return rows[0] if rows else None


def report_of(conn: Connection, crash_id: str) -> dict | None:
    """A crash's report, None before its analysis is recorded."""
    report = conn.execute(sa.select(reports.c.report).where(reports.c.crash_id == crash_id)).scalar()
    return json.loads(report) if report else None


_SIGNAL_NAMES = frozenset(s.name for s in Signals)
_SIGNAL_HOW = "use a name such as SEGV or SIGABRT, or a number from 1 to 64"
#: what :func:`_signal_name` takes, as a regular expression: the HTTP API's schema states it, so that a
#: client knows from the schema which values are signals; the server's own check answers any other with
#: the 400 that says what to use (a schema's pattern check would answer a 422 quoting the expression)
SIGNAL_PATTERN = (
    r"^(?:0*(?:" + "|".join(str(n) for n in sorted({int(s) for s in Signals}, reverse=True)) + r")"
    r"|(?i:(?:SIG)?(?:" + "|".join(sorted((s.name[3:] for s in Signals), key=len, reverse=True)) + r")))$"
)


def _signal_name(value: str) -> str:
    """``segv``, ``SIGSEGV``, ``11`` → ``SIGSEGV``; a name no signal has is a mistake, not an empty answer."""
    if value.strip().isdigit():
        try:
            return Signals(_signal_number(value)).name
        except ValueError:  # a real-time signal: no crash group is named after one
            raise BadInput(f"signal {value!r}: groups are kept by the standard signals, 1 to 31") from None
    sig = value.strip().upper()
    sig = sig if sig.startswith("SIG") else "SIG" + sig
    if sig not in _SIGNAL_NAMES:
        raise BadInput(f"signal {value!r} is not a signal: {_SIGNAL_HOW}")
    return sig


def _signal_number(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 64:
        raise BadInput(f"signal {value!r} is not a signal: {_SIGNAL_HOW}")
    return number


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
    gn = group_ns.c
    # rows in scope (namespaces, images), and which groups (a search, new_in): the page's own
    # rows are read again below with the first only, the groups being those of the page
    rows_scope, wanted = [], []
    if visible is not None:
        rows_scope.append(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        rows_scope.append(gn.namespace == namespace)
    image_scope = gn.image == image
    if image is not None:
        rows_scope.append(image_scope)
    if new_in is not None:
        wanted.append(_new_in(conn, new_in, visible, namespace))
    if rows_scope:
        sig = gn.signature
        sub = sa.select(
            gn.signature,
            sa.func.sum(gn.count).label("count"),
            sa.func.min(gn.first_seen).label("first_seen"),
            sa.func.max(gn.last_seen).label("last_seen"),
        ).where(*rows_scope)
        sub = sub.group_by(gn.signature)
    else:  # every namespace: the groups' own totals, walked newest first (crash_groups_newest)
        sig = groups.c.signature
        g = groups.c
        sub = sa.select(sig, g.count, g.first_seen, g.last_seen).where(g.count > 0)
    if signature is not None:
        sub = sub.where(sig == signature)
    if search:
        sub = sub.where(fts.group_condition(conn, sig, search, visible, namespace))
    sub = sub.where(*(sig.in_(w) for w in wanted)).subquery()
    # the most urgent state of the group's namespaces in scope (lifecycle.seen_state), read per
    # group as the page is walked
    ns_scope = [c for c in rows_scope if c is not image_scope]
    rank = lifecycle.seen_state(sub.c.signature, ns_scope, now).label("rank")
    # The page is chosen before its groups' titles are joined: joined first, PostgreSQL looked
    # up every group's title (20,000 index probes at 20,000 groups) to keep 50.
    query = sa.select(sub, rank)
    if signal is not None:
        query = query.join(groups, groups.c.signature == sub.c.signature).where(
            groups.c.signal_name == _signal_name(signal)
        )
    if since is not None:
        query = query.where(sub.c.last_seen >= since)
    if states is not None:
        query = query.where(rank.in_(lifecycle.ranks(states)))
    if before is not None:
        t, sig = before
        query = query.where(sa.or_(sub.c.last_seen < t, sa.and_(sub.c.last_seen == t, sub.c.signature < sig)))
    page = query.order_by(sub.c.last_seen.desc(), sub.c.signature.desc()).limit(limit).subquery()
    titled = (
        sa.select(
            page, lifecycle.state_name(page.c.rank).label("state"), groups.c.title, groups.c.signal_name
        )
        .join(groups, groups.c.signature == page.c.signature)
        .order_by(page.c.last_seen.desc(), page.c.signature.desc())
    )
    found = [dict(r._mapping) for r in conn.execute(titled)]
    if not found:
        return found
    by_sig = {g["signature"]: g for g in found}
    today = int((time.time() if now is None else now) // 86400)
    for g in found:
        del g["rank"]
        g["count"] = int(g["count"])
        g["namespaces"], g["per_image"], g["daily"] = set(), {}, [0] * days
    where = [fts.among(conn, gn.signature, list(by_sig)), *rows_scope]
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
        fts.among(conn, gd.signature, list(by_sig)), gd.day > today - days
    )
    if visible is not None:
        daily = daily.where(gd.namespace.in_(sorted(visible)))
    if namespace is not None:
        daily = daily.where(gd.namespace == namespace)
    for sig, day, n in conn.execute(daily.group_by(gd.signature, gd.day)):
        by_sig[sig]["daily"][day - today + days - 1] = int(n)
    for g in found:
        g["namespaces"] = sorted(n for n in g["namespaces"] if n)
        per_image = sorted(g["per_image"].values(), key=lambda i: (i["first_seen"], i["image"] or ""))
        g["per_image"] = per_image
        g["images"] = sorted(i["image"] for i in per_image if i["image"])
        g["first_image"] = per_image[0]["image"] if per_image else None
        g["last_image"] = max(per_image, key=lambda i: i["last_seen"])["image"] if per_image else None
    repos = {repository(g["first_image"]) for g in found if g["first_image"]}
    firsts = _image_first_seen(conn, visible, namespace, repos)
    for g in found:
        g["new_in"] = _is_new_in(g["first_image"], g["first_seen"], firsts)
    return found


def _ranges(repos: Collection[str]) -> list[tuple[str, str]]:
    """The byte ranges [low, high) of ``repos``' images: ``repo``, ``repo:tag``, ``repo@digest``
    (in collation "C", where ``:`` sorts before ``;``; and only ``repo`` itself lies in
    [``repo``, ``repo`` + U+0001), a text holding no NUL)."""
    ranges = []
    for repo in sorted(repos):
        ranges += [(repo, repo + "\x01"), (repo + ":", repo + ";"), (repo + "@", repo + "A")]
    return ranges


def _image_first_seen(
    conn: Connection, visible: Collection[str] | None, namespace: str | None, repos: Collection[str]
) -> dict[str, list[tuple[int, str]]]:
    """Per image repository of ``repos``, the two of its images that crashed first (when, image),
    over the namespaces in scope: enough to tell whether another image of it crashed before a time.

    Only the images of ``repos`` are read, by byte ranges of ``group_namespaces_image``
    (PostgreSQL's in collation "C", whatever the database's collation), not all of them
    (4,200 images, 20,000 rows: a third of the group list's time at 10,000,000 crashes). On
    PostgreSQL the ranges are two arrays joined to the index: written as an OR of three ranges
    per repository, a page's 150 took 2-10 ms to plan (0.2 ms now) and were compiled again
    for each number of repositories. On SQLite they are one JSON array joined to the index: as an
    OR, SQLite read the whole index and checked the OR on each entry (a page of 51 repositories at
    1,000,000 crashes: 753,000 VM steps, 13-14 ms; joined 0.6-0.8 ms).
    """
    gn = group_ns.c
    if not repos:
        return {}
    if conn.dialect.name == "postgresql":
        low, high = zip(*_ranges(repos), strict=True)
        r = sa.func.unnest(sa.literal(list(low), ARRAY(sa.Text)), sa.literal(list(high), ARRAY(sa.Text)))
        r = r.table_valued("low", "high").render_derived(name="r")
        image = gn.image.collate("C")
        query = sa.select(gn.image, sa.func.min(gn.first_seen)).select_from(r)
        query = query.join(group_ns, sa.and_(image >= r.c.low, image < r.c.high))
    else:  # one JSON array of the ranges, joined to the index as PostgreSQL's arrays are
        r = sa.func.json_each(sa.literal(json.dumps(_ranges(repos)))).table_valued("value", name="r")
        low, high = sa.func.json_extract(r.c.value, "$[0]"), sa.func.json_extract(r.c.value, "$[1]")
        query = sa.select(gn.image, sa.func.min(gn.first_seen)).select_from(r)
        query = query.join(group_ns, sa.and_(gn.image >= low, gn.image < high))
    query = query.where(gn.image != "").group_by(gn.image)
    if visible is not None:
        query = query.where(gn.namespace.in_(sorted(visible)))
    if namespace is not None:
        query = query.where(gn.namespace == namespace)
    earliest: dict[str, list[tuple[int, str]]] = {}
    for img, t in conn.execute(query):
        if repository(img) not in repos:  # a registry's port: host:5000/app is not host's
            continue
        two = earliest.setdefault(repository(img), [])
        two.append((int(t), img))
        two.sort()
        del two[2:]
    return earliest


def _is_new_in(image: str | None, first_seen: int, earliest: dict[str, list[tuple[int, str]]]) -> str | None:
    # the repository's earliest image other than this one is among its two earliest; looked up
    # per group, not by comparing every image of the catalog (4,200 of them took 0.1 s a page)
    if not image:
        return None
    earlier = any(t < first_seen and i != image for t, i in earliest.get(repository(image), ()))
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
    firsts = _image_first_seen(conn, visible, namespace, {repository(image)})
    query = sa.select(gn.signature, gn.image, gn.first_seen).where(gn.signature.in_(candidates), *scope)
    first: dict[str, tuple[int, str]] = {}
    for sig, img, t in conn.execute(query):
        if sig not in first or (t, img) < first[sig]:
            first[sig] = (t, img)
    return [sig for sig, (t, img) in first.items() if img == image and _is_new_in(img, t, firsts)]


def list_namespaces(conn: Connection) -> list[str]:
    return list(conn.execute(sa.select(namespaces.c.name).order_by(namespaces.c.name)).scalars())


def list_dropped(conn: Connection, limit: int = 100) -> list[dict]:
    query = sa.select(dropped).order_by(dropped.c.time.desc()).limit(limit)
    return [dict(r._mapping) for r in conn.execute(query)]


def group_detail(conn: Connection, signature: str, visible: Collection[str] | None = None) -> dict | None:
    """A group as ``visible`` namespaces see it, with state, history and newest crashes; None if unseen."""
    found = list_groups(conn, 1, visible=visible, signature=signature, days=30)
    if not found:
        return None
    group = found[0]
    group["status"] = lifecycle.state_of(conn, signature, visible)
    scope = frozenset(visible) if visible is not None else None
    group["history"] = _seen_by(conn, lifecycle.history(conn, signature, scope), scope)
    group["recent"] = list_crashes(conn, Filters(group=signature, visible=scope), 5)
    return group


def _seen_by(conn: Connection, entries: list[dict], visible: frozenset[str] | None) -> list[dict]:
    """History as ``visible`` namespaces may read it: another namespace's crash and image left out."""
    named = {e["crash"] for e in entries if e.get("crash")}
    if visible is None or not named:
        return entries
    c = crashes.c
    query = sa.select(c.id).where(c.id.in_(sorted(named)), c.namespace.in_(sorted(visible)))
    seen = set(conn.execute(query).scalars()) if visible else set()
    hidden = ("crash", "image")
    return [
        e if e.get("crash") in seen or not e.get("crash") else {k: v for k, v in e.items() if k not in hidden}
        for e in entries
    ]
