"""The binary store: every object a crashed process mapped is kept, keyed, found again, and
no tenant can poison or read another's.

Real crashes in runc pods of two tenants (namespace ``tenant-a``, the attacker, and
``tenant-b``, the victim), each pod with its own rootfs; the rootfs is deleted before
anything is analysed, so only what capture kept can explain a crash. The agent ships
everything into a vault (blob directory and SQLite catalog) that a real server serves.
Tenant A's forgeries claim tenant B's build-ids (``--build-id=0x…`` at link time), once
stored before B's crash (poisoning) and once after (reading B's file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from corevault import config, nodestore, objectid, spool
from corevault.agent import storeclean
from corevault.agent.loop import Agent
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import catalog, tables
from corevault.vault.crashes import LocalVault
from testbed import build, runc, servers
from tests.conftest import Capture, installed_capture

pytestmark = pytest.mark.crash

SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
POISONED = "ab" * 20  # A's forgery is stored first, then B crashes
READ = "cd" * 20  # B's file is stored first, then A's forgery crashes
TOKENS = {
    "a": "tenant-a-token-0123456789",
    "b": "tenant-b-token-0123456789",
    "all": "every-ns-token-0123456789",
}
SPARSE = 300 << 20


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def analyze(config_path: str, what: str) -> dict:
    out = subprocess.run(
        [CLI, "-c", config_path, "analyze", "--json", what], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def functions(report: dict) -> list[str]:
    return [f["function"] or "" for t in report["threads"] for f in t["frames"]]


def test_non_pie_executables_are_kept_and_explained_after_the_image_is_gone(
    capture, programs, tmp_path
) -> None:
    root = runc.build_rootfs(
        str(tmp_path / "root"), {"static": programs["crasher-static"], "nopie": programs["crasher-nopie"]}
    )
    ids = {}
    for name in ("static", "nopie"):
        c = capture.crash(root, [f"/app/{name}", "segv"], annotations=SEED)
        [meta] = [m for m in capture.entries() if m["pod"]["container_id"] == c.id]
        exe = next(m for m in meta["modules"] if m["path"] == f"/app/{name}")
        assert exe["start"] == 0x400000  # really not position-independent
        assert exe["stored"] == "new", exe
        ids[name] = meta["id"]
    shutil.rmtree(root)
    for name, crash_id in ids.items():
        report = analyze(capture.config, crash_id)
        assert report["signature_frames"][0] == "crash_here", (name, report["signature_frames"])
        exe = next(m for m in report["modules"] if m["path"] == f"/app/{name}")
        assert exe["file"] is not None


def test_the_store_keeps_its_quota(capture: Capture, tmp_path) -> None:
    """One pod maps three dense 3 MiB ELF files; the store may take 5 MiB: it never takes more."""
    root = runc.build_rootfs(
        str(tmp_path / "root"),
        {"mapper": build.build_variant("mapper", "tenant.c", ["gcc", "-g", "-O1", "-DFORGED"])},
    )
    for i in range(3):
        dense = os.path.join(root, "app", f"dense{i}.so")
        shutil.copy(build.build("libcrashy.so"), dense)
        with open(dense, "ab") as f:
            f.write(os.urandom(3 << 20))
    capture.configure('[spool]\nstore_max_size = "5M"\n')
    files = [f"/app/dense{i}.so" for i in range(3)]
    c = capture.crash(root, ["/app/mapper", "map", *files], annotations=_pod("tenant-a", "hog"))
    [meta] = [m for m in capture.entries() if m["pod"]["container_id"] == c.id]
    stored = {m["path"]: m["stored"] for m in meta["modules"] if m["path"] in files}
    assert nodestore.usage(capture.store) <= 5 << 20
    assert "new" in stored.values(), stored
    assert any(s.startswith("not stored: no room") for s in stored.values()), stored


def test_a_process_mapping_thousands_of_files_gets_a_bounded_share_of_the_handler(
    capture: Capture, tmp_path
) -> None:
    """A pod maps 3,000 ELF files (the kernel lets a process have 65,530 mappings): the handler
    looks at ``[capture] max_objects`` mapped files, those with code first, so the program's own
    executable and libraries are still kept, and hashes and copies at most ``max_objects_size``
    bytes of them; what it passed over is journaled, with why, and the core is captured."""
    root = runc.build_rootfs(
        str(tmp_path / "root"),
        {"mapper": build.build_variant("mapper", "tenant.c", ["gcc", "-g", "-O1", "-DFORGED"])},
    )
    lib = build.build("libcrashy.so")
    os.mkdir(os.path.join(root, "objs"))
    for i in range(3000):
        shutil.copy(lib, os.path.join(root, "objs", f"{i}.so"))
    capture.configure('[capture]\nmax_objects = 200\nmax_objects_size = "4M"\n')
    c = capture.crash(
        root, ["/bin/sh", "-c", "exec /app/mapper map /objs/*"], annotations=_pod("tenant-a", "maps")
    )
    [meta] = [m for m in capture.entries() if m["pod"]["container_id"] == c.id]
    modules = {m["path"]: m for m in meta["modules"]}
    assert len(modules) <= 200
    for program in ("/app/mapper", "/lib/x86_64-linux-gnu/libc.so.6"):
        assert modules[program]["stored"] in ("new", "held"), modules[program]
    kept = [m for m in modules.values() if m["stored"] in ("new", "held")]
    assert sum(m["size"] for m in kept) <= 4 << 20
    assert any(
        m["stored"].startswith("not stored: past [capture] max_objects_size") for m in modules.values()
    )
    [skipped] = [r for r in capture.journal() if r["event"] == "objects-skipped"]
    assert "mapped files not looked at: [capture] max_objects is 200" in skipped["reason"], skipped
    assert "not stored: [capture] max_objects_size is 4194304 bytes" in skipped["reason"], skipped
    assert skipped["reason"] in meta["warnings"]
    assert meta["core"]["size"] > 0 and meta["volume"]["written"]


@dataclass
class Tenants:
    cap: Capture
    settings: config.Settings
    hashes: dict[str, str]  # program name -> SHA-256 of the file the pod ran
    metas: dict[str, dict]  # crash name -> its spool record
    url: str = ""

    def get(self, path: str, who: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, headers={"Authorization": f"Bearer {TOKENS[who]}"})

    def module(self, crash: str, path: str) -> dict:
        return next(m for m in self.metas[crash]["modules"] if m["path"] == path)

    def report(self, crash: str) -> dict:
        with LocalVault(self.settings).engine.connect() as conn:
            return catalog.get_crash(conn, self.metas[crash]["id"])["report"]


def _pod(namespace: str, name: str) -> dict:
    return {
        **SEED, "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.name": name,
        "io.kubernetes.container.name": "app",
    }  # fmt: skip


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    def c_program(name: str, *flags: str) -> str:
        return build.build_variant(name, "tenant.c", ["gcc", "-g", "-O1", *flags])

    binaries = {
        "victim-poisoned": c_program("victim-poisoned", f"-Wl,--build-id=0x{POISONED}"),
        "forged-poisoned": c_program("forged-poisoned", "-DFORGED", f"-Wl,--build-id=0x{POISONED}"),
        "victim-read": c_program("victim-read", f"-Wl,--build-id=0x{READ}"),
        "forged-read": c_program("forged-read", "-DFORGED", f"-Wl,--build-id=0x{READ}"),
        "noid": c_program("noid", "-Wl,--build-id=none"),
        "gonokey": build.build_go("nokey.go"),
        "mapper": c_program("mapper", "-DFORGED"),
    }
    base = tmp_path_factory.mktemp("tenants")
    root_a = runc.build_rootfs(
        str(base / "a"), {n: binaries[n] for n in binaries if n.startswith(("forged", "mapper"))}
    )
    root_b = runc.build_rootfs(
        str(base / "b"), {n: binaries[n] for n in binaries if not n.startswith(("forged", "mapper"))}
    )
    # A's rootfs holds an ELF file with a 300 MiB hole, which its process maps
    big = os.path.join(root_a, "app", "big.so")
    shutil.copy(build.build("libcrashy.so"), big)
    os.truncate(big, SPARSE)
    binaries["big.so"] = big
    runs = [
        ("a-poison", root_a, "tenant-a", ["/app/forged-poisoned"]),
        ("b-poisoned", root_b, "tenant-b", ["/app/victim-poisoned"]),
        ("b-read", root_b, "tenant-b", ["/app/victim-read"]),
        ("c-read", root_b, "tenant-c", ["/app/victim-read"]),  # B's file, in another tenant's pod
        ("a-read", root_a, "tenant-a", ["/app/forged-read"]),
        ("b-go", root_b, "tenant-b", ["/bin/sh", "-c", "/app/gonokey; exit 1"]),  # PID 1 cannot abort
        ("b-noid", root_b, "tenant-b", ["/app/noid"]),
        ("a-sparse", root_a, "tenant-a", ["/app/mapper", "map", "/app/big.so"]),
    ]
    with installed_capture() as cap:
        cap.configure(f'[vault]\nstore = "file://{cap.state_dir}/vault"\n[agent]\nmetrics = ""\n')
        metas = {}
        for name, root, namespace, argv in runs:
            c = cap.crash(root, argv, annotations=_pod(namespace, f"pod-{name}"))
            found = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]
            assert len(found) == 1, (name, cap.journal()[-1:])
            meta = found[0]
            assert meta["pod"]["namespace"] == namespace
            metas[name] = meta
        hashes = {name: sha256(path) for name, path in binaries.items()}  # before the images go
        shutil.rmtree(root_a)
        shutil.rmtree(root_b)  # the images are gone: only what capture kept explains anything
        settings = config.load(cap.config)
        assert Agent(settings).run(once=True) == 0
        t = Tenants(cap, settings, hashes, metas)
        tokens = base / "tokens.toml"
        tokens.write_text(
            f'[[token]]\nname = "a"\ntoken = "{TOKENS["a"]}"\nnamespaces = ["tenant-a"]\n'
            f'[[token]]\nname = "b"\ntoken = "{TOKENS["b"]}"\nnamespaces = ["tenant-b"]\n'
            f'[[token]]\nname = "all"\ntoken = "{TOKENS["all"]}"\nnamespaces = ["*"]\n'
        )
        tokens.chmod(0o600)
        with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as t.url:
            yield t


def test_objects_without_a_gnu_build_id_get_a_stable_key_everywhere(tenants: Tenants) -> None:
    go = tenants.module("b-go", "/app/gonokey")
    assert go["build_id"] is None and go["go_build_id"]
    assert go["key"] == objectid.go_key(go["go_build_id"]) and go["stored"] == "new"
    noid = tenants.module("b-noid", "/app/noid")
    assert noid["build_id"] is None and noid["go_build_id"] is None
    assert noid["key"] == "sha256-" + tenants.hashes["noid"] and noid["stored"] == "new"
    # the agent's analysis (from the crash's record) and the CLI's both find them, and say by which key
    for crash, exe, function in (
        ("b-go", "/app/gonokey", "main.storeValue"),
        ("b-noid", "/app/noid", "victim_parse"),
    ):
        for report in (tenants.report(crash), analyze(tenants.cap.config, tenants.metas[crash]["id"])):
            module = next(m for m in report["modules"] if m["path"] == exe)
            assert module["file"] and module["key"] == tenants.module(crash, exe)["key"], module
            assert function in functions(report), functions(report)
    # the vault holds them under the same key, and debuginfod serves them by it
    for crash, exe in (("b-go", "/app/gonokey"), ("b-noid", "/app/noid")):
        m = tenants.module(crash, exe)
        r = tenants.get(f"/buildid/{m['key']}/executable", "b")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == m["sha256"]
    # a bare core (no record) finds the Go binary by the key the core's memory claims
    core = os.path.join(tenants.cap.volume, os.path.basename(tenants.metas["b-go"]["volume"]["path"]))
    bare = analyze(tenants.cap.config, core)
    assert next(m for m in bare["modules"] if m["path"] == "/app/gonokey")["key"] == go["key"]


def test_a_forged_build_id_never_explains_another_tenants_crash(tenants: Tenants) -> None:
    forged = tenants.module("a-poison", "/app/forged-poisoned")
    victim = tenants.module("b-poisoned", "/app/victim-poisoned")
    assert forged["build_id"] == victim["build_id"] == POISONED  # the same claim, stored first by A
    assert victim["sha256"] == tenants.hashes["victim-poisoned"] and victim["stored"] == "new"
    for report in (
        tenants.report("b-poisoned"),
        analyze(tenants.cap.config, tenants.metas["b-poisoned"]["id"]),
    ):
        assert report["signature_frames"][0] == "victim_parse", report["signature_frames"]
        assert "pwned_by_tenant_a" not in functions(report)
        exe = next(m for m in report["modules"] if m["path"] == "/app/victim-poisoned")
        assert exe["sha256"] == victim["sha256"]
    # the positive control: A's own crash is explained with A's own file
    assert tenants.report("a-poison")["signature_frames"][0] == "pwned_by_tenant_a"
    # the vault keeps both contents under the claim, and identical files (the libc) once
    with LocalVault(tenants.settings).engine.connect() as conn:
        o, co = tables.objects.c, tables.crash_objects.c
        claimed = conn.execute(tables.objects.select().where(o.key == POISONED)).all()
        libc = next(
            m for m in victim and tenants.metas["b-poisoned"]["modules"] if m["path"].endswith("libc.so.6")
        )
        libc_rows = conn.execute(tables.objects.select().where(o.key == libc["key"])).all()
        libc_users = conn.execute(tables.crash_objects.select().where(co.key == libc["key"])).all()
    assert {r.sha256 for r in claimed} == {forged["sha256"], victim["sha256"]}
    assert len(libc_rows) == 1 and len(libc_users) >= 4  # every dynamic crash here maps that one libc


def test_debuginfod_serves_a_reader_only_files_their_own_crashes_mapped(tenants: Tenants) -> None:
    for key, victim, forged in (
        (READ, "victim-read", "forged-read"),
        (POISONED, "victim-poisoned", "forged-poisoned"),
    ):
        mine = tenants.get(f"/buildid/{key}/executable", "a")
        assert mine.status_code == 200
        assert hashlib.sha256(mine.content).hexdigest() == tenants.hashes[forged]
        theirs = tenants.get(f"/buildid/{key}/executable", "b")
        assert hashlib.sha256(theirs.content).hexdigest() == tenants.hashes[victim]
    # A reader of every namespace, asking by build-id alone (gdb through DEBUGINFOD_URLS), gets the
    # content the crashes of two namespaces mapped, not A's forgery, although A crashed last
    every = tenants.get(f"/buildid/{READ}/executable", "all")
    assert hashlib.sha256(every.content).hexdigest() == tenants.hashes["victim-read"]
    b_crash = tenants.metas["b-read"]["id"]
    assert tenants.get(f"/buildid/{READ}/executable", "a", crash=b_crash).status_code == 404
    own = tenants.get(f"/buildid/{READ}/executable", "b", crash=b_crash)
    assert hashlib.sha256(own.content).hexdigest() == tenants.hashes["victim-read"]


def test_sparse_files_are_stored_with_their_holes(tenants: Tenants) -> None:
    big = tenants.module("a-sparse", "/app/big.so")
    assert big["stored"] == "new" and big["size"] == SPARSE
    assert big["sha256"] == tenants.hashes["big.so"]  # the hole hashes as the zeros it reads as
    held = nodestore.object_path(tenants.settings.buildid_dir, big["key"], big["sha256"])
    assert os.path.getsize(held) == SPARSE and os.stat(held).st_blocks * 512 < 4 << 20


def test_eviction_keeps_only_what_the_spool_still_needs(
    tenants: Tenants, request: pytest.FixtureRequest
) -> None:
    settings = tenants.settings
    # The node's store is the module's: it is put back as it was (hard links keep its files'
    # holes), whatever order the tests run in.
    before = settings.buildid_dir + ".before"
    shutil.copytree(settings.buildid_dir, before, symlinks=True, copy_function=os.link)

    def put_back() -> None:
        shutil.rmtree(settings.buildid_dir)
        os.rename(before, settings.buildid_dir)

    request.addfinalizer(put_back)
    assert spool.entries(settings.spool_dir) == []  # everything was shipped
    # a crash that has not been shipped yet: its binaries must stay
    waiting = tenants.metas["b-go"]
    entry = os.path.join(spool.ready_dir(settings.spool_dir), "waiting")
    os.makedirs(entry)
    with open(os.path.join(entry, spool.META_NAME), "w") as f:
        json.dump(waiting, f)
    try:
        assert storeclean.evict(settings) == []  # within the grace period nothing goes
        gone = storeclean.evict(settings, now=time.time() + 3600)
        left = {os.path.relpath(p, settings.buildid_dir) for p, _ in nodestore.objects(settings.buildid_dir)}
    finally:
        shutil.rmtree(entry)
    assert gone and left == {
        os.path.join("buildid", m["key"], m["sha256"])
        for m in waiting["modules"]
        if m["stored"] in ("new", "held")
    }
    # the vault still serves what the node let go
    victim = tenants.module("b-poisoned", "/app/victim-poisoned")
    r = tenants.get(f"/buildid/{POISONED}/executable", "b", crash=tenants.metas["b-poisoned"]["id"])
    assert hashlib.sha256(r.content).hexdigest() == victim["sha256"]
    report = analyze(tenants.cap.config, tenants.metas["b-poisoned"]["id"])  # objects come from the vault
    assert report["signature_frames"][0] == "victim_parse"
