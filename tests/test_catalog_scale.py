"""The catalog's shape for size, on SQLite and a real PostgreSQL: the search dictionary, the groups'
own totals (what the group list over every namespace reads), and schema version 9, which
with version 10 brings both to a populated catalog of version 8."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, migrations, search, tables
from tests.conftest import catalog_at
from tests.triage_data import add, many_rows, report

NOW = int(time.time())
HOUR = 3600


def _totals(engine: sa.Engine) -> dict[str, tuple[int, int, int]]:
    with engine.connect() as conn:
        return {
            g["signature"]: (g["count"], g["first_seen"], g["last_seen"]) for g in catalog.list_groups(conn)
        }


def test_forgetting_a_crash_takes_it_out_of_its_groups_total(catalog_url: str) -> None:
    engine = catalog.connect(catalog_url)
    old = add(engine, signature="g", frames=["f"], namespace="shop", when=NOW - 3 * HOUR)
    add(engine, signature="g", frames=["f"], namespace="shop", when=NOW - 2 * HOUR)
    new = add(engine, signature="g", frames=["f"], namespace="team", image="other:1", when=NOW - HOUR)
    assert _totals(engine) == {"g": (3, NOW - 3 * HOUR, NOW - HOUR)}
    with engine.begin() as conn:
        catalog.forget(conn, new)
    # the newest crash gone with its namespace's row: last seen is the newest left
    assert _totals(engine) == {"g": (2, NOW - 3 * HOUR, NOW - 2 * HOUR)}
    with engine.begin() as conn:
        catalog.forget(conn, old)
        total = conn.execute(sa.select(tables.groups.c.count)).scalar_one()
    assert total == 1 and _totals(engine)["g"][0] == 1
    with engine.connect() as conn:  # the reader of one namespace counts the same way
        (shop,) = catalog.list_groups(conn, visible={"shop"})
    assert shop["count"] == 1
    with engine.begin() as conn:
        for crash in catalog.list_crashes(conn):
            catalog.forget(conn, crash["id"])
        catalog.forget(conn, new)  # twice: nothing more to take
        assert conn.execute(sa.select(tables.groups.c.count)).scalar_one() == 0
    assert _totals(engine) == {}  # a group with no crash left is not listed


def _pages(engine: sa.Engine, filters: catalog.Filters, size: int) -> list[str]:
    """The ids of every page of a crash search, a page after another."""
    got, before = [], None
    with engine.connect() as conn:
        while page := catalog.list_crashes(conn, filters, size, before):
            got += [r["id"] for r in page]
            before = (page[-1]["search_key"], page[-1]["id"])
    return got


def test_a_crash_search_pages_through_the_values_of_a_rare_word(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's name (a word of few values) starts the page from each pod's newest crashes."""
    engine = catalog.connect(catalog_url)
    made = [
        add(
            engine,
            signature=f"s{i % 3}",
            frames=["run"],
            namespace="shop",
            pod=f"cart-{i % 4}",
            when=NOW - 100 * i,
        )
        for i in range(12)
    ]
    unanalysed = {"id": "pending-1", "time": NOW - 50, "pod": {"namespace": "shop", "name": "cart-9"},
                  "core": {"size": 1}}  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, unanalysed, "pending")

    def pages(q: str, size: int) -> list[str]:
        return _pages(engine, catalog.Filters(search=q), size)

    for few in (search.FEW, 0):  # the union of the pods' pages, then the walk of time
        monkeypatch.setattr(search, "FEW", few)
        monkeypatch.setattr(search, "WIDE", few)  # nor a start of several words
        assert pages("cart-9", 2) == ["pending-1"]  # not analysed: found by its pod
        assert pages("CART- run", 5) == made  # every word, newest first
        with engine.connect() as conn:
            match = search.crash_match(conn, "art-1 art-3")
        assert pages("art-1", 2) == [m for i, m in enumerate(made) if i % 4 == 1]
        assert sorted(pages("rt-", 3)) == sorted([*made, "pending-1"])
        assert pages("art-1 art-3", 2) == [] and (match.seeds is not None) == bool(few)


def test_versions_9_and_10_make_the_search_dictionary_and_group_totals_of_an_older_catalog(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = catalog_at(catalog_url, 8)
    rows = [
        ("a1", NOW - 90 * 86400, "shop", "checkout-7f9c", "registry.example/shop/checkout:4.2", "g1",
         ["ns::Parser::readHeader", "main"]),
        ("a2", NOW - HOUR, "shop", "checkout-8aa1", "registry.example/shop/checkout:4.3", "g1",
         ["ns::Parser::readHeader", "main"]),
        ("b1", NOW - 2 * HOUR, "team", "zip-1", "registry.example/team/zipper:1", "g2", ["compress_block"]),
    ]  # fmt: skip
    with engine.begin() as conn:
        for crash_id, when, ns, pod, image, sig, frames in rows:
            r = report(sig, frames)
            conn.execute(tables.crashes.insert().values(
                id=crash_id, time=when, namespace=ns, pod=pod, image=image, exe="/app/svc", signature=sig,
                title=r["title"], analysis="done", meta="{}",
            ))  # fmt: skip
            conn.execute(
                tables.reports.insert().values(crash_id=crash_id, backend="gdb", report=json.dumps(r))
            )
        conn.execute(
            tables.crashes.insert().values(id="p1", time=NOW, pod="lonely-pod", analysis="off", meta="{}")
        )
        for sig, title in (("g1", "SIGSEGV in ns::Parser::readHeader"), ("g2", "SIGSEGV in compress_block")):
            # totals that forgetting left too high, as version 8 did
            conn.execute(tables.groups.insert().values(
                signature=sig, title=title, signal_name="SIGSEGV", first_seen=0, last_seen=0, count=99
            ))  # fmt: skip
        conn.execute(tables.group_ns.insert().values(
            signature="g1", namespace="shop", image="registry.example/shop/checkout:4.2", count=2,
            first_seen=NOW - 90 * 86400, last_seen=NOW - HOUR,
        ))  # fmt: skip
        conn.execute(tables.group_ns.insert().values(
            signature="g2", namespace="team", image="registry.example/team/zipper:1", count=1,
            first_seen=NOW - 2 * HOUR, last_seen=NOW - 2 * HOUR,
        ))  # fmt: skip
        old_search = "crash_search" if conn.dialect.name == "sqlite" else "crash_search_pg"
        assert old_search in sa.inspect(conn).get_table_names()
    engine.dispose()

    engine = catalog.connect(catalog_url)
    with engine.connect() as conn:
        version = conn.execute(sa.select(sa.func.max(migrations.schema.c.version))).scalar_one()
        names = set(sa.inspect(conn).get_table_names())

        def found(q: str, **kw: object) -> list[str]:
            return [r["id"] for r in catalog.list_crashes(conn, catalog.Filters(search=q, **kw))]  # type: ignore[arg-type]

        assert found("readheader") == ["a2", "a1"] and found("checkout-7f9") == ["a1"]
        monkeypatch.setattr(search, "FEW", 0)  # every word checked on the crash and its group's frames
        assert found("readheader") == ["a2", "a1"] and found("compress_bl") == ["b1"]
        monkeypatch.setattr(search, "FEW", 200)
        assert found("zipper") == ["b1"] and found("lonely") == ["p1"] and found("svc") == ["a2", "b1", "a1"]
        listed = {g["signature"]: g["count"] for g in catalog.list_groups(conn)}
        found_groups = {g["signature"] for g in catalog.list_groups(conn, search="checkout-7f9")}
        scoped = catalog.list_groups(conn, search="compress", visible={"shop"})
    assert version == len(migrations.MIGRATIONS) >= 10
    assert not names & {"crash_search", "crash_search_pg", "crash_search_stats"}
    assert listed == {"g1": 2, "g2": 1}  # the totals made again of the per-namespace counts
    assert found_groups == {"g1"} and scoped == []


def test_a_search_of_two_common_words_finds_what_a_reading_of_every_crash_finds(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither word is rare enough to start from (many images hold one, many pods the other):
    the search starts from the crashes of the word that has fewer, and finds, page by page and
    in each reader's namespaces, what reading every crash finds."""
    monkeypatch.setattr(search, "FEW", 6)  # the catalog's sizes, scaled down with the catalog
    monkeypatch.setattr(search, "SEEDS", 3)
    monkeypatch.setattr(search, "START_COST", 2)  # so that these words start, to check the start's pages
    engine = catalog.connect(catalog_url)
    rows = many_rows(NOW, 3)  # every tenth not analysed: no group, found by its own columns
    with engine.begin() as conn:
        conn.execute(tables.crashes.insert(), rows)
        conn.execute(tables.groups.insert(), [
            {"signature": f"{g:016x}", "title": f"SIGSEGV in handler_{g}", "first_seen": 0, "last_seen": NOW,
             "count": 1} for g in range(9)
        ])  # fmt: skip
        search.rebuild(conn)

    def reference(words: list[str], visible: frozenset[str] | None) -> list[str]:
        held = [
            r for r in rows
            if all(any(w.lower() in (r[k] or "").lower() for k in ("pod", "image", "exe", "title")) for w in words)
            and (visible is None or r["namespace"] in visible)
        ]  # fmt: skip
        return [r["id"] for r in sorted(held, key=lambda r: (r["time"], r["id"]), reverse=True)]

    for q in ("svc-3 pod-1", "POD-2 svc-", "svc-1 pod-3 team-2", "svc-4 nothing-holds-this"):
        with engine.connect() as conn:
            assert search.crash_match(conn, q).seeds is not None or catalog_url.startswith("postgresql")
        for visible in (None, frozenset({"team-1"}), frozenset()):
            got = _pages(engine, catalog.Filters(search=q, visible=visible), 7)
            assert got == reference(q.split(), visible), (q, visible)
    assert reference(["svc-3", "pod-1"], None)  # the words do meet
    # the walk newest first, which checks a word of many values on the columns its values are of
    # (``pod-1``'s are pods alone, ``handler_`` is in titles): the same pages
    monkeypatch.setattr(search, "_widest_start", lambda *_: None)
    for q in ("svc-3 pod-1", "pod-1 HANDLER_", "svc- handler_"):
        with engine.connect() as conn:
            assert search.crash_match(conn, q).seeds is None
        for visible in (None, frozenset({"team-1"})):
            got = _pages(engine, catalog.Filters(search=q, visible=visible), 7)
            assert got == reference(q.split(), visible), (q, visible)
    assert reference(["pod-1", "handler_"], None) and reference(["svc-", "handler_"], None)


def test_the_walk_of_a_crash_search_reads_its_index_not_the_crashes_rows(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions 14 and 16 bring, on SQLite, the indexes whose own columns the words of a search walked
    newest first are checked on, over every namespace and in one: a crash's row is read once it
    matches (the plan names the index, with no sort). PostgreSQL goes through the versions unchanged."""
    catalog_at(catalog_url, 13).dispose()
    engine = catalog.connect(catalog_url)
    c = tables.crashes.c
    with engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.max(migrations.schema.c.version))).scalar() >= 16
        conn.execute(tables.crashes.insert(), [
            {"id": f"c{i:03d}", "time": NOW - i, "namespace": f"team-{i % 2}", "pod": f"pod-{i}",
             "image": f"svc-{i % 250}", "exe": "/bin/x", "analysis": "pending", "meta": "{}"} for i in range(600)
        ])  # fmt: skip
        search.rebuild(conn)
        monkeypatch.setattr(search, "_widest_start", lambda *_: None)  # each word of many values: walked
        for visible, first in ((None, range(50)), (frozenset({"team-1"}), range(1, 100, 2))):
            got = catalog.list_crashes(conn, catalog.Filters(search="pod- svc-", visible=visible))
            assert [r["id"] for r in got] == [f"c{i:03d}" for i in first]
        if engine.dialect.name != "sqlite":
            return
        match = search.crash_match(conn, "pod- svc-")
        assert match.seeds is None and not match.group_text  # pods and images: no group read
        plans = []
        for scope in ([], [c.namespace.in_(["team-1"])]):
            query = sa.select(c.id, c.meta).where(*match.where, *scope).order_by(c.time.desc(), c.id.desc())
            sql = str(query.limit(50).compile(conn, compile_kwargs={"literal_binds": True}))
            plans.append([row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)])
    engine.dispose()
    every, one = plans
    assert f"SCAN crashes USING INDEX {search.WALK_INDEX}" in every, every
    assert f"SEARCH crashes USING INDEX {search.NAMESPACE_WALK_INDEX} (namespace=?)" in one, one
    assert not any("TEMP B-TREE" in step for step in every + one), plans
