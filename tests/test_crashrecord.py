"""The crash record: every version reads in one shape, an unversioned spool entry still ships, and
the API's schema shows the record's fields. Root-free: the entry is written the way the first
handlers wrote it, and shipped, served and shown by the real agent code, server and CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import zstandard

from corevault import config, crashrecord, spool
from corevault.agent import ship
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault.crashes import LocalVault
from testbed import servers
from tests.clirun import corevault

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
TOKEN = "record-admin-token"
ENTRY = "20250101T000000Z-4242-0a1b2c3d"
CORE = b"\x7fELF" + bytes(4096)


def unversioned_meta() -> dict:
    """A spool entry's metadata as the first handler wrote it: no version, no environ, no RSS,
    modules without go_build_id, no snapshot."""
    return {
        "id": ENTRY, "node": "node-old", "time": 1735689600, "captured_at": 1735689600.5,
        "handler_seconds": 0.02,
        "signal": {"number": 11, "name": "SIGSEGV"},
        "process": {
            "pid": 4242, "ns_pid": 1, "tid": 4242, "ns_tid": 1, "uid": 0, "gid": 0, "fsuid": 0, "fsgid": 0,
            "comm": "crasher", "exe": "/app/crasher", "cmdline": ["/app/crasher", "segv"],
            "hostname": "pod", "dump_mode": 1, "rlimit_core": None, "cpu": 0,
        },
        "pod": {"namespace": "shop", "name": "cart-1", "uid": "uid-cart-1", "container": "cart",
                "container_id": "c0ffee" * 10, "image": "registry.example/cart:1", "source": "oci"},
        "cgroup": "/kubepods/burstable/poduid-cart-1/c0ffee",
        "core": {"size": len(CORE), "truncated": False, "limit": None, "limit_source": None,
                 "sha256": hashlib.sha256(CORE).hexdigest(), "compression": "zstd", "file": spool.CORE_NAME},
        "volume": {"pattern": "/data/dump-a/core-%p", "path": "/data/dump-a/core-1", "written": True},
        "modules": [{"path": "/app/crasher", "start": 4194304, "end": 4210688, "build_id": "ab" * 20,
                     "key": "ab" * 20, "sha256": None, "size": None, "stored": "too large"}],
        "warnings": [],
        "problems": [],
    }  # fmt: skip


def test_an_unversioned_record_reads_in_the_current_shape() -> None:
    record = crashrecord.load(unversioned_meta())
    assert record["version"] == 1
    assert record["process"]["environ"] == {} and record["handler_max_rss_kib"] is None
    assert record["snapshot"] is None and record["modules"][0]["go_build_id"] is None
    assert record["pod"]["namespace"] == "shop" and record["core"]["stored_size"] == -1


def test_unknown_fields_are_kept_and_mistyped_ones_read_as_unknown() -> None:
    doc = unversioned_meta() | {"version": 9, "later": {"x": 1}}
    doc["process"] = {**doc["process"], "pid": "4242", "cmdline": "not a list"}
    doc["pod"] = "not a pod"
    doc["modules"] = [*doc["modules"], "not a module"]
    record = crashrecord.load(doc)
    assert record["version"] == 9 and record["later"] == {"x": 1}  # type: ignore[typeddict-item]
    assert record["process"]["pid"] == -1 and record["process"]["cmdline"] == []
    assert record["pod"]["namespace"] is None and len(record["modules"]) == 1


def test_a_record_without_an_id_takes_its_entrys() -> None:
    assert crashrecord.load({}, ENTRY)["id"] == ENTRY
    assert crashrecord.load("not a record", ENTRY)["pod"]["name"] is None


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[config.Settings, str, str]]:
    """An unversioned spool entry shipped by the agent's code into a local vault, and a server over it."""
    d = tmp_path_factory.mktemp("old-entry")
    cfg = d / "c.toml"
    cfg.write_text(f'state_dir = "{d}/state"\nnode_name = "node-now"\n[agent]\nanalyze = false\n')
    settings = config.load(str(cfg))
    spool.ensure(settings.spool_dir)
    entry = os.path.join(spool.ready_dir(settings.spool_dir), ENTRY)
    os.mkdir(entry)
    stored = zstandard.ZstdCompressor(write_checksum=True).compress(CORE)
    with open(os.path.join(entry, spool.CORE_NAME), "wb") as f:
        f.write(stored)
    meta = unversioned_meta()
    meta["core"]["stored_size"] = len(stored)
    with open(os.path.join(entry, spool.META_NAME), "w") as f:
        json.dump(meta, f)
    assert ship.ship_entry(LocalVault(settings), settings, ENTRY).new
    assert spool.entries(settings.spool_dir) == []
    tokens = d / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{TOKEN}"\nnamespaces = ["*"]\n')
    tokens.chmod(0o600)
    with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as url:
        yield settings, str(cfg), url


def api(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_an_unversioned_spool_entry_ships_and_is_served(shipped: tuple[config.Settings, str, str]) -> None:
    _, _, url = shipped
    [row] = api(url, "/api/v1/crashes").json()["items"]
    assert row["id"] == ENTRY and row["namespace"] == "shop" and row["signal_name"] == "SIGSEGV"
    assert row["size"] == len(CORE) and row["exe"] == "/app/crasher"
    crash = api(url, f"/api/v1/crashes/{ENTRY}")
    assert crash.status_code == 200, crash.text
    meta = crash.json()["meta"]
    assert meta["version"] == 1 and meta["pod"]["image"] == "registry.example/cart:1"
    assert meta["process"]["environ"] == {} and meta["snapshot"] is None


def test_corevault_info_shows_an_unversioned_crash(shipped: tuple[config.Settings, str, str]) -> None:
    _, cfg, _ = shipped
    out = corevault("-c", cfg, "info", ENTRY)
    assert out.returncode == 0, out.stderr
    assert "shop/cart-1 (uid uid-cart-1)" in out.stdout and "/data/dump-a/core-1" in out.stdout


def test_the_openapi_schema_shows_the_records_fields(shipped: tuple[config.Settings, str, str]) -> None:
    _, _, url = shipped
    schemas = api(url, "/api/v1/openapi.json").json()["components"]["schemas"]
    meta = schemas["Crash"]["properties"]["meta"]
    assert meta == {"$ref": "#/components/schemas/CrashRecord"}
    record = schemas["CrashRecord"]
    assert set(record["required"]) == set(crashrecord.CrashRecord.__annotations__)
    assert {"version", "process", "pod", "core", "volume", "modules", "snapshot"} <= set(record["properties"])
    process = schemas["Process"]["properties"]
    assert process["cmdline"] == {"items": {"type": "string"}, "title": "Cmdline", "type": "array"}
    assert "expected_size" in schemas["Core"]["properties"]
    assert "expected_size" not in schemas["Core"]["required"]


def test_the_record_costs_the_handler_no_typing_import() -> None:
    """The record's classes are plain dicts at run time: importing them brings in neither typing nor pydantic."""
    probe = "import sys, corevault.crashrecord; print(sorted({'typing', 'pydantic'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
