"""Upstream debug files go only to crashes (and readers of crashes) that mapped the very content
they were fetched for.

A private upstream debuginfod (a real elfutils ``debuginfod`` on 127.0.0.1, standing in for a
company's own builds) holds the debug file of tenant B's program, which B's pods run stripped.
Tenant A's pod runs a program of its own whose build-id forges B's (``--build-id=0x…`` at
link time), laid out like B's, so B's debug file would name A's frames with B's private names.
B crashes first, and the agent fetches and keeps B's debug file; then the upstream stops giving
it out (withdrawn, or access refused: what the upstream decides), and A crashes. A's report is
not symbolized with B's file, the node keeps none for A's content, and the server gives A's
reader nothing under the build-id, while B's reader still gets B's file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from corevault import config
from corevault.agent.loop import Agent
from corevault.analysis import upstream
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import blobs, catalog
from corevault.vault.crashes import LocalVault
from testbed import build, debuginfod, runc, servers
from tests.conftest import installed_capture

pytestmark = [pytest.mark.crash, pytest.mark.servers]

CLAIMED = "5e" * 20  # B's build-id, which A's forgery claims too
SEED = {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p-%t"}
TOKENS = {"a": "upstream-tenant-a-token-0123", "b": "upstream-tenant-b-token-0123"}


def _pod(namespace: str, name: str) -> dict:
    return {
        **SEED, "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.name": name,
        "io.kubernetes.container.name": "app",
    }  # fmt: skip


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stripped(path: str, dest: str) -> str:
    subprocess.run(["objcopy", "--strip-all", path, dest], check=True)
    return dest


@dataclass
class Tenants:
    settings: config.Settings
    metas: dict[str, dict]  # crash name -> its spool record
    debug: str  # B's debug file, as the upstream serves it
    legacy_kept: bool  # whether a copy kept by build-id alone outlived the keeping of B's file
    url: str = ""

    def get(self, path: str, who: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, headers={"Authorization": f"Bearer {TOKENS[who]}"})

    def module(self, crash: str) -> dict:
        return next(m for m in self.metas[crash]["modules"] if m["path"] == "/app/prog")

    def report(self, crash: str) -> dict:
        with LocalVault(self.settings).engine.connect() as conn:
            return catalog.get_crash(conn, self.metas[crash]["id"])["report"]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    base = tmp_path_factory.mktemp("upstream-tenants")
    flags = ["gcc", "-g", "-O1", f"-Wl,--build-id=0x{CLAIMED}"]
    victim = build.build_variant("upstream-victim", "tenant.c", flags)
    forged = build.build_variant("upstream-forged", "tenant.c", [*flags, "-DFORGED"])
    roots = {
        "b": runc.build_rootfs(str(base / "b"), {"prog": _stripped(victim, str(base / "victim"))}),
        "a": runc.build_rootfs(str(base / "a"), {"prog": _stripped(forged, str(base / "forged"))}),
    }
    metas: dict[str, dict] = {}
    with installed_capture() as cap:

        def crash(name: str, tenant: str) -> None:
            c = cap.crash(roots[tenant], ["/app/prog"], annotations=_pod(f"tenant-{tenant}", f"pod-{name}"))
            [metas[name]] = [m for m in cap.entries() if m["pod"]["container_id"] == c.id]

        with debuginfod.serve([victim], ready_build_id=CLAIMED) as url:
            cap.configure(
                f'[vault]\nstore = "file://{cap.state_dir}/vault"\n[agent]\nmetrics = ""\n'
                f'[analysis]\ndebuginfod_urls = "{url}"\ndebug_dirs = []\n'
            )
            settings = config.load(cap.config)
            # a vault from before content hashes holds B's debug file by build-id alone
            legacy = blobs.legacy_debuginfo_key(CLAIMED)
            LocalVault(settings).store.put_file(legacy, victim)
            crash("b", "b")
            assert Agent(settings).run(once=True) == 0
            legacy_kept = LocalVault(settings).store.size(legacy) is not None
        # the upstream no longer gives B's file to anyone asking by its build-id
        crash("a", "a")
        assert Agent(settings).run(once=True) == 0
        for root in roots.values():
            shutil.rmtree(root)
        LocalVault(settings).store.put_file(legacy, victim)  # one that nothing replaced yet
        t = Tenants(settings, metas, victim, legacy_kept)
        tokens = base / "tokens.toml"
        tokens.write_text(
            f'[[token]]\nname = "a"\ntoken = "{TOKENS["a"]}"\nnamespaces = ["tenant-a"]\n'
            f'[[token]]\nname = "b"\ntoken = "{TOKENS["b"]}"\nnamespaces = ["tenant-b"]\n'
        )
        tokens.chmod(0o600)
        with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as t.url:
            yield t


def _functions(report: dict) -> list[str]:
    return [f["function"] or "" for t in report["threads"] for f in t["frames"]]


def _prog(report: dict) -> dict:
    return next(m for m in report["modules"] if m["path"] == "/app/prog")


def test_the_victims_own_crash_is_named_from_its_upstream_debug_file(tenants: Tenants) -> None:
    b = tenants.module("b")
    assert b["build_id"] == CLAIMED and b["stored"] == "new"
    report = tenants.report("b")
    assert _prog(report)["debuginfo"] and "victim_parse" in _functions(report)
    kept = upstream.debuginfo_path(tenants.settings.debuginfo_dir, CLAIMED, b["sha256"])
    assert _sha(kept) == _sha(tenants.debug)
    served = tenants.get(f"/buildid/{CLAIMED}/debuginfo", "b")
    assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == _sha(tenants.debug)
    assert not tenants.legacy_kept  # the copy kept by build-id alone went once B's content had its own


def test_a_forged_build_id_gets_none_of_the_debug_file_kept_for_another_content(tenants: Tenants) -> None:
    a, b = tenants.module("a"), tenants.module("b")
    assert a["build_id"] == b["build_id"] == CLAIMED and a["sha256"] != b["sha256"]
    report = tenants.report("a")
    assert not _prog(report)["debuginfo"]  # B's debug file would have been taken for A's binary
    assert "victim_parse" not in _functions(report), _functions(report)
    # the node keeps the file for B's content only, and the vault too
    cache = os.path.dirname(upstream.debuginfo_path(tenants.settings.debuginfo_dir, CLAIMED, a["sha256"]))
    assert sorted(n for n in os.listdir(cache) if n.endswith(upstream.SUFFIX)) == [
        b["sha256"] + upstream.SUFFIX
    ]
    vault = LocalVault(tenants.settings)
    assert vault.store.size(blobs.debuginfo_key(CLAIMED, a["sha256"])) is None
    assert vault.store.size(blobs.debuginfo_key(CLAIMED, b["sha256"])) == os.path.getsize(tenants.debug)
    # A's reader, by build-id alone and with A's own crash, gets nothing of B's (A's binary has no
    # DWARF), nor the copy a vault from before content hashes holds by build-id alone
    assert vault.store.size(blobs.legacy_debuginfo_key(CLAIMED)) is not None
    assert tenants.get(f"/buildid/{CLAIMED}/debuginfo", "a").status_code == 404
    assert (
        tenants.get(f"/buildid/{CLAIMED}/debuginfo", "a", crash=tenants.metas["a"]["id"]).status_code == 404
    )
    mine = tenants.get(f"/buildid/{CLAIMED}/executable", "a")
    assert mine.status_code == 200 and hashlib.sha256(mine.content).hexdigest() == a["sha256"]
