"""Fifty node agents racing into one PostgreSQL: every crash is a row once, and counted once.

Each agent is a process of its own with its own spool, engine and connection. 30 crashes
(a real core of a small process, with metadata of 6 namespaces and 3 crash groups) are
copied into the spools so that each crash sits in about 25 of them; all agents ship at once
through the agent's own shipping step, in batches of 8 (their rows in one transaction, so
overlapping batches race), then record the same analyses at once. Afterwards the catalog
holds each crash once (its search values and its namespace once), each group's
count is its number of crashes, and the per-namespace and per-day counts kept while
recording are those the catalog rebuilds from the rows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from corevault import config, spool
from corevault.agent import ship
from corevault.capture import stream
from corevault.vault import catalog, search
from corevault.vault.crashes import LocalVault
from testbed import gcore, servers

AGENTS, CRASHES, SIGNATURES = 50, 30, ["a1" * 8, "b2" * 8, "c3" * 8]
DAY = 20_000 * 86400


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """A real core of a small process, compressed as the capture handler does; (path, plain size)."""
    d = tmp_path_factory.mktemp("core")
    gcore.core_of(["sleep", "60"], str(d / "core"))
    fd = os.open(d / "core.zst", os.O_WRONLY | os.O_CREAT, 0o600)
    sink = stream.ZstdSink(fd, 3, 0, 1 << 40)
    src = os.open(d / "core", os.O_RDONLY)
    stream.pump(src, [sink], None)
    sink.finish()
    os.close(src)
    os.close(fd)
    return str(d / "core.zst"), sink.size


def meta_of(n: int, core: tuple[str, int]) -> dict:
    # afternoon times: a day number rounded instead of floored would show in the per-day counts
    return {
        "id": f"20261201T000000Z-{n:05d}-race", "time": DAY + (n % 3) * 86400 + 50_000 + n, "node": "node",
        "pod": {"namespace": f"ns-{n % 6}", "name": f"web-{n}", "container": "app", "image": f"img:{n % 2}"},
        "signal": {"number": 11, "name": "SIGSEGV"}, "process": {"exe": "/usr/bin/sleep"},
        "core": {"size": core[1], "stored_size": os.path.getsize(core[0])}, "modules": [],
    }  # fmt: skip


def agent(settings: config.Settings, start: object, out: object) -> None:
    vault = LocalVault(settings)
    entries = spool.entries(settings.spool_dir)
    start.wait()  # type: ignore[attr-defined]
    new = 0
    for at in range(0, len(entries), 8):  # in batches, as the agent's loop ships: rows of 8 at once
        batch = ship.ship_batch(vault, settings, entries[at : at + 8], 4)
        assert not batch.failed and not batch.busy
        new += sum(s.new for s in batch.shipped.values())
    recorded = 0
    for entry_id in entries:
        n = int(entry_id.split("-")[1])
        report = {"signature": SIGNATURES[n % 3], "title": f"SIGSEGV in f{n % 3}", "signal": {"name": "SIGSEGV"},
                  "backend": "gdb", "signature_frames": [f"f{n % 3}"]}  # fmt: skip
        with vault.engine.begin() as conn:
            recorded += catalog.record_analysis(conn, f"20261201T000000Z-{n:05d}-race", report)
    out.put((new, recorded))  # type: ignore[attr-defined]


def test_fifty_agents_shipping_the_same_crashes_make_each_row_once(
    postgres: servers.Postgres, core: tuple[str, int], tmp_path: Path
) -> None:
    url = postgres.database("race")
    catalog.connect(url).dispose()
    store = f"file://{tmp_path}/vault"
    rng = random.Random(16)  # noqa: S311 - which spools hold which crash, not a secret
    metas = [meta_of(n, core) for n in range(CRASHES)]
    settings = []
    for a in range(AGENTS):
        s = config.from_dict({"state_dir": str(tmp_path / f"node-{a}"), "vault": {"store": store, "catalog": url},
                              "agent": {"metrics": ""}})  # fmt: skip
        spool.ensure(s.spool_dir)
        for meta in rng.sample(metas, CRASHES // 2):
            entry = os.path.join(spool.ready_dir(s.spool_dir), meta["id"])
            os.makedirs(entry)
            os.link(core[0], os.path.join(entry, spool.CORE_NAME))
            with open(os.path.join(entry, spool.META_NAME), "w") as f:
                json.dump(meta, f)
        settings.append(s)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=agent, args=(s, start, out)) for s in settings]
    for p in procs:
        p.start()
    time.sleep(1)
    start.set()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(new for new, _ in results) == CRASHES  # each crash new to exactly one agent
    assert sum(recorded for _, recorded in results) == CRASHES  # and counted by exactly one

    engine = catalog.connect(url)
    with engine.begin() as conn:

        def rows(sql: str) -> list[tuple]:
            return sorted(tuple(r) for r in conn.execute(sa.text(sql)))

        assert rows("SELECT id FROM crashes") == sorted((m["id"],) for m in metas)
        pods = rows("SELECT value FROM search_values WHERE kind = 'pod'")
        assert pods == sorted((f"web-{n}",) for n in range(CRASHES))
        terms = (
            "SELECT kind, value, signature, namespace FROM group_terms JOIN search_values ON id = value_id"
        )
        # a pod per crash; per group and namespace (6 pairs) its image, executable, title and frame
        assert len(rows(terms)) == CRASHES + 6 * 4
        assert rows("SELECT name FROM namespaces") == [(f"ns-{i}",) for i in range(6)]
        assert rows("SELECT crash_id FROM reports") == sorted((m["id"],) for m in metas)
        assert rows("SELECT signature, count FROM crash_groups") == [(s, CRASHES // 3) for s in SIGNATURES]
        kept = rows("SELECT * FROM group_namespaces"), rows("SELECT * FROM group_days")
        assert sum(r[3] for r in kept[0]) == CRASHES and sum(r[3] for r in kept[1]) == CRASHES
        kept_terms = rows(terms)
        catalog.rebuild_group_counts(conn)
        search.rebuild(conn)
        assert (rows("SELECT * FROM group_namespaces"), rows("SELECT * FROM group_days")) == kept
        assert rows(terms) == kept_terms
    engine.dispose()


def test_a_state_form_from_one_server_is_taken_by_another_of_the_same_catalog(tmp_path: Path) -> None:
    import re

    import httpx

    from corevault.server.access import StaticTokens
    from corevault.server.app import create_app

    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    engine = catalog.connect(settings.catalog_url)
    with engine.begin() as conn:
        catalog.add_crash(conn, {"id": "c1", "time": int(time.time()), "pod": {"namespace": "a"}}, "pending")
        catalog.record_analysis(conn, "c1", {"signature": SIGNATURES[0], "title": "SIGSEGV in f0"})
    engine.dispose()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[token]]\nname = "a"\ntoken = "a-token-0123456789"\nnamespaces = ["a"]\nupdate = true\n'
    )
    tokens.chmod(0o600)
    with (
        servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as one,
        servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as other,
        httpx.Client() as browser,
    ):
        browser.post(f"{one}/login", data={"token": "a-token-0123456789"})
        page = browser.get(f"{one}/groups/{SIGNATURES[0]}").text
        [form_token] = set(re.findall(r'name="form_token" value="([0-9a-f]+)"', page))
        cookies = {k: v for k, v in browser.cookies.items()}
        posted = httpx.post(f"{other}/groups/{SIGNATURES[0]}/state", cookies=cookies,
                            data={"state": "ignored", "form_token": form_token})  # fmt: skip
        assert posted.status_code in (200, 303), posted.text
        state = httpx.get(
            f"{other}/api/v1/groups/{SIGNATURES[0]}", headers={"Authorization": "Bearer a-token-0123456789"}
        )
        assert state.json()["state"] == "ignored"
