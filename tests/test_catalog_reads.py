"""The catalog's read side over the checked-in crashes (``fixture_vault``): lists, filters,
pages, groups and one crash's record, as the agent recorded them. No root, no crash."""

from __future__ import annotations

import pytest

from corevault.vault import catalog
from tests.conftest import FixtureVault


@pytest.fixture
def conn(fixture_vault: FixtureVault):  # type: ignore[no-untyped-def]
    with fixture_vault.node.vault().engine.connect() as c:
        yield c


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_crashes_newest_first_in_pages(conn, fixture_vault: FixtureVault) -> None:  # type: ignore[no-untyped-def]
    ids = fixture_vault.ids
    everything = catalog.list_crashes(conn)
    assert _ids(everything) == [ids["host"], ids["b-lib"], ids["b"], ids["a"]]
    first = catalog.list_crashes(conn, limit=3)
    rest = catalog.list_crashes(conn, limit=3, before=(first[-1]["time"], first[-1]["id"]))
    assert _ids(first + rest) == _ids(everything) and len(rest) == 1


@pytest.mark.parametrize(
    ("filters", "names"),
    [
        (catalog.Filters(signal="segv"), ["b-lib"]),
        (catalog.Filters(signal="SIGFPE"), ["host", "b", "a"]),
        (catalog.Filters(signal="8"), ["host", "b", "a"]),
        (catalog.Filters(signal="abrt"), []),
        (catalog.Filters(exe="/app/libuser"), ["b-lib"]),
        (catalog.Filters(namespace="b"), ["b-lib", "b"]),
        (catalog.Filters(namespace="nope"), []),
        (catalog.Filters(pod="web-a-1"), ["a"]),
        (catalog.Filters(image="registry.example/web:1"), ["b", "a"]),
        (catalog.Filters(container="parser"), ["b-lib"]),
        (catalog.Filters(visible=frozenset({"a"})), ["a"]),  # a reader of a: not b's, not the host's
        (catalog.Filters(visible=frozenset()), []),
        (catalog.Filters(search="crashy_parse"), ["b-lib"]),
        (catalog.Filters(search="divide", visible=frozenset({"b"})), ["b"]),
    ],
)
def test_filters(conn, fixture_vault: FixtureVault, filters: catalog.Filters, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert _ids(catalog.list_crashes(conn, filters)) == [fixture_vault.ids[n] for n in names]


def test_time_filters(conn, fixture_vault: FixtureVault) -> None:  # type: ignore[no-untyped-def]
    b_lib = catalog.get_crash(conn, fixture_vault.ids["b-lib"])
    assert b_lib is not None
    since = _ids(catalog.list_crashes(conn, catalog.Filters(since=b_lib["time"])))
    until = _ids(catalog.list_crashes(conn, catalog.Filters(until=b_lib["time"] - 1)))
    assert since == [fixture_vault.ids["host"], fixture_vault.ids["b-lib"]]
    assert until == [fixture_vault.ids["b"], fixture_vault.ids["a"]]


def test_groups_count_what_each_reader_may_see(conn, fixture_vault: FixtureVault) -> None:  # type: ignore[no-untyped-def]
    groups = {g["title"]: g for g in catalog.list_groups(conn)}
    assert {t: g["count"] for t, g in groups.items()} == {
        "SIGFPE in divide ← main": 3,
        "SIGSEGV in crashy_parse ← crashy_entry": 1,
    }
    fpe = groups["SIGFPE in divide ← main"]["signature"]
    assert _ids(catalog.list_crashes(conn, catalog.Filters(group=fpe))) == [
        fixture_vault.ids[n] for n in ("host", "b", "a")
    ]
    only_a = catalog.list_groups(conn, visible=frozenset({"a"}))
    assert [(g["title"], g["count"]) for g in only_a] == [("SIGFPE in divide ← main", 1)]
    assert catalog.list_namespaces(conn) == ["a", "b"]


def test_one_crash_has_its_record_report_and_binaries(conn, fixture_vault: FixtureVault) -> None:  # type: ignore[no-untyped-def]
    crash = catalog.get_crash(conn, fixture_vault.ids["b-lib"])
    assert crash is not None and crash["analysis"] == "done"
    assert (crash["namespace"], crash["pod"], crash["container"], crash["image"]) == (
        "b", "parser-b-1", "parser", "registry.example/parser:2",
    )  # fmt: skip
    assert crash["exe"] == "/app/libuser" and crash["signal_name"] == "SIGSEGV"
    report = crash["report"]
    assert (
        report["signature"] == crash["signature"]
        and report["title"] == "SIGSEGV in crashy_parse ← crashy_entry"
    )
    frames = [f["function"] for f in report["threads"][0]["frames"]]
    assert frames[:3] == ["crashy_parse", "crashy_entry", "main"]
    assert crash["meta"]["process"]["environ"]["DB_PASSWORD"] == "REDACTED"
    held = catalog.known_objects(conn, [(m["key"], m["sha256"]) for m in crash["meta"]["modules"]])
    names = {
        m["path"].rsplit("/", 1)[-1] for m in crash["meta"]["modules"] if (m["key"], m["sha256"]) in held
    }
    assert names == {"libuser", "libcrashy.so", "ld-linux-x86-64.so.2"}  # the C library is not in the fixture
    assert catalog.get_crash(conn, "no-such-crash") is None
