"""The group search, on SQLite and a real PostgreSQL: page by page and in each reader's namespaces,
the groups that reading every crash finds, whichever way each word is looked up."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, search, tables
from tests.conftest import catalog_at
from tests.triage_data import add, many_rows

NOW = int(time.time())


def _counted(rows: list[dict], visible: frozenset[str] | None) -> list[dict]:
    return [r for r in rows if r["signature"] and (visible is None or r["namespace"] in visible)]


def _reference(rows: list[dict], words: list[str], visible: frozenset[str] | None) -> list[str]:
    """The groups with, for each word, a crash in scope holding it, the newest seen in scope first."""
    last: dict[str, int] = {}
    held: dict[str, set[str]] = {}
    for r in _counted(rows, visible):
        last[r["signature"]] = max(last.get(r["signature"], 0), r["time"])
        texts = [(r[k] or "").lower() for k in ("pod", "image", "exe", "title")]
        held.setdefault(r["signature"], set()).update(w for w in words if any(w.lower() in t for t in texts))
    found = [s for s, w in held.items() if w == set(words)]
    return sorted(found, key=lambda s: (last[s], s), reverse=True)


def _pages(engine: sa.Engine, q: str, visible: frozenset[str] | None, size: int) -> list[str]:
    got, before = [], None
    with engine.connect() as conn:
        while page := catalog.list_groups(conn, size, visible=visible, search=q, before=before, states=None):
            got += [g["signature"] for g in page]
            before = (page[-1]["last_seen"], page[-1]["signature"])
        if conn.dialect.name == "postgresql":  # the lookup's planner setting is not left behind
            assert conn.exec_driver_sql("SHOW enable_seqscan").scalar() == "on"
    return got


def test_a_group_search_finds_page_by_page_what_a_reading_of_every_crash_finds(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each word's groups are named by literals (few values, few groups), by a subquery of its
    values (few values held by many groups: ``usr/bin``) or checked on each group of the walk
    (many values): the same groups, in the same order, page after page."""
    rows = many_rows(NOW, 4)  # each group in every namespace, its pods in one
    engine = catalog.connect(catalog_url)
    with engine.begin() as conn:
        conn.execute(tables.crashes.insert(), rows)
        totals: dict[str, list[int]] = {}
        for r in _counted(rows, None):
            t = totals.setdefault(r["signature"], [0, r["time"], r["time"]])
            t[0], t[1], t[2] = t[0] + 1, min(t[1], r["time"]), max(t[2], r["time"])
        conn.execute(tables.groups.insert(), [
            {"signature": s, "title": f"SIGSEGV in handler_{int(s, 16)}", "first_seen": first, "last_seen": last,
             "count": n} for s, (n, first, last) in totals.items()
        ])  # fmt: skip
        catalog.rebuild_group_counts(conn)
        search.rebuild(conn)
    queries = [
        "pod-1",
        "HANDLER_4",
        "svc-3",
        "usr/bin",
        "team-2-pod-3 handler_",
        "svc- POD-2",
        "svc-4 nothing-holds-this",
    ]
    assert all(_reference(rows, q.split(), None) for q in queries[:-1])  # each finds some
    for few in (search.FEW, 3, 0):
        monkeypatch.setattr(search, "FEW", few)
        for q in queries:
            for visible in (None, frozenset({"team-1"}), frozenset({"team-0", "team-2"}), frozenset()):
                assert _pages(engine, q, visible, 2) == _reference(rows, q.split(), visible), (
                    few,
                    q,
                    visible,
                )
    engine.dispose()


def test_version_15_lets_a_readers_group_list_seek_its_namespaces_rows(catalog_url: str) -> None:
    """A reader's list sums its own namespaces' rows of the groups, found by the index version 15
    adds (to a catalog of version 14 here), not by reading every namespace's."""
    catalog_at(catalog_url, 14).dispose()
    engine = catalog.connect(catalog_url)
    for i in range(6):
        add(engine, signature=f"g{i % 3}", frames=["f"], namespace=f"team-{i % 2}", when=NOW - 60 * i)
    with engine.connect() as conn:
        counts = {g["signature"]: g["count"] for g in catalog.list_groups(conn, visible={"team-1"})}
        assert counts == {"g0": 1, "g1": 1, "g2": 1}
        gn = tables.group_ns.c
        query = sa.select(gn.signature, sa.func.sum(gn.count)).where(gn.namespace == "team-1")
        sql = str(query.group_by(gn.signature).compile(conn, compile_kwargs={"literal_binds": True}))
        if conn.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        else:  # a table this small is read whole unless told not to
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
    assert "group_namespaces_namespace" in plan, plan
    engine.dispose()
