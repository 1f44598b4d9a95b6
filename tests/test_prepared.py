"""The downloads' lookups on a prepared connection (corevault.vault.prepared) answer exactly as
through SQLAlchemy's own execution, for every reader's shape, and see every commit of a writer
at once: a held connection that kept a snapshot would serve a deleted crash's file."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, tables
from corevault.vault.prepared import Prepared, Unprepared

KEY, FORGED, LONE = "ab" * 20, "cd" * 20, "ef" * 20


def _crash(conn: sa.Connection, crash_id: str, namespace: str, at: int, mapped: dict[str, str]) -> None:
    catalog.add_crash(
        conn,
        {"id": crash_id, "time": at, "pod": {"namespace": namespace, "name": f"{namespace}-pod"},
         "core": {"size": 4096, "stored_size": 1024, "sha256": "9" * 64}},
        "off",
    )  # fmt: skip
    for key, sha in mapped.items():
        conn.execute(
            tables.crash_objects.insert().values(
                crash_id=crash_id, key=key, sha256=sha, path=f"/lib/{key[:2]}"
            )
        )


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    """Three namespaces; ``FORGED`` held in two contents (b's forgery of a's), ``LONE`` mapped by
    no crash; debuginfo true, false and unknown."""
    engine = catalog.connect(f"sqlite:///{tmp_path}/catalog.db")
    now = int(time.time())
    with engine.begin() as conn:
        catalog.add_object(conn, KEY, "1" * 64, 100, True)
        catalog.add_object(conn, FORGED, "2" * 64, 200, False)
        catalog.add_object(conn, FORGED, "3" * 64, 300)
        catalog.add_object(conn, LONE, "4" * 64, 400, True)
        _crash(conn, "a1", "a", now - 30, {KEY: "1" * 64, FORGED: "2" * 64})
        _crash(conn, "b1", "b", now - 20, {KEY: "1" * 64, FORGED: "3" * 64})
        _crash(conn, "c1", "c", now - 10, {FORGED: "2" * 64})
    return engine


READERS = [None, frozenset(), frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"}), frozenset("abc")]


def test_lookups_answer_as_sqlalchemy_for_every_reader(engine: sa.Engine) -> None:
    prepared = Prepared(engine)
    try:
        with engine.connect() as conn:
            for key, visible, crash_id in itertools.product(
                (KEY, FORGED, LONE, "ff" * 20), READERS, (None, "a1", "b1", "c1", "nope")
            ):
                want = catalog.object_for(conn, key, visible, crash_id)
                assert catalog.object_for(prepared, key, visible, crash_id) == want, (key, visible, crash_id)
            for crash_id in ("a1", "b1", "nope"):
                assert catalog.core_of(prepared, crash_id) == catalog.core_of(conn, crash_id)
        # the cases that matter, spelled out: a reader of b gets b's own content of the forged
        # key, a reader of a and b the newest crash's; a Boolean reads as one
        assert catalog.object_for(prepared, FORGED, frozenset({"b"}))["sha256"] == "3" * 64  # type: ignore[index]
        assert catalog.object_for(prepared, FORGED, frozenset("ab"))["sha256"] == "3" * 64  # type: ignore[index]
        assert catalog.object_for(prepared, FORGED, frozenset("ab"), "a1")["sha256"] == "2" * 64  # type: ignore[index]
        assert catalog.object_for(prepared, KEY, frozenset({"c"})) is None
        assert catalog.object_for(prepared, LONE) is None  # held, but mapped by no crash
        assert catalog.object_for(prepared, KEY, None)["debuginfo"] is True  # type: ignore[index]
    finally:
        prepared.close()


def test_lookups_see_a_writers_commits_at_once(engine: sa.Engine) -> None:
    """A crash forgotten (or its namespace's last one) is gone for the very next lookup, a new one
    is there: the prepared connection holds no transaction between lookups."""
    prepared = Prepared(engine)
    try:
        b = frozenset({"b"})
        assert catalog.object_for(prepared, KEY, b) is not None
        assert catalog.core_of(prepared, "b1") is not None
        with engine.begin() as conn:
            catalog.forget(conn, "b1")
        assert catalog.object_for(prepared, KEY, b) is None
        assert catalog.core_of(prepared, "b1") is None
        with engine.begin() as conn:
            _crash(conn, "b2", "b", int(time.time()), {LONE: "4" * 64})
        assert catalog.object_for(prepared, LONE, b) is not None
        assert catalog.core_of(prepared, "b2") is not None
        # and a writer that needs the whole database to itself is not held back by it
        with engine.connect() as conn:
            busy, log, moved = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        assert busy == 0 and log == moved == 0
    finally:
        prepared.close()


class _Lowered(sa.TypeDecorator):
    """A parameter converted on its way to the database: lowercased."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        return value.lower() if value is not None else None


def test_a_statement_whose_values_are_converted_is_refused_not_run(engine: sa.Engine) -> None:
    """A parameter converted on its way to the database (here lowercased) would reach it
    unconverted by the prepared path: such a statement is refused, even when the first call's
    value would come through unchanged, and never answers wrongly."""
    o = tables.objects.c
    query = sa.select(o.key, o.sha256).where(
        o.key == sa.bindparam("k", type_=_Lowered()), o.size.in_(sa.bindparam("sizes", expanding=True))
    )
    with engine.connect() as conn:
        assert [r.key for r in conn.execute(query, {"k": KEY.upper(), "sizes": [100]})] == [KEY]
    prepared = Prepared(engine)
    try:
        for k in (KEY, KEY.upper()):
            with pytest.raises(Unprepared, match="parameters k are converted"):
                prepared.rows(query, {"k": k, "sizes": [100, 200, 300]})
    finally:
        prepared.close()


def test_a_reader_of_several_namespaces_gets_the_content_the_most_of_them_mapped(catalog_url: str) -> None:
    """By build-id alone (a debugger through DEBUGINFOD_URLS): a and c mapped the genuine file, b
    forged its build-id and crashed last; the genuine one is the answer, on SQLite and PostgreSQL.
    Among as many namespaces each, the newest crash's; a reader of b alone still gets b's own."""
    engine = catalog.connect(catalog_url)
    now = int(time.time())
    with engine.begin() as conn:
        catalog.add_object(conn, FORGED, "2" * 64, 200)
        catalog.add_object(conn, FORGED, "3" * 64, 300)
        _crash(conn, "a1", "a", now - 30, {FORGED: "2" * 64})
        _crash(conn, "c1", "c", now - 20, {FORGED: "2" * 64})
        _crash(conn, "b1", "b", now - 10, {FORGED: "3" * 64})
        _crash(conn, "b2", "b", now - 5, {FORGED: "3" * 64})
    with engine.connect() as conn:
        for visible in (None, frozenset("abc")):
            assert catalog.object_for(conn, FORGED, visible)["sha256"] == "2" * 64  # type: ignore[index]
        assert catalog.object_for(conn, FORGED, frozenset("ab"))["sha256"] == "3" * 64  # type: ignore[index]
        assert catalog.object_for(conn, FORGED, frozenset("b"))["sha256"] == "3" * 64  # type: ignore[index]
    engine.dispose()
