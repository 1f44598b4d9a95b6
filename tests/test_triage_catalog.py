"""Group lifecycle, per-image counts, events and search in the catalog, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, lifecycle, search
from tests.triage_data import add

NOW = int(time.time())
HOUR = 3600


def _groups(engine: sa.Engine, **kw: object) -> dict[str, dict]:
    with engine.connect() as conn:
        return {g["signature"]: g for g in catalog.list_groups(conn, 100, **kw)}  # type: ignore[arg-type]


def _events(engine: sa.Engine) -> list[tuple[str, str, str]]:
    e = lifecycle.group_events.c
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(e.signature, e.kind, e.namespace).order_by(e.id))]


def test_resolved_group_regresses_on_a_new_crash_and_history_is_kept(engine: sa.Engine) -> None:
    add(engine, signature="g1", frames=["parse", "main"], namespace="shop", when=NOW - 5 * HOUR)
    assert _groups(engine)["g1"]["state"] == "open"
    with engine.begin() as conn:
        lifecycle.change(
            conn, "g1", lifecycle.Change("resolved", comment="fixed in 1.2"), "alice", NOW - 4 * HOUR
        )
    assert _groups(engine)["g1"]["state"] == "resolved"
    assert _groups(engine, states=lifecycle.ATTENTION) == {}
    # analysed late, but it crashed before the fix was declared: no regression
    add(engine, signature="g1", frames=["parse", "main"], namespace="shop", when=NOW - 4 * HOUR - 60)
    assert _groups(engine)["g1"]["state"] == "resolved"
    add(engine, signature="g1", frames=["parse", "main"], namespace="shop", when=NOW - HOUR)
    assert _groups(engine)["g1"]["state"] == "regressed"
    with engine.connect() as conn:
        hist = lifecycle.history(conn, "g1")
    assert [(h["state"], h["actor"]) for h in hist] == [("regressed", "corevault"), ("resolved", "alice")]
    assert hist[1]["comment"] == "fixed in 1.2" and hist[0]["crash"]
    assert _events(engine) == [("g1", "new", "shop"), ("g1", "regressed", "shop")]


def test_resolved_in_an_image_ignores_crashes_of_older_images(engine: sa.Engine) -> None:
    old, fixed, later = "registry.example/web:1", "registry.example/web:2", "registry.example/web:3"
    add(engine, signature="g2", frames=["f"], namespace="shop", image=old, when=NOW - 5 * HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "g2", lifecycle.Change("resolved", resolved_in=fixed), "alice", NOW - 4 * HOUR)
    add(engine, signature="g2", frames=["f"], namespace="shop", image=old, when=NOW - 3 * HOUR)
    assert _groups(engine)["g2"]["state"] == "resolved"  # an old replica still running
    add(engine, signature="g2", frames=["f"], namespace="shop", image=later, when=NOW - 2 * HOUR)
    assert _groups(engine)["g2"]["state"] == "regressed"  # an image never seen before the fix


def test_ignore_until_a_time_or_a_number_of_crashes(engine: sa.Engine) -> None:
    add(engine, signature="g3", frames=["f"], namespace="shop", when=NOW - 5 * HOUR)
    add(engine, signature="g4", frames=["g"], namespace="shop", when=NOW - 5 * HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "g3", lifecycle.Change("ignored", until=NOW + HOUR), "bob")
        lifecycle.change(conn, "g4", lifecycle.Change("ignored", crashes=2), "bob")
    assert _groups(engine)["g3"]["state"] == "ignored"
    assert _groups(engine, now=NOW + 2 * HOUR)["g3"]["state"] == "open"  # the time passed
    assert "g3" in _groups(engine, states=lifecycle.ATTENTION, now=NOW + 2 * HOUR)
    add(engine, signature="g4", frames=["g"], namespace="shop", when=NOW - 4 * HOUR)
    assert _groups(engine)["g4"]["state"] == "ignored"
    add(engine, signature="g4", frames=["g"], namespace="shop", when=NOW - 3 * HOUR)
    assert _groups(engine)["g4"]["state"] == "open"
    with engine.connect() as conn:
        assert lifecycle.history(conn, "g4")[0]["actor"] == "corevault"
    with pytest.raises(lifecycle.StateError, match="until and crashes go with state ignored"):
        lifecycle.Change("resolved", crashes=3).check()
    with engine.begin() as conn, pytest.raises(lifecycle.StateError, match="no crash group"):
        lifecycle.change(conn, "nope", lifecycle.Change("resolved"), "bob")


def test_per_image_counts_and_new_in_an_image_per_reader(engine: sa.Engine) -> None:
    v1, v2 = "registry.example/shop/api:1.0", "registry.example/shop/api:1.1"
    add(engine, signature="old", frames=["a"], namespace="shop", image=v1, when=NOW - 10 * HOUR)
    add(engine, signature="old", frames=["a"], namespace="shop", image=v2, when=NOW - 2 * HOUR)
    add(engine, signature="fresh", frames=["b"], namespace="shop", image=v2, when=NOW - 2 * HOUR)
    add(engine, signature="fresh", frames=["b"], namespace="shop", image=v2, when=NOW - HOUR)
    add(engine, signature="fresh", frames=["b"], namespace="team", image="other/app:7", when=NOW - 20 * HOUR)
    shop = _groups(engine, visible={"shop"})
    assert (
        shop["old"]["first_image"] == v1 and shop["old"]["last_image"] == v2 and shop["old"]["new_in"] is None
    )
    assert [(i["image"], i["count"]) for i in shop["old"]["per_image"]] == [(v1, 1), (v2, 1)]
    assert shop["fresh"]["new_in"] == v2 and shop["fresh"]["first_image"] == v2
    assert list(_groups(engine, visible={"shop"}, new_in=v2)) == ["fresh"]
    # over every namespace the group first crashed in team's image: not new in shop's rollout
    everyone = _groups(engine)
    assert everyone["fresh"]["first_image"] == "other/app:7" and everyone["fresh"]["new_in"] is None
    assert "other/app:7" not in str(shop)  # nothing of team in what shop sees


def test_a_group_list_seeks_its_repositories_images_by_the_index(tmp_path) -> None:
    """On SQLite the page's repositories are ranges joined to ``group_namespaces_image``: an OR of
    them read every image of the catalog, checking the OR on each."""
    engine = catalog.connect(f"sqlite:///{tmp_path}/c.db")
    for i in range(40):
        add(engine, signature=f"g{i}", frames=["f"], namespace="shop", image=f"reg/app{i}:1", when=NOW - i)
    seen: list[tuple[str, object]] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.append((a[2], a[3])))
    assert len(_groups(engine)) == 40
    (sql, params), *_ = [(s, p) for s, p in seen if "min(group_namespaces.first_seen)" in s]
    with engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
    assert any("SEARCH group_namespaces USING COVERING INDEX group_namespaces_image" in s for s in plan), plan
    assert not any(s.startswith("SCAN group_namespaces") for s in plan), plan
    engine.dispose()


def test_new_in_an_image_counts_the_images_of_its_repository_only(engine: sa.Engine) -> None:
    """The repository's images are read by byte ranges: its bare name, a digest, a tag, a registry's
    port, and a repository whose name starts with another's."""
    add(engine, signature="b", frames=["z"], namespace="shop", image="reg/app", when=NOW - 10 * HOUR)
    add(engine, signature="d", frames=["a"], namespace="shop", image="reg/app@sha256:aa", when=NOW - 9 * HOUR)
    add(engine, signature="t", frames=["b"], namespace="shop", image="reg/app:2", when=NOW - 8 * HOUR)
    add(engine, signature="p", frames=["c"], namespace="shop", image="reg/app2:1", when=NOW - 7 * HOUR)
    add(engine, signature="h1", frames=["d"], namespace="shop", image="host:5000/app:1", when=NOW - 6 * HOUR)
    add(engine, signature="h2", frames=["e"], namespace="shop", image="host:5000/app:2", when=NOW - 5 * HOUR)
    add(engine, signature="o", frames=["f"], namespace="shop", image="host:1", when=NOW - 4 * HOUR)
    new_in = {sig: g["new_in"] for sig, g in _groups(engine).items()}
    assert new_in == {
        "b": None,
        "d": "reg/app@sha256:aa",
        "t": "reg/app:2",
        "p": None,
        "h1": None,
        "h2": "host:5000/app:2",
        "o": None,
    }
    assert list(_groups(engine, new_in="reg/app:2")) == ["t"]
    assert list(_groups(engine, new_in="reg/app@sha256:aa")) == ["d"]
    assert list(_groups(engine, new_in="host:1")) == []


def test_search_finds_title_frames_exe_pod_and_image_newest_first(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = add(engine, signature="s1", frames=["ns::Parser::readHeader", "main"], namespace="shop",
            pod="checkout-7f9c", image="registry.example/shop/checkout:4.2", when=NOW - 3 * HOUR)  # fmt: skip
    b = add(engine, signature="s2", frames=["compress_block", "main"], namespace="team", pod="zip-1",
            image="registry.example/team/zipper:1", when=NOW - 2 * HOUR)  # fmt: skip
    c = add(engine, signature="s1", frames=["ns::Parser::readHeader", "main"], namespace="shop",
            pod="checkout-8aa1", image="registry.example/shop/checkout:4.3", when=NOW - HOUR)  # fmt: skip

    def found(q: str, **kw: object) -> list[str]:
        with engine.connect() as conn:
            return [r["id"] for r in catalog.list_crashes(conn, catalog.Filters(search=q, **kw), 50)]  # type: ignore[arg-type]

    # words of few values become equalities on the crashes' indexed columns (and the page starts
    # from the rarest word's values); with FEW at 0 every word is a filter on the walk of time
    for few in (search.FEW, 0):
        monkeypatch.setattr(search, "FEW", few)
        assert found("readheader") == [c, a]  # frames, any case, newest first
        assert found("CHECKOUT-7f9") == [a]  # part of a pod name
        assert found("zipper") == [b]  # image
        assert found("svc") == [c, b, a]  # executable
        assert found("readHeader 4.3") == [c]  # every word must match
        assert found("header readhead") == [c, a] and found("readheadex") == []
        assert found("compress", visible=frozenset({"shop"})) == []  # another namespace's crash
        assert found("%%%") == [] and found('"""') == []  # no wildcard, no syntax
    with pytest.raises(search.SearchError, match="three characters"):
        found("ab")
    with engine.connect() as conn:  # pages follow the index's order
        first = catalog.list_crashes(conn, catalog.Filters(search="main"), 2)
        rest = catalog.list_crashes(
            conn, catalog.Filters(search="main"), 2, (first[-1]["search_key"], first[-1]["id"])
        )
    assert [r["id"] for r in first + rest] == [c, b, a]
    assert list(_groups(engine, search="compress_block")) == ["s2"]
    assert _groups(engine, search="compress_block", visible={"shop"}) == {}
    with engine.begin() as conn:
        catalog.forget(conn, b)
    assert found("zipper") == []


def test_metrics_counts_per_namespace_and_state(engine: sa.Engine) -> None:
    add(engine, signature="m1", frames=["f"], namespace="shop", when=NOW - HOUR)
    add(engine, signature="m1", frames=["f"], namespace="team", when=NOW - HOUR)
    add(engine, signature="m2", frames=["g"], namespace="shop", when=NOW - HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "m2", lifecycle.Change("resolved"), "alice")
    with engine.connect() as conn:
        states = set(lifecycle.state_counts(conn))
        events = set(lifecycle.event_counts(conn))
    assert states == {("shop", "open", 1), ("shop", "resolved", 1), ("team", "open", 1)}
    assert events == {("shop", "new", 2), ("team", "new", 1)}  # a group is new to each namespace once


def test_group_search_finds_old_groups_in_the_readers_namespaces(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(engine, signature="t-old", frames=["Queue::drain"], namespace="shop", pod="drainer-1",
        when=NOW - 80 * 24 * HOUR)  # fmt: skip
    for i in range(30):  # newer crashes holding the same word, in other groups and another namespace
        add(engine, signature=f"t-{i}", frames=["Queue::push"], namespace="team", pod=f"drainer-9{i}",
            when=NOW - HOUR)  # fmt: skip
    add(engine, signature="t-new", frames=["Queue::pop"], namespace="shop", pod="drainer-3", when=NOW - HOUR)
    # words of few values: the groups holding them by key; with FEW at 0, every word is checked
    # on each group of the list's walk
    for few in (search.FEW, 0):
        monkeypatch.setattr(search, "FEW", few)
        assert set(_groups(engine, search="drainer", visible={"shop"})) == {"t-old", "t-new"}
        assert len(_groups(engine, search="drainer")) == 32  # every namespace: all of them
        assert set(_groups(engine, search="drainer-1")) == {"t-old"}  # however old
        assert set(_groups(engine, search="queue::drain drainer")) == {"t-old"}  # every word
        assert set(_groups(engine, search="queue::drain drainer-3")) == set()
        assert _groups(engine, search="drainer-90", visible={"shop"}) == {}  # a pod of team's
        assert set(_groups(engine, search="queue::", namespace="shop")) == {"t-old", "t-new"}
    with engine.connect() as conn:  # and its crash is found by that pod, however old
        old = catalog.list_crashes(conn, catalog.Filters(search="drainer-1", visible=frozenset({"shop"})))
    assert [r["pod"] for r in old] == ["drainer-1"]


def test_search_text_with_nul_is_refused_before_the_database(engine: sa.Engine) -> None:
    with engine.connect() as conn, pytest.raises(search.SearchError, match="NUL"):
        catalog.list_crashes(conn, catalog.Filters(search="abc\x00def"))


def test_another_namespaces_crash_regresses_its_own_state_and_history_only(engine: sa.Engine) -> None:
    add(engine, signature="g9", frames=["f"], namespace="shop", when=NOW - 5 * HOUR)
    add(engine, signature="g9", frames=["f"], namespace="payroll", when=NOW - 5 * HOUR)
    with engine.begin() as conn:
        lifecycle.change(conn, "g9", lifecycle.Change("resolved"), "alice", NOW - 4 * HOUR)
    secret = "registry.example/payroll:7"
    other = add(engine, signature="g9", frames=["f"], namespace="payroll", image=secret, when=NOW - HOUR)
    with engine.connect() as conn:
        everyone = catalog.group_detail(conn, "g9")
        shop = catalog.group_detail(conn, "g9", frozenset({"shop"}))
        payroll = catalog.group_detail(conn, "g9", frozenset({"payroll"}))
    assert everyone and shop and payroll
    assert everyone["status"]["state"] == "regressed"  # the most urgent of its namespaces
    assert {s["namespace"]: s["state"] for s in everyone["status"]["namespaces"]} == {
        "payroll": "regressed", "shop": "resolved"
    }  # fmt: skip
    assert everyone["history"][0]["crash"] == other and everyone["history"][0]["image"] == secret
    assert payroll["status"]["state"] == "regressed" and payroll["history"][0]["crash"] == other
    assert payroll["history"][0]["namespaces"] == ["payroll"]
    assert shop["status"]["state"] == "resolved" and shop["status"]["actor"] == "alice"
    assert [(h["state"], h["namespaces"]) for h in shop["history"]] == [("resolved", ["shop"])]
    assert other not in str(shop) and secret not in str(shop["history"])


def test_paths_longer_than_their_columns_keep_no_record_out(engine: sa.Engine) -> None:
    # a process picks its executable's and mapped files' paths, up to 4 KiB; PostgreSQL refuses
    # text over a column's length, which kept such a crash, and every record inserted with it, out
    deep = "/app" + "/d" * 1500 + "/svc"
    meta = {
        "id": "c-deep", "time": NOW, "node": "node-1",
        "pod": {"namespace": "shop", "name": "deep-0", "container": "app", "image": "registry.example/deep:1"},
        "process": {"exe": deep, "comm": "svc", "ns_pid": 7}, "signal": {"number": 11, "name": "SIGSEGV"},
        "modules": [{"path": deep, "key": "ab" * 20, "sha256": "cd" * 32},
                    {"path": deep + "x", "key": "ef" * 20, "sha256": "01" * 32}],
    }  # fmt: skip
    with engine.begin() as conn:
        assert catalog.add_crash(conn, meta, "pending")
        other = {"event": "refused", "time": NOW, "reason": "storm", "pod": {"namespace": "b", "name": "b-0"}}
        assert catalog.add_dropped(conn, [{**other, "exe": deep, "pod": {"namespace": "a"}}, other]) == 2
    with engine.connect() as conn:
        crash = catalog.get_crash(conn, "c-deep")
        dropped = catalog.list_dropped(conn)
    assert crash is not None and deep.startswith(crash["exe"]) and crash["meta"]["process"]["exe"] == deep
    assert sorted((d.get("namespace") or "") for d in dropped) == ["a", "b"]
