"""The vault against real servers: SeaweedFS (S3) and PostgreSQL, and the faults that matter.

Spool entries are real: three crashes (two of one bug) captured once per module by the
installed handler, copied into each test's own node state. Every fault test ends with
every accepted core in the vault byte-identical, exactly once, or recorded as dropped.
The store's own faults (the agent killed mid-upload, the store down and back, two agents
racing, retention) run against every kind of store in tests/test_stores.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from corevault import config, spool
from corevault.agent.loop import Agent
from corevault.vault import blobs, catalog, retention, search, tables
from corevault.vault.crashes import LocalVault
from testbed import servers
from tests.conftest import installed_capture, starts_servers
from tests.nodes import CLI, Node, make_node

pytestmark = pytest.mark.crash


@pytest.fixture(scope="module")
def material(rootfs: str) -> Iterator[dict]:
    """Three real spool entries (segv twice, an uncaught C++ exception) and their binaries."""
    keep = tempfile.mkdtemp(prefix="cv-material-")
    with installed_capture() as cap:
        for args in (
            ["/app/crasher", "segv"],
            ["/app/crasher", "segv"],
            ["/bin/sh", "-c", "DB_PASSWORD=hunter2-secret-value /app/thrower; exit 1"],
        ):
            cap.crash(rootfs, args, annotations={"corevault.io/core-pattern": "/data/dump-a/core-%p-%t"})
        shutil.copytree(spool.ready_dir(cap.spool), os.path.join(keep, "ready"))
        shutil.copytree(cap.store, os.path.join(keep, "store"))
    yield {"dir": keep, "ids": sorted(os.listdir(os.path.join(keep, "ready")))}
    shutil.rmtree(keep, ignore_errors=True)


@pytest.fixture(scope="module")
@starts_servers
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Seaweed]:
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
    with servers.seaweed() as w:
        yield w
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_vault(s3: servers.Seaweed, pg: servers.Postgres | None, prefix: str) -> str:
    """Settings for a vault of its own: a prefix in the bucket, a database of the server."""
    catalog_line = f'catalog = "{pg.database(prefix)}"\n' if pg else ""
    return (
        f'[vault]\nstore = "s3://{s3.bucket}/{prefix}"\n{catalog_line}'
        f'[vault.s3]\nendpoint = "{s3.endpoint}"\naddressing = "path"\npart_size = "5M"\n'
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_vault_holds_spool_copies(node: Node, material: dict) -> None:
    store = node.vault().store
    for entry in material["ids"]:
        with open(os.path.join(material["dir"], "ready", entry, spool.CORE_NAME), "rb") as f:
            local = f.read()
        with store.open(blobs.core_key(entry)) as remote:
            assert sha(remote.read()) == sha(local), entry


def test_agent_ships_analyses_groups_and_empties_the_spool(material: dict) -> None:
    node = make_node(material)
    assert Agent(node.settings).run(once=True) == 0
    assert spool.entries(node.spool) == []
    rows = node.crashes()
    assert sorted(r["id"] for r in rows) == material["ids"]
    assert all(r["analysis"] == "done" and r["signature"] for r in rows)
    assert_vault_holds_spool_copies(node, material)
    with node.vault().engine.connect() as conn:
        groups = {g["title"]: g["count"] for g in catalog.list_groups(conn)}
        report = catalog.get_crash(conn, rows[0]["id"])["report"]
        held = conn.execute(sa.select(tables.objects.c.key, tables.objects.c.sha256)).all()
    assert groups == {"SIGSEGV in crash_here ← main": 2, "SIGABRT in parse_config ← main": 1}
    assert report["signature"] == rows[0]["signature"]
    store = node.vault().store
    assert len(held) == len(set(held)) and all(store.size(blobs.object_key(k, s)) for k, s in held)
    # Binaries are kept by key and content: the stored binary is the captured one.
    meta = json.loads(store.open(blobs.meta_key(rows[0]["id"])).read())
    exe = next(m for m in meta["modules"] if m["path"] == "/app/crasher" or m["path"] == "/app/thrower")
    with open(os.path.join(material["dir"], "store", "buildid", exe["key"], exe["sha256"]), "rb") as f:
        assert sha(store.open(blobs.object_key(exe["key"], exe["sha256"])).read()) == sha(f.read())


def test_agent_ships_to_s3_and_postgres(
    material: dict, s3: servers.Seaweed, postgres: servers.Postgres
) -> None:
    node = make_node(material, s3_vault(s3, postgres, "plain"))
    assert Agent(node.settings).run(once=True) == 0
    assert sorted(r["id"] for r in node.crashes()) == material["ids"]
    assert_vault_holds_spool_copies(node, material)


def test_shipping_again_changes_nothing(material: dict) -> None:
    node = make_node(material)
    vault = node.vault()
    for entry in material["ids"]:
        first = os.path.join(node.dir, "again", entry)
        shutil.copytree(os.path.join(spool.ready_dir(node.spool), entry), first)
    Agent(node.settings).run(once=True)
    for entry in material["ids"]:  # the same entries again, as after a kill before the spool removal
        shutil.copytree(
            os.path.join(node.dir, "again", entry), os.path.join(spool.ready_dir(node.spool), entry)
        )
    Agent(node.settings).run(once=True)
    assert len(node.crashes()) == 3
    with vault.engine.connect() as conn:
        assert sum(g["count"] for g in catalog.list_groups(conn)) == 3


def big_entry(node: Node, mib: int) -> str:
    """A spool entry whose stored core takes a while to upload (incompressible bytes)."""
    src = os.path.join(spool.ready_dir(node.spool), sorted(os.listdir(spool.ready_dir(node.spool)))[0])
    entry = spool.new_id(time.time(), 4242)
    dest = os.path.join(spool.ready_dir(node.spool), entry)
    os.makedirs(dest)
    with open(os.path.join(dest, spool.CORE_NAME), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    meta = json.load(open(os.path.join(src, spool.META_NAME)))  # noqa: SIM115
    meta["id"] = entry
    meta["core"]["stored_size"] = mib << 20
    with open(os.path.join(dest, spool.META_NAME), "w") as f:
        json.dump(meta, f)
    return entry


def spool_sha(node: Node, entry: str) -> str:
    with open(os.path.join(spool.ready_dir(node.spool), entry, spool.CORE_NAME), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stored_sha(node: Node, entry: str) -> str:
    h = hashlib.sha256()
    with node.vault().store.open(blobs.core_key(entry)) as remote:
        while chunk := remote.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def through_an_outage(node: Node, stop: Callable[[], None], start: Callable[[], None], after: float) -> None:
    """Run an agent, take a server away ``after`` seconds in for a while, wait for the spool to empty."""
    agent = node.agent()
    try:
        time.sleep(after)
        stop()
        time.sleep(3)  # an outage of "minutes", scaled down
        start()
        deadline = time.monotonic() + 180
        while spool.entries(node.spool) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)


def test_postgres_restart_under_load(material: dict, s3: servers.Seaweed, postgres: servers.Postgres) -> None:
    node = make_node(material, s3_vault(s3, postgres, "pgrestart"), "analyze = false\n")
    extra = [big_entry(node, 8) for _ in range(12)]
    through_an_outage(node, lambda: postgres.stop("fast"), postgres.start, after=0.5)
    ids = [r["id"] for r in node.crashes()]
    assert sorted(ids) == sorted(material["ids"] + extra) and len(ids) == len(set(ids))


def test_two_agents_race_on_one_spool_and_one_catalog(
    material: dict, s3: servers.Seaweed, postgres: servers.Postgres
) -> None:
    node = make_node(material, s3_vault(s3, postgres, "race"))
    extra = [big_entry(node, 2) for _ in range(10)]
    agents = [node.agent("--once") for _ in range(2)]
    for a in agents:
        a.wait(timeout=300)
    assert spool.entries(node.spool) == []
    ids = [r["id"] for r in node.crashes()]
    assert sorted(ids) == sorted(material["ids"] + extra) and len(ids) == len(set(ids))
    with node.vault().engine.connect() as conn:
        groups = {g["title"]: g["count"] for g in catalog.list_groups(conn)}
    assert groups["SIGSEGV in crash_here ← main"] == 2


def test_full_spool_disk_is_recorded_as_dropped(rootfs: str, tmp_path) -> None:
    """A crash whose spool copy cannot be written ends in the catalog as dropped, with why."""
    with installed_capture() as cap:
        mount = os.path.join(cap.dir, "tiny")
        os.makedirs(mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount], check=True)
        try:
            cap.configure(f'[paths]\nspool = "{mount}"\n[spool]\nkeep_free = "0"\n')
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            with open(os.path.join(mount, "filler"), "wb") as f:  # the disk fills up, but for 12 KiB
                f.write(b"x" * (free - (12 << 10)))
            cap.crash(
                rootfs,
                ["/app/crasher", "alloc", "4"],
                annotations={"corevault.io/core-pattern": "/data/dump-a/c"},
            )
            assert os.listdir(cap.volume) == ["c"]  # the pod's copy is not affected
            settings = config.load(cap.config)
            Agent(settings).run(once=True)
            with LocalVault(settings).engine.connect() as conn:
                dropped = catalog.list_dropped(conn)
        finally:
            subprocess.run(["umount", "-l", mount], check=False)
    assert any(d["event"] == "dropped" and "vault:" in (d["reason"] or "") for d in dropped), dropped


def test_retention_by_age_size_and_namespace_keeps_needed_binaries(material: dict) -> None:
    node = make_node(material)
    Agent(node.settings).run(once=True)
    vault = node.vault()
    rows = sorted(node.crashes(), key=lambda r: (r["time"], r["id"]))
    with vault.engine.connect() as conn:  # an upstream debug file fetched for each binary
        held = list(conn.execute(sa.select(tables.objects.c.key, tables.objects.c.sha256)))
    for key, sha in held:
        vault.store.put_file(blobs.debuginfo_key(key, sha), node.config)
    node.settings.retention_max_size = sum(r["size"] for r in rows) * 10  # nothing by size
    node.settings.retention_max_age_days = 1
    assert retention.vacuum(vault, node.settings, now=rows[-1]["time"] + 3600)["crashes"] == []
    gone = retention.vacuum(vault, node.settings, now=rows[-1]["time"] + 2 * 86400, dry_run=True)
    assert sorted(gone["crashes"]) == sorted(r["id"] for r in rows) and len(node.crashes()) == 3
    node.settings.retention_max_age_days = None
    with vault.engine.connect() as conn:
        stored = {
            r.id: r.stored_size
            for r in conn.execute(sa.select(tables.crashes.c.id, tables.crashes.c.stored_size))
        }
    newest = rows[-1]["id"]
    node.settings.retention_max_size = stored[newest]
    gone = retention.vacuum(vault, node.settings)
    assert sorted(gone["crashes"]) == sorted(r["id"] for r in rows[:-1])
    assert [r["id"] for r in node.crashes()] == [newest]
    assert vault.store.size(blobs.core_key(rows[0]["id"])) is None
    meta = json.loads(vault.store.open(blobs.meta_key(newest)).read())
    for m in meta["modules"]:  # the kept crash's binaries are all still there
        if m.get("sha256"):
            assert vault.store.size(blobs.object_key(m["key"], m["sha256"])) is not None
            assert vault.store.size(blobs.debuginfo_key(m["key"], m["sha256"])) is not None
    assert gone["buildids"]  # the other program's binary went with its crash, and its debug file
    for key, sha in (b.split("/") for b in gone["buildids"]):
        assert vault.store.size(blobs.debuginfo_key(key, sha)) is None
    v = search.search_values.c
    with vault.engine.connect() as conn:  # the search keeps nothing that only the forgotten crashes held
        held = set(conn.execute(sa.select(v.kind, v.value)))
        search.rebuild_terms(conn)
        assert held == set(conn.execute(sa.select(v.kind, v.value)))
        conn.rollback()
    assert ("exe", rows[0]["exe"]) not in held or rows[0]["exe"] == rows[-1]["exe"]


def test_agent_metrics(material: dict) -> None:
    node = make_node(material)
    port = servers.free_port()
    node.settings.agent_metrics = f"127.0.0.1:{port}"
    agent = Agent(node.settings)
    agent.metrics.serve(node.settings.agent_metrics)
    agent.run(once=True)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "corevault_crashes_shipped_total 3.0" in body
    assert "corevault_spool_entries 0.0" in body
    assert "corevault_upload_bytes_total" in body


def test_unreachable_vault_is_one_clear_error(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/s"\n[vault]\ncatalog = "postgresql+psycopg://x@127.0.0.1:1/none"\n'
    )
    out = subprocess.run([CLI, "-c", str(cfg), "vacuum"], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and out.stderr.startswith("corevault: error: cannot open the catalog")
    assert "Traceback" not in out.stderr and "\\x0a" not in out.stderr  # libpq's lines joined, not escaped
    assert "Connection refused Is the server running" in out.stderr


def test_analyze_a_crash_that_left_the_spool(material: dict) -> None:
    node = make_node(material)
    Agent(node.settings).run(once=True)
    crash = node.crashes()[0]
    out = subprocess.run(
        [CLI, "-c", node.config, "analyze", "--json", crash["id"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["signature"] == crash["signature"]


def test_agent_once_gives_up_on_an_unreachable_catalog_and_keeps_the_entries(material: dict) -> None:
    node = make_node(material, '[vault]\ncatalog = "postgresql+psycopg://corevault@127.0.0.1:1/none"\n')
    out = subprocess.run(  # an agent that kept retrying would raise TimeoutExpired
        [CLI, "-c", node.config, "agent", "--once"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 1
    assert "3 entries left in the spool: the vault is unreachable" in out.stderr
    assert spool.entries(node.spool) == material["ids"]


def test_a_postgresql_catalog_knows_a_new_crash_from_one_already_there(postgres: servers.Postgres) -> None:
    """INSERT's rowcount tells the two apart; without it a reader's namespaces stayed empty."""
    engine = catalog.connect(postgres.database("rowcount"))
    meta = {
        "id": "20261201T000000Z-1-rowcount",
        "time": 1796129797,
        "pod": {"namespace": "shop", "name": "p"},
    }
    with engine.begin() as conn:
        assert catalog.add_crash(conn, meta, "pending") is True
        assert catalog.add_crash(conn, meta, "pending") is False
        assert catalog.list_namespaces(conn) == ["shop"]
    engine.dispose()
