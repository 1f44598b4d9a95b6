"""One entry, or one journal line, the catalog will not take never stops the agent.

The catalog refuses one tenant's rows through a real constraint (a trigger that aborts the
insert); an entry of an older handler holds a surrogate in its executable's path (``meta.json``
written by hand, as handlers before the fix wrote it), and so does a line of the node's
journal; other journal lines are not records the catalog can take (not a JSON object, a pod
that is not one). The agent's passes must ship everything else, on SQLite and PostgreSQL, the
other tenant's crash from a real runc container among it, retry the refused entry with
backoff, then set it aside in the spool's ``quarantine/`` with its reason, where
``corevault status`` shows it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from corevault import config, spool
from corevault.agent import loop
from corevault.agent.loop import Agent
from corevault.vault import blobs, tables
from corevault.vault.crashes import LocalVault
from testbed import runc, servers
from tests.clirun import corevault
from tests.conftest import FIXTURE_SPOOL, Capture
from tests.tenants import node_of, pod

#: the constraint, per dialect: the catalog refuses every crash row of namespace "refused", and one journal line
REFUSE = {
    "sqlite": [
        "CREATE TRIGGER refuse_crash BEFORE INSERT ON crashes WHEN NEW.namespace = 'refused' "
        "BEGIN SELECT RAISE(ABORT, 'rows of namespace refused are refused'); END",
        "CREATE TRIGGER refuse_line BEFORE INSERT ON dropped WHEN NEW.reason = 'refuse me' "
        "BEGIN SELECT RAISE(ABORT, 'this journal line is refused'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_crash() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.namespace = 'refused' THEN RAISE EXCEPTION 'rows of namespace refused are refused' "
        "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$",
        "CREATE FUNCTION refuse_line() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.reason = 'refuse me' THEN RAISE EXCEPTION 'this journal line is refused' "
        "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER refuse_crash BEFORE INSERT ON crashes FOR EACH ROW EXECUTE FUNCTION refuse_crash()",
        "CREATE TRIGGER refuse_line BEFORE INSERT ON dropped FOR EACH ROW EXECUTE FUNCTION refuse_line()",
    ],
}
ODD = "/app/bin\udcff-crasher"  # the byte 0xff, as Python and older handlers carried it


def _config(tmp_path: Path, catalog_url: str | None = None) -> Path:
    cfg = tmp_path / "c.toml"
    vault = f'[vault]\ncatalog = "{catalog_url}"\n' if catalog_url else ""
    cfg.write_text(f'state_dir = "{tmp_path}/node"\n[agent]\nmetrics = ""\nanalyze = false\n{vault}')
    return cfg


def _refuse(settings: config.Settings) -> None:
    vault = LocalVault(settings)
    with vault.engine.begin() as conn:
        for statement in REFUSE[conn.dialect.name]:
            conn.exec_driver_sql(statement)
    vault.engine.dispose()


def _settings(tmp_path: Path, catalog_url: str) -> config.Settings:
    settings = config.load(str(_config(tmp_path, catalog_url)))
    spool.ensure(settings.spool_dir)
    _refuse(settings)
    return settings


def _old_entry(settings: config.Settings, source: str, entry_id: str, **changes: object) -> None:
    """A copy of a checked-in entry, its metadata changed as an older handler could have written it."""
    dest = os.path.join(spool.ready_dir(settings.spool_dir), entry_id)
    shutil.copytree(os.path.join(spool.ready_dir(FIXTURE_SPOOL), source), dest)
    meta = spool.read_meta(settings.spool_dir, entry_id)
    meta["id"] = entry_id
    for key, value in changes.items():
        part, field = key.split("__")
        meta[part][field] = value
    with open(os.path.join(dest, spool.META_NAME), "w") as f:
        json.dump(meta, f)  # escapes the surrogate as \udcff, which reads back as one


def _journal(settings: config.Settings, *records: dict) -> None:
    with open(os.path.join(settings.spool_dir, spool.JOURNAL_NAME), "w") as f:
        for r in records:
            f.write(json.dumps({"time": 1.0, "node": "n", **r}) + "\n")


def _passes(agent: Agent, n: int) -> None:
    for _ in range(n):
        agent.pass_once()


def _crashes(settings: config.Settings) -> dict[str, str]:
    with LocalVault(settings).engine.connect() as conn:
        return dict(conn.execute(sa.select(tables.crashes.c.id, tables.crashes.c.exe)).all())


def test_a_refused_entry_is_retried_then_set_aside_and_the_rest_ships(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "MAX_BACKOFF", 0.0)  # every retry due at once: no waiting in a test
    settings = _settings(tmp_path, catalog_url)
    first, second = spool.entries(FIXTURE_SPOOL)
    _old_entry(settings, first, "20200101T000000Z-1-00000001", pod__namespace="refused")
    _old_entry(settings, first, "20200101T000000Z-2-00000002", process__exe=ODD)
    _old_entry(settings, second, "20200101T000000Z-3-00000003")
    _journal(
        settings,
        {"event": "refused", "reason": "rlimit", "exe": ODD, "pod": {"namespace": "shop"}},
        {"event": "dropped", "reason": "refuse me"},
        {"event": "dropped", "reason": "no room"},
        {"event": "dropped", "reason": "a pod that is not an object", "pod": "web-0"},
    )
    with open(os.path.join(settings.spool_dir, spool.JOURNAL_NAME), "a") as f:
        f.write('["not", "a", "record"]\n')
    agent = Agent(settings)

    _passes(agent, loop.QUARANTINE_AFTER - 1)
    # the others of the batch and the journal's good lines landed at the first pass
    assert _crashes(settings) == {
        "20200101T000000Z-2-00000002": "/app/bin\ufffd-crasher",
        "20200101T000000Z-3-00000003": "/app/libuser",
    }
    with LocalVault(settings).engine.connect() as conn:
        lines = conn.execute(sa.select(tables.dropped.c.reason, tables.dropped.c.exe)).all()
    assert sorted(map(tuple, lines)) == [("no room", None), ("rlimit", "/app/bin\ufffd-crasher")]
    # the metadata blob keeps the path as the handler wrote it
    with LocalVault(settings).store.open(blobs.meta_key("20200101T000000Z-2-00000002")) as f:
        assert json.load(f)["process"]["exe"] == ODD
    # the refused entry is retried until its last chance, the refused line set aside
    assert spool.entries(settings.spool_dir) == ["20200101T000000Z-1-00000001"]
    assert agent.metrics.failures._value.get() == loop.QUARANTINE_AFTER - 1
    aside = (tmp_path / "node" / "spool" / "quarantine" / spool.JOURNAL_NAME).read_text().splitlines()
    assert [json.loads(line)["record"] for line in aside] == [
        ["not", "a", "record"],
        {"event": "dropped", "reason": "refuse me", "time": 1.0, "node": "n"},
        {
            "event": "dropped",
            "reason": "a pod that is not an object",
            "pod": "web-0",
            "time": 1.0,
            "node": "n",
        },
    ]
    assert "this journal line is refused" in json.loads(aside[1])["reason"]

    _passes(agent, 1)
    assert spool.entries(settings.spool_dir) == []
    [(entry, why)] = spool.quarantined(settings.spool_dir)
    assert entry == "20200101T000000Z-1-00000001"
    assert "rows of namespace refused are refused" in why and "\n" not in why, why
    held = os.listdir(os.path.join(spool.quarantine_dir(settings.spool_dir), "20200101T000000Z-1-00000001"))
    assert {spool.CORE_NAME, spool.META_NAME, spool.REASON_NAME} <= set(held)  # kept whole
    assert agent.metrics.quarantined._value.get() == 4  # the entry and three journal lines
    assert agent.metrics.errors._value.get() == loop.QUARANTINE_AFTER + 3
    _passes(agent, 2)  # set aside: no longer tried
    assert agent.metrics.failures._value.get() == loop.QUARANTINE_AFTER

    out = corevault("--config", str(tmp_path / "c.toml"), "status", "--json")
    assert json.loads(out.stdout)["quarantined"] == [{"id": "20200101T000000Z-1-00000001", "reason": why}]


@pytest.mark.servers
def test_a_catalog_refusing_every_entry_sets_none_aside(
    tmp_path: Path, postgres: servers.Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog of another schema (a column renamed, as a half-done upgrade leaves it) refuses
    every row for a reason that is not the rows': the entries wait, none is set aside, and they
    ship once the catalog is right again."""
    monkeypatch.setattr(loop, "MAX_BACKOFF", 0.0)
    settings = config.load(str(_config(tmp_path, postgres.database("quarantine_schema"))))
    spool.ensure(settings.spool_dir)
    first, second = spool.entries(FIXTURE_SPOOL)
    _old_entry(settings, first, "20200101T000000Z-1-00000001")
    _old_entry(settings, second, "20200101T000000Z-2-00000002")
    vault = LocalVault(settings)
    with vault.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE crashes RENAME COLUMN exe TO exe_renamed")
    agent = Agent(settings)
    _passes(agent, loop.QUARANTINE_AFTER + 2)
    assert spool.quarantined(settings.spool_dir) == []
    assert len(spool.entries(settings.spool_dir)) == 2
    assert agent.metrics.quarantined._value.get() == 0
    with vault.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE crashes RENAME COLUMN exe_renamed TO exe")
    vault.engine.dispose()
    _passes(agent, 1)
    assert spool.entries(settings.spool_dir) == []
    assert set(_crashes(settings)) == {"20200101T000000Z-1-00000001", "20200101T000000Z-2-00000002"}


@pytest.mark.crash
def test_a_refused_tenants_entry_never_keeps_another_tenants_crash_out(
    capture: Capture, programs: dict[str, str], tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(loop, "MAX_BACKOFF", 0.0)
    root = runc.build_rootfs(str(tmp_path / "root"), {"crasher": programs["crasher"]})
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("refused", "a-0"))
    capture.crash(root, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
    assert len(capture.entries()) == 2, capture.journal()
    settings = node_of(capture, str(_config(tmp_path)))
    _refuse(settings)
    _journal(settings, {"event": "refused", "reason": "rlimit", "exe": ODD, "pod": {"namespace": "refused"}})

    agent = Agent(settings)
    _passes(agent, 1)
    with LocalVault(settings).engine.connect() as conn:
        rows = conn.execute(sa.select(tables.crashes.c.namespace)).scalars().all()
        lines = conn.execute(sa.select(tables.dropped.c.exe)).scalars().all()
    assert rows == ["tenant-b"]
    assert lines == ["/app/bin\ufffd-crasher"]
    assert len(spool.entries(settings.spool_dir)) == 1  # the refused one, retried
    _passes(agent, loop.QUARANTINE_AFTER - 1)
    assert spool.entries(settings.spool_dir) == []
    [(_, why)] = spool.quarantined(settings.spool_dir)
    assert "rows of namespace refused are refused" in why
