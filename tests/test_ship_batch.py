"""Shipping in batches: the rows of many entries in one transaction, as one at a time would make them.

On SQLite and on a real PostgreSQL (where the rows go by COPY through a staging table): a
batch records exactly what one crash at a time records; an entry that fails (its upload, or
rows the database refuses) stays in the spool to be retried while the rest of its batch
lands; and an agent SIGKILLed in the middle of a batch, before or after its commit, leaves
nothing that shipping again would count twice or lose.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from corevault import config, spool
from corevault.agent import ship
from corevault.agent.loop import Agent
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault
from testbed import servers
from tests import test_fleet

DAY = 20_000 * 86400
core = test_fleet.core  # the fixture: a real core of a small process, compressed as the handler does


def meta_of(n: int, spooled: tuple[str, int] | None = None) -> dict:
    meta = {
        "id": f"20261201T000000Z-{n:05d}-batch", "time": DAY + n * 3600, "node": "node-1",
        "pod": {"namespace": f"ns-{n % 3}", "name": f"web-{n}", "container": "app", "image": f"img:{n % 2}"},
        "signal": {"number": 11, "name": "SIGSEGV"}, "process": {"exe": f"/usr/bin/svc-{n % 4}", "comm": "svc"},
        "modules": [{"path": "/usr/lib/libc.so.6", "key": "ab" * 20, "sha256": "cd" * 32, "build_id": "ab" * 20}],
    }  # fmt: skip
    if spooled is not None:
        meta["core"] = {"size": spooled[1], "stored_size": os.path.getsize(spooled[0])}
    return meta


def tables(url: str) -> dict[str, list[tuple]]:
    """What the catalog holds of its crashes: rows, search values, namespaces, mapped objects."""
    engine = catalog.connect(url)
    try:
        with engine.connect() as conn:
            read = lambda sql: sorted(tuple(r) for r in conn.execute(sa.text(sql)))  # noqa: E731
            return {
                "crashes": read("SELECT * FROM crashes"),
                "search": read("SELECT kind, value FROM search_values"),
                "namespaces": read("SELECT name FROM namespaces"),
                "objects": read("SELECT * FROM crash_objects"),
            }
    finally:
        engine.dispose()


def pods(rows: dict[str, list[tuple]]) -> list[str]:
    """The pods in the search values, in their crashes' order."""
    return sorted((v for k, v in rows["search"] if k == "pod"), key=lambda p: int(p.split("-")[1]))


def test_a_batch_records_what_one_crash_at_a_time_records(new_catalog: Callable[[str], str]) -> None:
    metas = [meta_of(n) for n in range(12)]
    catalog_url, one_url = new_catalog("batched"), new_catalog("single")
    engines = catalog.connect(catalog_url), catalog.connect(one_url)
    with engines[0].begin() as conn:
        assert catalog.add_crashes(conn, metas[:3], "off") == {m["id"] for m in metas[:3]}
    with engines[0].begin() as conn:  # three there already, one twice in the batch
        assert catalog.add_crashes(conn, [*metas, metas[7]], "off") == {m["id"] for m in metas[3:]}
    with engines[1].begin() as conn:
        assert [catalog.add_crash(conn, m, "off") for m in metas] == [True] * 12
        assert catalog.add_crash(conn, metas[0], "off") is False
    for e in engines:
        e.dispose()
    batched, single = tables(catalog_url), tables(one_url)
    assert batched == single
    assert len(batched["crashes"]) == len(batched["objects"]) == 12
    assert pods(batched) == [f"web-{n}" for n in range(12)]
    assert batched["namespaces"] == [("ns-0",), ("ns-1",), ("ns-2",)]


def node(
    tmp_path: Path, url: str, spooled: tuple[str, int], count: int, name: str = "node"
) -> config.Settings:
    settings = config.from_dict({
        "state_dir": str(tmp_path / name), "vault": {"store": f"file://{tmp_path}/vault", "catalog": url},
        "agent": {"metrics": "", "analyze": False, "ship_batch": 16, "ship_parallel": 4},
    })  # fmt: skip
    spool.ensure(settings.spool_dir)
    for n in range(count):
        put_entry(settings, meta_of(n, spooled), spooled[0])
    return settings


def put_entry(settings: config.Settings, meta: dict, core_path: str) -> None:
    entry = os.path.join(spool.ready_dir(settings.spool_dir), meta["id"])
    os.makedirs(entry)
    os.link(core_path, os.path.join(entry, spool.CORE_NAME))
    with open(os.path.join(entry, spool.META_NAME), "w") as f:
        json.dump(meta, f)


def test_one_bad_entry_never_keeps_the_rest_of_its_batch_out(
    catalog_url: str, core: tuple[str, int], tmp_path: Path
) -> None:
    settings = node(tmp_path, catalog_url, core, 8)
    cut = meta_of(8, core)
    cut["core"]["stored_size"] += 1  # the spool's core is not what its record says: refused by the store step
    refused = meta_of(9, core)
    refused["time"] = 1 << 70  # past any integer column: refused by the database, in the batch's transaction
    for meta in (cut, refused):
        put_entry(settings, meta, core[0])
    agent = Agent(settings)
    assert agent.pass_once() == 2
    left = spool.entries(settings.spool_dir)
    assert left == [cut["id"], refused["id"]]
    assert set(agent.backoff) == set(left)  # each retried later, on its own
    rows = tables(catalog_url)
    assert [r[0] for r in rows["crashes"]] == [meta_of(n)["id"] for n in range(8)]
    assert pods(rows) == [f"web-{n}" for n in range(8)]
    vault = LocalVault(settings)
    for n in range(8):
        assert vault.store.size(f"crashes/{meta_of(n)['id']}/core.zst") == os.path.getsize(core[0])
    vault.engine.dispose()


def _killed_mid_batch(settings: config.Settings, when: str) -> None:
    """Ship the spool in one batch and be SIGKILLed: inside the transaction, after the commit
    once three entries have left the spool, or in the middle of removing the first one."""
    finished: list[str] = []
    if when == "before commit":
        real = catalog.add_crashes

        def add_then_die(*args: object, **kwargs: object) -> set[str]:
            real(*args, **kwargs)  # type: ignore[arg-type]
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("not reached")

        catalog.add_crashes = add_then_die  # type: ignore[assignment]
    elif when == "mid removal":

        def remove_core_then_die(path: str) -> None:  # the first removal, cut short
            os.unlink(os.path.join(path, spool.CORE_NAME))
            os.kill(os.getpid(), signal.SIGKILL)

        ship.shutil.rmtree = remove_core_then_die  # type: ignore[assignment]
    else:
        real_finish = ship._finish

        def finish_then_die(*args: object) -> None:
            if len(finished) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real_finish(*args)  # type: ignore[arg-type]
            finished.append(str(args[1]))

        ship._finish = finish_then_die  # type: ignore[assignment]
    vault = LocalVault(settings)
    ship.ship_batch(vault, settings, spool.entries(settings.spool_dir), settings.agent_ship_parallel)


@pytest.mark.parametrize("when", ["before commit", "after commit", "mid removal"])
def test_an_agent_killed_mid_batch_ships_it_again_without_duplicates(
    catalog_url: str, core: tuple[str, int], tmp_path: Path, when: str
) -> None:
    settings = node(tmp_path, catalog_url, core, 10)
    catalog.connect(catalog_url).dispose()  # the schema, made before the child forks
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_batch, args=(settings, when))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    committed = len(tables(catalog_url)["crashes"])
    assert committed == (0 if when == "before commit" else 10)
    left = {"before commit": 10, "after commit": 7, "mid removal": 9}[when]
    assert len(spool.entries(settings.spool_dir)) == left

    ship.clean_abandoned(settings)
    vault = LocalVault(settings)
    again = ship.ship_batch(vault, settings, spool.entries(settings.spool_dir), 4)
    vault.engine.dispose()
    assert not again.failed
    assert sum(s.new for s in again.shipped.values()) == 10 - committed  # nothing counted twice
    assert os.listdir(spool.ready_dir(settings.spool_dir)) == []  # no entry, nor what is left of one
    rows = tables(catalog_url)
    assert [r[0] for r in rows["crashes"]] == [meta_of(n)["id"] for n in range(10)]
    assert len(rows["objects"]) == 10
    assert pods(rows) == [f"web-{n}" for n in range(10)]
    assert rows["namespaces"] == [("ns-0",), ("ns-1",), ("ns-2",)]


@pytest.mark.servers
def test_without_the_temp_privilege_a_batch_is_recorded_one_entry_at_a_time(
    postgres: servers.Postgres, core: tuple[str, int], tmp_path: Path
) -> None:
    url = postgres.database("notemp")
    catalog.connect(url).dispose()
    admin = sa.create_engine(url.replace("corevault@", "postgres@"))
    with admin.begin() as conn:  # the staging table cannot be made: the batch's transaction fails
        conn.exec_driver_sql("REVOKE TEMP ON DATABASE notemp FROM PUBLIC, corevault")
    admin.dispose()
    settings = node(tmp_path, url, core, 6)
    vault = LocalVault(settings)
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), vault.engine.begin() as conn:
        catalog.add_crashes(conn, [meta_of(n) for n in range(6)], "off")
    batch = ship.ship_batch(vault, settings, spool.entries(settings.spool_dir), 4)
    vault.engine.dispose()
    assert sorted(batch.shipped) == [meta_of(n)["id"] for n in range(6)] and not batch.failed
    assert [r[0] for r in tables(url)["crashes"]] == [meta_of(n)["id"] for n in range(6)]
