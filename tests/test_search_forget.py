"""Forgetting crashes takes their values out of the search dictionary and their groups' terms,
on SQLite and a real PostgreSQL: after each forget, both tables hold what making them again from
the crashes left holds, and a search no longer leads to a group gone from the reader's namespace.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, search
from tests.triage_data import add

NOW = int(time.time())


def _tables(conn: sa.Connection) -> tuple[set, set]:
    v, gt = search.search_values.c, search.group_terms.c
    values = set(conn.execute(sa.select(v.kind, v.value)).all())
    terms = set(conn.execute(sa.select(v.kind, v.value, gt.signature, gt.namespace).join_from(
        search.group_terms, search.search_values, v.id == gt.value_id
    )).all())  # fmt: skip
    return values, terms


def _as_made_again(engine: sa.Engine) -> None:
    """The dictionary and the terms are what :func:`search.rebuild_terms` makes of the crashes left."""
    with engine.connect() as conn:
        kept = _tables(conn)
        search.rebuild_terms(conn)
        made = _tables(conn)
        conn.rollback()
    assert kept == made


def _forget(engine: sa.Engine, crash_id: str) -> None:
    with engine.begin() as conn:
        catalog.forget(conn, crash_id)
    _as_made_again(engine)


def _groups(engine: sa.Engine, q: str, namespace: str = "shop") -> set[str]:
    with engine.connect() as conn:
        return {g["signature"] for g in catalog.list_groups(conn, search=q, visible={namespace})}


def test_forgotten_crashes_leave_no_value_nor_term_behind(engine: sa.Engine) -> None:
    a = add(
        engine, signature="g1", frames=["only_g1_frame", "main"], namespace="shop", pod="web-1", when=NOW - 40
    )
    b = add(
        engine, signature="g1", frames=["only_g1_frame", "main"], namespace="shop", pod="web-2", when=NOW - 30
    )
    add(engine, signature="g2", frames=["compress_block", "main"], namespace="team", pod="zip-1",
        image="registry.example/zip:2", when=NOW - 20)  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, {"id": "pending-1", "time": NOW, "pod": {"namespace": "shop", "name": "lonely-pod", "image": "registry.example/web:1"},
                                 "process": {"exe": "/app/lonely"}}, "pending")  # fmt: skip
    _as_made_again(engine)
    assert _groups(engine, "web-1") == {"g1"}

    _forget(engine, a)  # its pod's value and term go; its group stays in shop with web-2's crash
    assert _groups(engine, "web-1") == set() and _groups(engine, "only_g1") == {"g1"}
    with engine.connect() as conn:
        assert catalog.list_crashes(conn, catalog.Filters(search="web-1")) == []
        assert [c["id"] for c in catalog.list_crashes(conn, catalog.Filters(search="web-2"))] == [b]

    _forget(engine, b)  # g1 gone from shop: none of its terms there, its own frame and title gone
    assert _groups(engine, "only_g1") == set() and _groups(engine, "main") == set()
    assert _groups(engine, "main", "team") == {"g2"}  # a frame another group holds stays
    with engine.connect() as conn:
        values, _ = _tables(conn)
    assert ("frame", "only_g1_frame") not in values and ("frame", "main") in values
    assert ("image", "registry.example/web:1") in values  # the pending crash's image

    _forget(engine, "pending-1")
    with engine.connect() as conn:
        values, _ = _tables(conn)
    assert not {v for v in values if v[1] in ("lonely-pod", "/app/lonely", "registry.example/web:1")}


def test_a_term_of_a_value_common_in_other_groups_goes_with_its_groups_last_crash_of_it(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest crashes of the pod are another group's: the group's own are read to decide."""
    monkeypatch.setattr(search, "PROBE", 2)
    old = add(engine, signature="g1", frames=["f1"], namespace="shop", pod="web-1", when=NOW - 50)
    add(engine, signature="g1", frames=["f1"], namespace="shop", pod="web-9", when=NOW - 45)
    for i in range(3):
        add(engine, signature="g2", frames=["f2"], namespace="shop", pod="web-1", when=NOW - 10 + i)
    assert _groups(engine, "web-1") == {"g1", "g2"}
    _forget(engine, old)
    assert _groups(engine, "web-1") == {"g2"} and _groups(engine, "web-9") == {"g1"}
