"""Matching a crash to its group's samples, on SQLite and a real PostgreSQL: what it decides, and
that it reads what the decision needs and never the matched crashes of a crash loop, however long.

The crashes are recorded through the catalog's own functions (the loop's matched ones in bulk,
as the agent's record of a match leaves them); tests/test_matching.py crashes real pods.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from corevault.vault import catalog, tables
from tests.conftest import catalog_at
from tests.triage_data import report

FP = "0123456789abcdef" * 2
_ids = itertools.count(1)


def _meta(namespace: str, exe: str, fingerprint: str) -> dict:
    n = next(_ids)
    return {
        "id": f"c{n:07d}", "time": 1_700_000_000 + n, "node": "node-1",
        "pod": {"namespace": namespace, "name": "web-1", "container": "app", "image": "registry.example/web:1"},
        "process": {"exe": exe, "comm": "svc", "ns_pid": 7}, "signal": {"number": 6, "name": "SIGABRT"},
        "core": {"size": 4096, "stored_size": 512}, "fingerprint": fingerprint, "version": 2,
    }  # fmt: skip


def _crash(
    engine: sa.Engine, signature: str | None = None, *, namespace: str = "shop", exe: str = "/app/svc",
    fingerprint: str = FP,
) -> str:  # fmt: skip
    """A crash with ``fingerprint``, analysed in full into ``signature`` (None: still pending)."""
    meta = _meta(namespace, exe, fingerprint)
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "pending")
        if signature is not None:
            catalog.record_analysis(
                conn, meta["id"], report(signature, [f"{signature}_top", "main"], "SIGABRT")
            )
    return meta["id"]


def _loop(engine: sa.Engine, n: int, signature: str, sample: str) -> None:
    """``n`` crashes of the loop, matched to ``sample``, and ``n`` more still waiting for analysis."""
    metas = [_meta("shop", "/app/svc", FP) for _ in range(2 * n)]
    with engine.begin() as conn:
        catalog.add_crashes(conn, metas, "pending")
        c = tables.crashes.c
        matched = [m["id"] for m in metas[:n]]
        conn.execute(
            tables.crashes.update()
            .where(c.id.in_(matched))
            .values(analysis="done", matched=True, signature=signature, title=f"matched to {sample}")
        )
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE crashes")  # as autovacuum would after such a loop


def _work(conn: sa.Connection) -> Callable[[], int]:
    """A counter of what the connection's statements read from now on: SQLite's virtual machine
    instructions, or the crashes PostgreSQL read (by a scan of the table or through an index)."""
    if conn.dialect.name == "sqlite":
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        conn.connection.driver_connection.set_progress_handler(step, 1)  # type: ignore[union-attr]
        return lambda: steps[0]
    read = sa.text(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
        "WHERE relname = 'crashes'"
    )
    start = conn.execute(read).scalar_one()
    return lambda: conn.execute(read).scalar_one() - start


def test_a_crash_is_matched_once_enough_full_analyses_of_its_fingerprint_agree(engine: sa.Engine) -> None:
    first, second = _crash(engine, "sigA"), _crash(engine, "sigA")
    crash = _crash(engine)
    with engine.connect() as conn:
        assert catalog.match_sample(conn, crash, 3) is None  # two samples of three
        assert catalog.match_sample(conn, crash, 2) == (FP, second, 2)
    third = _crash(engine, "sigA")
    _crash(engine, "sigA", namespace="other")  # another namespace's: never counted
    _crash(engine, "sigA", exe="/app/other")  # another executable's
    _crash(engine, "sigB", fingerprint="f" * 32)  # another fingerprint's
    with engine.connect() as conn:
        match = catalog.match_sample(conn, crash, 3, enough=20)
        assert match == (FP, third, 3), "the newest sample, and every agreeing one counted up to enough"
        assert catalog.match_sample(conn, crash, 2, enough=2) == (FP, third, 2)
        assert catalog.match_sample(conn, crash, 3, enough=1) == (FP, third, 3)  # never fewer than needed
    _loop(engine, 5, "sigA", third)
    with engine.connect() as conn:
        assert catalog.match_sample(conn, crash, 4) is None, "a matched crash was taken for a sample"
    assert first


def test_one_full_analysis_that_disagrees_keeps_its_fingerprint_from_being_matched(engine: sa.Engine) -> None:
    _crash(engine, "sigB")
    for _ in range(4):
        _crash(engine, "sigA")
    crash = _crash(engine)
    with engine.connect() as conn:
        assert catalog.match_sample(conn, crash, 3, enough=3) is None


@pytest.mark.parametrize("loop", [2000])
def test_matching_reads_as_much_at_a_loops_thousandth_crash_as_at_its_first(
    engine: sa.Engine, loop: int
) -> None:
    samples = [_crash(engine, "sigA") for _ in range(3)]
    _loop(engine, 3, "sigA", samples[-1])
    crash = _crash(engine)

    def cost() -> int:
        with engine.begin() as conn:
            work = _work(conn)
            assert catalog.match_sample(conn, crash, 3, enough=20) == (FP, samples[-1], 3)
            return work()

    short = cost()
    _loop(engine, loop, "sigA", samples[-1])
    long = cost()
    # the statements' instructions, or rows, grow with the index's depth at most: counting every
    # crash of the fingerprint read the loop's thousands of matched and waiting crashes
    assert long <= short + 50, (short, long)


def test_version_13_indexes_an_older_catalogs_full_analyses_in_place_of_its_fingerprints(
    catalog_url: str,
) -> None:
    old = catalog_at(catalog_url, 12)
    with old.begin() as conn:  # version 1 made today's table: take it back to what 12 had
        conn.exec_driver_sql("DROP INDEX crashes_full_analyses")
        assert "crashes_namespace_fingerprint" in {i["name"] for i in sa.inspect(conn).get_indexes("crashes")}
    samples = [_crash(old, "sigA") for _ in range(3)]
    crash = _crash(old)
    old.dispose()

    engine = catalog.connect(catalog_url)
    with engine.connect() as conn:
        indexes = {i["name"]: i["column_names"] for i in sa.inspect(conn).get_indexes("crashes")}
        assert catalog.match_sample(conn, crash, 3) == (FP, samples[-1], 3)
    assert indexes["crashes_full_analyses"] == list(tables.FULL_ANALYSES)
    assert "crashes_namespace_fingerprint" not in indexes
